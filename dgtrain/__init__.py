"""dgtrain: a Hydra-driven PyTorch training CLI built around define-by-run graphs."""

__version__ = "0.1.0"
