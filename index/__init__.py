"""The latent index: FAISS over one model version's codes, with a durable item store.

The index contract (folder layout, durability, factory strings) is in docs/architecture.md.
"""
