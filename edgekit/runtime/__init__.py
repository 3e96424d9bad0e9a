"""The on-device runtime: run exported models with onnxruntime and numpy only (never torch)."""

from .session import LatentCache, OrtModel

__all__ = ["OrtModel", "LatentCache"]
