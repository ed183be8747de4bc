"""Peer replication, without Ray: a partition's primary streams every committed change to its
standbys, and one of them can be promoted.

    replication.py   ReplicationLog: what the primary keeps and sends for each standby
    standby.py       StandbyCore: a standby's data dir, the term it has seen, what it applies
    promotion.py     the promotion plan: choice of standby, refusals, term, fencing order (pure)
    roles.py         a member's roles: route to role, the data dir in each, upkeep, what it reports
    adopt.py         a member's data dir made the birth state of a new cluster (head lost for good)

The member actor (vigo/actors/member.py) moves messages between these; vigo/actors/failover.py
carries out a promotion plan. See docs/operations.md.
"""
