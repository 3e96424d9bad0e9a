"""Symmetric int8: the one quantize / dequantize implementation every part of edgekit uses.

What: ``quantize_sym(x, axis, qmax)`` -> (q int8, s float32 with ``axis`` dropped), q = round(x / s),
s = max|x| / qmax over ``axis`` (zero point 0, the range [-qmax, qmax]; qmax 127, or 63 for 7-bit
weights: ``reduce_range``, exact u8s8 sums on x86 CPUs without VNNI, see quantize/rewrite.py);
``quantize_blocks`` does the same per block of the last axis; ``dequantize(q, s, axis)`` is q * s;
``fake_quant(x, axis, amax, qmax)`` is both in one step (``amax`` given: a calibrated static range
instead of the measured one) and ``fake_quant_blocks`` per block of the last axis.
``fake_quant`` takes numpy arrays or torch tensors (tensor methods only: this module never imports
torch, so the device side can use it) and returns the same kind.
Callers: the ONNX rewrites (weights, embedding rows, QMoE and grouped experts:
``edgekit.quantize.rewrite`` / ``moe_grouped``), the torch emulation of that graph
(``edgekit.quantize.emulate``), quantization-aware recovery (``edgekit.qat``) and SmoothQuant's
per-group error search (``edgekit.smooth``).

Why one place: the emulation ranks units and plans mixed precision for the graph the rewrite
writes, and QAT trains for that rounding, so all must round (half to even), clip and scale
identically; ``QMAX``, ``QMAX_7BIT`` and ``EPS`` live only here.

Invariants: float32 in, float32 out; a zero range gets scale ``EPS / qmax`` (never a division by
zero); ``|q| <= qmax``, so -x quantizes to -q exactly; a static ``amax`` becomes a float32 scale
the way the graph's constant does (``float32(max(amax, EPS) / qmax)``).
"""

from __future__ import annotations

import numpy as np

QMAX = 127.0     # symmetric int8: [-127, 127], zero point 0
QMAX_7BIT = 63.0  # 7-bit weights (reduce_range): u8 x s8 pair sums stay exact on x86 CPUs without VNNI
EPS = 1e-12      # floor of max|x|, so an all-zero row or tensor gets a finite scale


def _is_numpy(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic))


def absmax(x, axis=None):
    """max |x| over ``axis`` with the reduced dims kept (None: the whole tensor)."""
    if _is_numpy(x):
        return np.abs(x).max(axis=axis, keepdims=True)
    return x.abs().amax() if axis is None else x.abs().amax(dim=axis, keepdim=True)


def scale_of(amax, qmax: float = QMAX):
    """Scale for a measured max |x| (array or tensor): max(amax, EPS) / qmax, float32."""
    if _is_numpy(amax):
        return (np.maximum(amax.astype(np.float32), np.float32(EPS)) / np.float32(qmax)).astype(np.float32)
    return amax.clamp_min(EPS) / qmax


def _round_clip(v, qmax: float):
    return np.clip(np.rint(v), -qmax, qmax) if _is_numpy(v) else v.round().clamp(-qmax, qmax)


def quantize_sym(x: np.ndarray, axis: int, qmax: float = QMAX) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 along ``axis`` (the reduced axis). Returns (q int8, s float32 with ``axis``
    dropped)."""
    x = np.asarray(x, np.float32)
    s = scale_of(absmax(x, axis), qmax)
    return _round_clip(x / s, qmax).astype(np.int8), np.squeeze(s, axis=axis)


def per_token_columns(s: np.ndarray, qmax: float = QMAX) -> np.ndarray:
    """Column scales of a GEMM whose activations carry the row's max |x| as their scale (the graph's
    per-token quantization divides by max |x| and quantizes with scale 1 / qmax): the dequantization's
    1 / qmax goes into the column scales instead of one more node per activation."""
    return (s / np.float32(qmax)).astype(np.float32)


def quantize_blocks(w: np.ndarray, block: int, qmax: float = QMAX) -> tuple[np.ndarray, np.ndarray]:
    """w [..., N, K] -> q int8 [..., N, K], scales [..., N, K // block] (symmetric per block of K)."""
    *lead, n, k = w.shape
    q, s = quantize_sym(w.reshape(*lead, n, k // block, block), axis=-1, qmax=qmax)
    return q.reshape(w.shape), s


def dequantize(q: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
    """q * s with ``s`` broadcast back over the reduced ``axis``."""
    return q.astype(np.float32) * np.expand_dims(s, axis)


def fake_quant(x, axis=None, amax: float | None = None, qmax: float = QMAX):
    """dequantize(quantize(x)) in float32 (numpy array or torch tensor): scale from max|x| over
    ``axis`` (None: the whole tensor; kept dims broadcast) or from a fixed calibrated ``amax``."""
    if amax is not None:
        s = np.float32(max(float(amax), EPS) / qmax)
        s = s if _is_numpy(x) else float(s)
    else:
        s = scale_of(absmax(x, axis), qmax)
    return _round_clip(x / s, qmax) * s


def fake_quant_blocks(x, block: int, qmax: float = QMAX):
    """``fake_quant`` per block of ``block`` along the last axis (weights [N, K] or activations [.., K])."""
    shp = tuple(x.shape)
    return fake_quant(x.reshape(*shp[:-1], shp[-1] // block, block), axis=-1, qmax=qmax).reshape(shp)
