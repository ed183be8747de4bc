"""The policy language: stacks, conditions, templates, and the signed PolicyBundle."""
