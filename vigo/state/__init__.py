"""The partition's state: the store (one SQLite database plus its trees) and its change feed,
the WAL frames sealed as a stream and the applier that replays them into a file.

Below the server and the snapshots, which both import it; it imports nothing of vigo but
``vigo.errors`` and ``vigo.durable``, so the direction stays downward.
"""
