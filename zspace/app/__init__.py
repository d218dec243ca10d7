"""The composition root: the `zspace` CLI, the client and index CLIs, quickstart.

The only layer that imports every other (docs/architecture.md); the parts never import it.
"""
