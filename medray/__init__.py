"""medray: a distributed platform for healthcare foundation models on Ray."""

__version__ = "0.1.0"
__all__ = ["__version__"]
