"""Process-level settings shared by the stages that run a model."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TOP_PAD = -2  # glibc mallopt parameter number (malloc.h)


def keep_freed_memory(pad_bytes: int = 1 << 30) -> bool:
    """Let glibc keep up to `pad_bytes` of freed heap instead of returning it to the kernel after every step.

    Each training step on GPT-2's 50,257-token vocabulary allocates and frees logits of batch x seq x 50,257 floats
    (~110 MB at batch 8 x 70 tokens). By default glibc hands such blocks back and the next step page-faults them in
    again: on the demo's 2-core CPU half the step time was kernel time. `benchmarks/bench_allocator.py` measures it.
    Only the CPU allocator is affected (no effect on results); a no-op where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_TOP_PAD, pad_bytes))
    except (OSError, AttributeError):
        return False
