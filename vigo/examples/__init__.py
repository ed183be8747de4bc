"""Example stack shipped with vigo (examples/stack at the repository root links here)."""
