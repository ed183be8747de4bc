"""Thin Ray actors over the plain-Python cores. Every Ray call goes through one wrapper,
``runtime.py`` (names, namespace ``vigo``, lifetimes, placement, calls with deadlines, nodes,
metrics), so the logic here can be unit-tested with a fake runtime (tests/fakeruntime.py, as
tests/unit/test_failover.py does for promotion, the watchdog and the gateway's routing).

    control    one, detached: the topology (vigo.server.topology), the auto-failover watchdog,
               and the node watch that places what the deployment wants on nodes that arrive
    member     one per partition member, primary or standby: owns its database
               (vigo.server.partition; vigo.server.peer; vigo.server.spanner.bolt for a bolt)
    gateway    one per node: TCP+TLS server for envoys and vigocli (vigo.server.gateway);
               spanner.py is its way to the bolts when spanner is on
    failover   promote(): gathers the members' states, carries out the pure plan
               (vigo.server.peer.promotion); the watchdog control runs
    placement  how each actor of a deployment is started (shared by deploy and control)
    deploy     which actors exist and on which host; applying a changed server.yaml; teardown

Imports point one way: deploy → control → placement → member, gateway (→ spanner) → runtime,
and control → failover → runtime; nothing here imports deploy, and runtime imports no other
actor module. No actor's constructor calls another actor: each connects in the background.
"""
