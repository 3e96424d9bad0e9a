"""The on-device runtime: run exported models with onnxruntime and numpy only (never torch)."""

from .engine import Engine, GenerationConfig, TextStream, get_version_info, sample  # noqa: F401
from .session import LatentCache, OrtModel

__all__ = ["OrtModel", "LatentCache"]
