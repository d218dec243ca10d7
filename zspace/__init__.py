"""zspace: learn compact latent codes with autoencoders, serve and search them.

This core package holds only what every part shares (bundle format, feature
transforms, data loaders, ONNX Runtime sessions) and imports nothing heavier
than numpy and Pillow, so the serving image can use it without torch. The
parts install beneath it (zspace.training, zspace.index, zspace.service) and
zspace.app wires them together; docs/architecture.md has the layers.
"""

__version__ = "0.1.0"
