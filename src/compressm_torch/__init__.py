"""compressm_torch: PyTorch layers and adapters for in-training state reduction (in progress)."""

__all__: list[str] = []
