"""Give freed heap memory back to the OS.

Loading, quantizing or fusing replaces big weights with new ones. Tensors of a few MB come from
glibc's heap (its mmap threshold rises to 32 MB after the first large free), and the freed
pages stay in the process until malloc_trim returns them: without it, quantizing Qwen2-0.5B
leaves ~1.3 GB of dead pages in the RSS (2.37 GB -> 1.08 GB after the trim)."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
