"""Process memory: freed heap given back to the OS (trim), and weights in transparent huge pages
(hugepage_mapping, the one mapping every huge-page user takes; hugepage_weights).

Loading, quantizing or fusing replaces big weights with new ones. Tensors of a few MB come from
glibc's heap (its mmap threshold rises after the first large free), and the freed pages stay
in the process until malloc_trim returns them: without it, quantizing a model leaves the dead
float weights in the RSS."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


def trim() -> None:
    gc.collect()
    release_heap()


def release_heap() -> None:
    """Free heap pages back to the OS (glibc's malloc_trim; nothing elsewhere). A prefill's
    activations (MBs each, from the heap once the mmap threshold has risen) would otherwise stay
    resident through the decode that follows."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_HUGE = 2 << 20          # x86-64 transparent huge page
_MADV_HUGEPAGE = 14


def hugepage_mapping(nbytes: int):
    """(mapping, buffer, advised): one anonymous mapping, `buffer` a uint8 tensor of its first
    nbytes from a 2 MB boundary, advised MADV_HUGEPAGE (`advised`) where Linux has transparent huge
    pages (not `[never]`), so that what is stored there streams through 2 MB pages (fewer TLB
    misses: +8-10% streaming bandwidth on this project's machines, whose THP mode is `madvise`);
    plain pages elsewhere. The tensors viewing the buffer need the mapping: keep it with them."""
    import mmap

    import torch
    total = -(-nbytes // _HUGE) * _HUGE
    buf = mmap.mmap(-1, total + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    start = (-raw.data_ptr()) % _HUGE  # 2 MB aligned
    advised = False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" not in f.read():
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                advised = libc.madvise(raw.data_ptr() + start, total, _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        pass
    return buf, raw[start:start + nbytes], advised


def hugepage_weights(model, min_bytes: int = _HUGE) -> int:
    """Move the model's large parameters and buffers into one mapping advised with MADV_HUGEPAGE
    (hugepage_mapping), so decode streams them through 2 MB pages. Ties and aliases stay shared.
    Linux only; elsewhere, or where THP is off, nothing moves. Returns the bytes moved (rounded up
    to whole huge pages)."""
    import torch
    slots: dict[tuple, list] = {}  # (data_ptr, nbytes) -> [(module, kind, name, tensor)]
    for mod in model.modules():
        for kind, table in (("p", mod._parameters), ("b", mod._buffers)):
            for name, t in table.items():
                if (t is None or t.device.type != "cpu" or t.is_mkldnn or not t.is_contiguous()
                        or t.numel() * t.element_size() < min_bytes):
                    continue
                slots.setdefault((t.data_ptr(), t.numel() * t.element_size()), []).append((mod, kind, name, t))
    if not slots:
        return 0
    # Packed back to back (64-byte aligned), not one 2 MB page each: a huge page is resident as a
    # whole once touched, so page-rounding every 2.1 MB int4 weight would waste ~40% of its size.
    sizes = [-(-n // 64) * 64 for _, n in slots]
    buf, raw, advised = hugepage_mapping(sum(sizes))
    if not advised:
        return 0
    off = 0
    with torch.no_grad():
        for (key, users), size in zip(slots.items(), sizes):
            t = users[0][3]
            new = raw[off:off + key[1]].view(t.dtype).view(t.shape)
            new.copy_(t)
            for mod, kind, name, old in users:
                if kind == "p":
                    old.data = new  # the Parameter object (and every tie to it) keeps its identity
                else:
                    mod._buffers[name] = new
            off += size
    model._hugepage_buffer = buf  # the tensors view it; it lives as long as the model
    slots.clear()  # the old tensors (held here until now): freed by their counts, no cycle holds them
    t = old = users = None
    release_heap()  # (not trim: a full gc.collect is ~0.1 s of every load, and finds nothing here)
    return -(-sum(sizes) // _HUGE) * _HUGE
