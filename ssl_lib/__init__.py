"""Semi-supervised image classification: supervised + FixMatch + k-means losses, trained together."""

__version__ = "0.1.0"
