"""Spanner federation, without Ray: bolts are write-equal partitions that share the admissions
roster (the CRDT itself is vigo.roster).

    bolt.py          BoltCore: one partition plus the roster it replicates with its siblings
    routing.py       which bolt a request goes to (by slice), and merging the bolts' answers

The member actor runs a BoltCore when its partition is a bolt; the gateway's spanner backend
(vigo/actors/spanner.py) routes with routing.py. See docs/spanner.md.
"""
