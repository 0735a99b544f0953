"""CPU matrix-vector kernels for quantized decode (one activation row), as PyTorch custom ops.

    torch.ops.qwen2.int8_gemv(x, qweight, scales) -> y
        x float32/bfloat16 [K] or [1, K]; qweight int8 [N, K]; scales [N] (bf16/fp32);
        y float32, x's shape with K replaced by N: y[n] = scales[n] * sum_k x[k] * qweight[n, k]
    torch.ops.qwen2.int4_gemv(x, qweight, scales, zeros, group_size) -> y
        qweight uint8 [N, K/2] in QuantLinear's "halves" order (byte i of group g holds q[g*G + i]
        in its low nibble, q[g*G + G/2 + i] in its high one), scales [N, K/G] (bf16/fp32), zeros
        uint8 [N, K/G] or None (symmetric, z = 8), G in {32, 64, 128, 256}:
        y[n] = sum_k x[k] * (q[n, k] - z[n, k // G]) * scales[n, k // G]
    torch.ops.qwen2.bf16_gemv(x, weight) -> y
        x bfloat16/float32 [K] or [1, K]; weight bfloat16 [N, K] (a plain nn.Linear weight, read as
        it is); y float32, x's shape with K replaced by N: y[n] = sum_k weight[n, k] * x[k], fp32
        accumulation (any other weight or x dtype is an error). Bias is the caller's.

    torch.ops.qwen2.f32_linear(x, packed, N, bias) -> y
        x float32 [..., K] (any number of rows); packed float32 [ceil(N/16), K, 16], an fp32
        [N, K] weight in k16 blocks (f32_pack: block b holds columns 16b..16b+15, the 16 values of
        one k side by side, zero padding); bias float32 [N] or None; y float32 [..., N] = x @ W.T + bias.
        One layout for one row (a bandwidth-bound stream of each block) and for batches and
        prefill (register-tiled, compute-bound), so one copy of the weights serves both.

Numerics (f32_linear): every output is one fp32 accumulation over k in order (FMA on the SIMD
paths), then + bias: the same operations for any number of rows, so a row's result is bit for bit
the same whatever else is in the batch. |y - exact| <= (K + 1) * 2^-24 * (sum_k |w_nk x_k| + |b_n|).

Numerics (bf16_gemv): no quantization. A bf16 x meets the weights in bf16 pairs (AVX512-BF16
vdpbf16ps: the products are exact in fp32, sums rounded to fp32; like a bf16 GEMM with fp32
accumulation); an fp32 x is used as it is, the weights widened exactly to fp32 (AVX512F / AVX2
FMA, scalar mul + add). Every path keeps >= 32 fp32 partial sums per row, so
|y[n] - exact[n]| <= (K/32 + 8) * 2^-24 * sum_k |weight[n, k] * x[k]| (vdpbf16ps also treats
denormal inputs as zero and flushes denormal results: 2^-126 per operation at most).

Numerics (int8/int4): x is quantized to int8 in blocks of 32, like llama.cpp's Q8_0 activations
(sx = amax / 127 in fp32, xq = round-half-even(x * (127 / amax))), block dot products are exact
int32 (AVX512-VNNI vpdpbusd, or AVX2 vpmaddubsw + vpmaddwd), and scales are applied in fp32. The
result differs from the exact product of the dequantized weight with x by at most
sum_b amax_b / 254 * sum_{k in b} |w[n, k]| plus fp32 rounding (~0.3% relative for Gaussian x;
tests/test_kernels.py holds both bounds).

The C++ sources (qwen2/kernels/csrc: common.h, the instruction-set selection and shared helpers;
gemv_int8.cpp, gemv_int4.cpp and gemv_quant.h/.cpp, their int8 activations; gemv_bf16.cpp;
f32_linear.cpp; elementwise.cpp, silu_mul / rms_norm / rope_ / argmax_rows; attention.cpp,
paged_attention; threadpool.h/.cpp, the serving kernels' threads; ops.cpp, the op registrations)
are compiled into one library once per machine with -O3 -march=native by torch.utils.cpp_extension
(cached in the torch extensions directory, ~/.cache/torch_extensions, under a name that hashes the
CPU's flags and every source file). `available()` is the one answer to "are the kernels built and
loaded?" (every caller asks it) and `unavailable_reason()` says why not. Nothing here raises at
import, and nothing is built before the first `available()` / `load()`. QWEN2_NO_KERNELS=1 turns
the kernels off.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.glob("*.cpp"))  # compiled and linked into one library
HEADERS = sorted(CSRC.glob("*.h"))
# test/benchmark variants of the same source: namespace -> -march (None: the native build)
VARIANTS = {"native": ("qwen2", "native"), "avx2": ("qwen2_avx2", "x86-64-v3"), "scalar": ("qwen2_scalar", "x86-64")}

_lock = threading.Lock()
_state: dict[str, object] = {}  # variant -> True | error message


def _cpu_tag() -> str:
    """A fingerprint of the CPU's feature flags, so a cache shared between machines never hands a
    -march=native build to a CPU without those instructions."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha1(line.encode()).hexdigest()[:8]
    except OSError:
        pass
    import platform
    return hashlib.sha1(platform.processor().encode()).hexdigest()[:8]


def _openmp_flags() -> list[str]:
    # ATen's parallel_for is header code: with the OpenMP backend it is an `omp parallel` region,
    # which needs -fopenmp to run in parallel. The extension then links libgomp.so.1 by soname,
    # which resolves to the libgomp torch already loaded (one runtime, one thread pool).
    return ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []


def _source_tag() -> str:
    """A hash of every C++ source and header: a changed file builds under a new name."""
    h = hashlib.sha1()
    for f in SOURCES + HEADERS:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:10]


def _build(variant: str) -> None:
    ns, march = VARIANTS[variant]
    from torch.utils import cpp_extension
    tag = _cpu_tag() if march == "native" else march.replace("-", "_")
    name = f"{ns}_kernels_{tag}_{_source_tag()}"
    omp = _openmp_flags()
    so = Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so"
    if not so.exists():
        print(f"qwen2: building CPU kernels{'' if variant == 'native' else f' ({variant})'} (once)...",
              file=sys.stderr, flush=True)
    cpp_extension.load(
        name=name, sources=[str(f) for f in SOURCES],
        extra_cflags=["-O3", f"-march={march}", f"-DQWEN2_NS={ns}", "-DNDEBUG", *omp],
        extra_ldflags=omp, is_python_module=False, verbose=bool(os.environ.get("QWEN2_KERNELS_VERBOSE")))
    _register_fake(ns)


def _register_fake(ns: str) -> None:
    """Shapes for torch.compile (Inductor calls the ops as extern kernels)."""

    def int8_fake(x, qweight, scales):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=torch.float32)

    def int4_fake(x, qweight, scales, zeros, group_size):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=torch.float32)

    def bf16_fake(x, weight):
        torch._check(weight.dtype == torch.bfloat16, lambda: f"bf16_gemv: weight must be bfloat16, got {weight.dtype}")
        return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)

    def f32_fake(x, packed, N, bias):
        torch._check(packed.dim() == 3 and packed.shape[2] == 16, lambda: "f32_linear: packed must be [ceil(N/16), K, 16]")
        return x.new_empty((*x.shape[:-1], N), dtype=torch.float32)

    def block4_fake(x, qweight, qh, scales, offsets, zero, bias, exact=False, sscales=None, soffsets=None):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=torch.float32)

    def block8_fake(x, qweight, scales, bias, exact=False, sscales=None):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=torch.float32)

    torch.library.register_fake(f"{ns}::block4_linear")(block4_fake)
    torch.library.register_fake(f"{ns}::block8_linear")(block8_fake)
    torch.library.register_fake(f"{ns}::block6_linear")(block8_fake)
    torch.library.register_fake(f"{ns}::bf16_gemv")(bf16_fake)
    torch.library.register_fake(f"{ns}::f32_linear")(f32_fake)
    torch.library.register_fake(f"{ns}::int8_gemv")(int8_fake)
    torch.library.register_fake(f"{ns}::int4_gemv")(int4_fake)


def load(variant: str = "native") -> bool:
    """Build (once per machine) and load the kernels; False if that is not possible here."""
    with _lock:
        if variant not in _state:
            if os.environ.get("QWEN2_NO_KERNELS"):
                _state[variant] = "disabled by QWEN2_NO_KERNELS"
            else:
                try:
                    _build(variant)
                    _state[variant] = True
                except Exception as e:  # no compiler, no ninja, a compile error: fall back
                    msg = str(e).strip().splitlines()
                    _state[variant] = f"{type(e).__name__}: {msg[-1] if msg else ''}"[:2000]
                if variant == "native" and _state[variant] is not True:
                    print(f"qwen2: CPU kernels unavailable ({_state[variant]}); the PyTorch paths run instead",
                          file=sys.stderr)
        return _state[variant] is True


def available() -> bool:
    """Whether qwen2's CPU kernels (torch.ops.qwen2.*) are built and loaded: the one check every
    caller makes. Built on the first ask (minutes, once per machine); False with QWEN2_NO_KERNELS=1
    or without a working compiler (one line on stderr says why), and the callers take their
    PyTorch paths. Cheap after the first call."""
    r = _state.get("native")
    return load("native") if r is None else r is True


def unavailable_reason() -> str | None:
    """Why the kernels are not available (None if they are, or were not tried yet)."""
    r = _state.get("native")
    return None if r is True else r


def ops(variant: str = "native"):
    """The op namespace of a loaded variant (torch.ops.qwen2 for the native build)."""
    if not load(variant):
        raise RuntimeError(f"qwen2 CPU kernels ({variant}) are not available: {_state[variant]}")
    return getattr(torch.ops, VARIANTS[variant][0])


def isa(variant: str = "native") -> str:
    """Which code path the build uses: 'avx512_vnni_bf16' (AVX512-VNNI and AVX512-BF16),
    'avx512_vnni', 'avx2' or 'scalar'."""
    return ops(variant).isa()


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y float32 [..., N] = (x [K] or [1, K]) @ (qweight int8 [N, K] * scales[:, None]).T"""
    return torch.ops.qwen2.int8_gemv(x, qweight, scales)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int) -> torch.Tensor:
    """y float32 [..., N] = x @ ((q - z) * s).T over QuantLinear's int4 layout (see module doc)."""
    return torch.ops.qwen2.int4_gemv(x, qweight, scales, zeros, group_size)


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y float32 [..., N] = (x [K] or [1, K], bf16/fp32) @ (weight bf16 [N, K]).T, fp32 accumulation."""
    return torch.ops.qwen2.bf16_gemv(x, weight)


def f32_pack(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """An fp32 [N, K] weight (any float dtype is widened) in f32_linear's k16 blocks:
    [ceil(N/16), K, 16], block b = columns 16b..16b+15, zero padded. Row n of the weight is
    packed[n // 16, :, n % 16] (f32_unpack_rows). `out`: a float32 [ceil(N/16), K, 16] tensor to
    pack into (no temporary copy of the weight)."""
    n, k = weight.shape
    nb = -(-n // 16)
    if out is None:
        out = torch.empty(nb, k, 16, dtype=torch.float32, device=weight.device)
    elif out.shape != (nb, k, 16) or out.dtype != torch.float32:
        raise ValueError(f"f32_pack: out must be float32 {[nb, k, 16]}, got {out.dtype} {list(out.shape)}")
    w, full = weight.detach(), n // 16
    with torch.no_grad():
        if full:
            out[:full].copy_(w[:full * 16].reshape(full, 16, k).transpose(1, 2))
        if full < nb:
            out[full].zero_()
            out[full, :, :n - full * 16].copy_(w[full * 16:].T)
    return out


def f32_unpack_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (any shape of ids) of the weight packed by f32_pack: [*rows.shape, K]
    (an embedding lookup straight from a tied lm_head's packed weight)."""
    return torch.ops.qwen2.f32_rows(packed, rows)


def f32_linear(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y float32 [..., N] = x [..., K] @ W.T (+ bias) for W packed by f32_pack (see module doc)."""
    return torch.ops.qwen2.f32_linear(x, packed, n, bias)
