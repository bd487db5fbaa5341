"""lit_accel: PyTorch Lightning callbacks and strategies that make LLM training faster and cheaper."""

__version__ = "0.1.0"

__all__ = ["__version__"]
