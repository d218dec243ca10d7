"""The latent index (FAISS + durable item store); see DESIGN.md and issue 4."""
