"""Thin Ray actors over the plain-Python cores. Ray is applied in ``deploy.py``, nowhere else.

    control    one, detached: the topology (partitions, their primary and term, the gateways)
    primary    one per partition: owns the partition's database (vigo.server.partition)
    gateway    one per node: TCP+TLS server for envoys and vigocli (vigo.server.gateway)
"""

NAMESPACE = "vigo"
