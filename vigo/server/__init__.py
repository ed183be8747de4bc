"""The control plane: gateway, admissions, secrets and the fleet store (needs the server extra)."""
