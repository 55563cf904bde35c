"""progvq: hierarchical VQ latent image models trained one level at a time."""

__version__ = "0.1.0"
