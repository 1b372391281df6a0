"""The ``compressm`` command: train, compare and analyse on embedded data sets."""

__all__: list[str] = []
