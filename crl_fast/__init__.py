"""crl-fast: fast contrastive reinforcement learning on GPUs."""

__version__ = "0.1.0"

__all__ = ["__version__"]
