"""zspace: learn compact latent codes with autoencoders, serve and search them.

This core package holds only what every part shares (bundle format, feature
transforms, data loaders, the CLI entry) and imports nothing heavier than
numpy and Pillow, so the serving image can use it without torch.
"""

__version__ = "0.1.0"
