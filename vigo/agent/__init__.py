"""The envoy: the agent on a managed host. Imports no Ray, ever (a test asserts it)."""
