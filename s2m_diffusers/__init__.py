"""S2M sampling for Hugging Face diffusers: multi-label samples from single-positive labels."""

__version__ = "0.1.0.dev0"
