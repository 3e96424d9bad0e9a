"""Give freed heap memory back to the operating system between the layers of a streamed stage.

What: ``release()`` runs a garbage collection and then glibc's ``malloc_trim(0)``, which returns
every free page of every malloc arena to the kernel (``MADV_DONTNEED``), not only the top of the
heap.

Why: the streamed stages (``edgekit.stream``, ``export.layered``, the int8 pass) allocate and free
one layer's tensors, traced graphs and protobuf buffers per step. Tensors below glibc's mmap
threshold (which grows to 32 MB after the first large free) come from the heap; freed, they stay
resident as free heap, fragmented between the next layer's blocks, and resident memory climbs layer
after layer although the live data does not. Trimming after each layer keeps resident memory at
what is live.

Invariants: never changes what is computed; a no-op (returns False) where glibc is not the C
library (macOS, musl, Windows).

Failure modes: none raised; a missing ``malloc_trim`` just means nothing is trimmed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache


@lru_cache(maxsize=1)
def _trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release() -> bool:
    """Collect garbage, then return free heap pages to the OS; True when glibc trimmed."""
    gc.collect()
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True
