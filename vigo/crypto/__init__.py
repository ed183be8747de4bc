"""The bottom layer both the envoy and the server stand on: key files, AEAD, TLS loading.

It imports nothing of vigo but ``vigo.errors``, and nothing heavy: the envoy loads it.
"""
