"""Training: data sets in, torch models, the training loop, evaluation and ONNX export out.

The only part that imports torch. See docs/architecture.md for what it may import.
"""
