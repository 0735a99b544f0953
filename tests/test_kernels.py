"""qwen2.kernels: int8 / int4 / bf16 matrix-vector ops against float64 references.

bf16_gemv (no quantization) is held to the exact float64 product: every code path keeps >= 32
independent fp32 partial sums per row (lane j adds up the products of k = j mod 32, or mod 64 /
pairs on AVX512), products of bf16 x bf16 are exact in fp32 and those of fp32 x bf16 are rounded
at most once, so a path has at most K/32 + 8 roundings (one per lane term, a tail term, the
product, 2 accumulator adds and 4-5 for the lane sum), each a relative 2^-24 of a partial sum
bounded by sum_k |w_nk x_k|:
    |err_n| <= (K/32 + 8) * 2^-24 * sum_k |w_nk * x_k|
plus, for vdpbf16ps (denormal inputs read as zero, denormal results flushed), 2^-126 per term.
Rounding an fp32 x to bf16 (2^-9 relative) would break this bound many times over.

Two references per case:
  * the same math in float64: x quantized exactly as the kernel does (fp32 ops, blocks of 32),
    exact integer dots; the kernel may only differ by fp32 rounding, bounded by
        |err| <= (K/32 + 8) * 2^-24 * M,
    M the sum of the magnitudes of everything the kernel adds up (see _bounds); K/32 + 8 bounds
    the number of roundings on any accumulation path (one per block term, 4 for the 16-lane sum,
    a few for scales and the zero-point / offset terms), on every code path (AVX512, AVX2, scalar);
  * the exact product with the unquantized x: the activation rounding adds at most
    |x_k - sx_b * xq_k| <= sx_b / 2 = amax_b / 254 per element, so
        |err_n| <= sum_b amax_b / 254 * sum_{k in b} |w_nk|  (+ the fp32 bound),
    and on Gaussian rows the relative error stays ~0.3-0.6%, held here to 2%.

Every case runs on the native build and, where the CPU can run them, on the AVX2 and scalar builds
of the same source (the issue's reference machine has AVX2 only).
"""
from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest
import torch

from qwen2 import kernels
from qwen2.quant.linear import pack_int4_halves, unpack_int4_halves

U = 2.0 ** -24


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _variants():
    out = ["native"]
    if platform.machine() in ("x86_64", "AMD64"):
        if {"avx2", "fma"} <= _cpu_flags():
            out.append("avx2")
        out.append("scalar")
    return out


@pytest.fixture(scope="module", params=_variants())
def ops(request):
    if not kernels.load(request.param):
        reason = kernels._state.get(request.param)
        if shutil.which("c++") or shutil.which("g++"):  # a compiler is there: a failed build is a bug
            pytest.fail(f"kernels did not build: {reason}")
        pytest.skip(f"no C++ compiler: {reason}")
    return kernels.ops(request.param)


# ----------------------------------------------------------------------------- references
def quantize_x(x: torch.Tensor):
    """The kernel's activation quantization, in the same fp32 arithmetic: (xq float64 [K],
    sx float64 [K] (each element's block scale), amax float64 [K])."""
    xf = x.float().reshape(-1)
    K = xf.numel()
    xb = torch.nn.functional.pad(xf, (0, (-K) % 32)).view(-1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    sx = amax / 127
    # torch.full_like(...) / amax: a true fp32 division (127 / amax would be reciprocal * 127)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inv)  # round half to even, like vcvtps2dq / nearbyint
    assert xq.abs().max() <= 127
    expand = lambda t: t.expand(-1, 32).reshape(-1)[:K].double()  # noqa: E731
    return xq.reshape(-1)[:K].double(), expand(sx), expand(amax)


def _bounds(x, w, mag_w):
    """(same-math reference, exact reference, fp32 bound, activation bound) for y = w @ x, with
    w float64 [N, K] (the dequantized weight) and mag_w [N, K] the magnitude of what the kernel
    multiplies each activation by before scaling (int8: (|q| + 256) * s, int4: (q + z) * s)."""
    xq, sx, amax = quantize_x(x)
    K = xq.numel()
    same = w @ (xq * sx)
    exact = w @ x.double().reshape(-1)
    fp32 = (K / 32 + 8) * U * (mag_w @ (xq.abs() * sx))
    act = w.abs() @ (amax / 254) * (1 + 1e-5)
    return same, exact, fp32, act


def int8_case(N, K, xdt=torch.float32, sdt=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K, generator=g).to(xdt)
    q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    s = (torch.rand(N, generator=g) * 0.02 + 1e-3).to(sdt)
    w = q.double() * s.double()[:, None]
    mag = (q.double().abs() + 256) * s.double().abs()[:, None]
    return (x, q, s), w, mag


def int4_case(N, K, G, asym, xdt=torch.float32, sdt=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K, generator=g).to(xdt)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    s = (torch.rand(N, K // G, generator=g) * 0.02 + 1e-3).to(sdt)
    z = torch.randint(0, 16, (N, K // G), dtype=torch.uint8, generator=g) if asym else None
    zd = (z.double() if asym else torch.full((N, K // G), 8.0, dtype=torch.float64)).repeat_interleave(G, 1)
    sd = s.double().repeat_interleave(G, 1)
    w = (q.double() - zd) * sd
    mag = (q.double() + zd) * sd.abs()
    return (x, pack_int4_halves(q, G), s, z, G), w, mag


def check(y, w, mag, x, rel=0.02):
    same, exact, fp32, act = _bounds(x, w, mag)
    y = y.double().reshape(-1)
    assert y.shape == same.shape
    err_same = (y - same).abs()
    assert bool((err_same <= fp32).all()), f"vs same math: max excess {(err_same - fp32).max().item():.3g}"
    err_exact = (y - exact).abs()
    assert bool((err_exact <= act + fp32).all()), f"vs exact: max excess {(err_exact - act - fp32).max().item():.3g}"
    assert (y - exact).norm() <= rel * exact.norm()


# ----------------------------------------------------------------------------- int8
INT8_SHAPES = [(1, 32), (37, 896), (9, 4864), (5, 100), (130, 128), (3, 1000), (64, 1536)]


@pytest.mark.parametrize("N,K", INT8_SHAPES)
@pytest.mark.parametrize("xdt,sdt", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                     (torch.bfloat16, torch.bfloat16)])
def test_int8_gemv(ops, N, K, xdt, sdt):
    (x, q, s), w, mag = int8_case(N, K, xdt, sdt, seed=N * 7 + K)
    y = ops.int8_gemv(x, q, s)
    assert y.dtype == torch.float32 and y.shape == (N,)
    check(y, w, mag, x)


# ----------------------------------------------------------------------------- int4
INT4_SHAPES = [(37, 896), (9, 4864), (7, 128), (5, 1152), (19, 256), (3, 1664)]


@pytest.mark.parametrize("N,K,G", [(n, k, g) for n, k in INT4_SHAPES for g in (32, 64, 128, 256) if k % g == 0])
@pytest.mark.parametrize("asym", [False, True])
def test_int4_gemv(ops, N, K, G, asym):
    xdt, sdt = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)][(N + G) % 2]
    args, w, mag = int4_case(N, K, G, asym, xdt, sdt, seed=N * 13 + K + G)
    y = ops.int4_gemv(*args)
    assert y.dtype == torch.float32 and y.shape == (N,)
    check(y, w, mag, args[0])


def test_int4_dtypes(ops):
    for xdt in (torch.float32, torch.bfloat16):
        for sdt in (torch.float32, torch.bfloat16, torch.float16):
            args, w, mag = int4_case(11, 512, 32, True, xdt, sdt, seed=3)
            check(ops.int4_gemv(*args), w, mag, args[0])
            (x, q, s), w, mag = int8_case(11, 512, xdt, sdt, seed=3)
            check(ops.int8_gemv(x, q, s), w, mag, x)


def test_outliers_and_real_scale(ops):
    """Rows with a few huge activations (as in LLM hidden states) and weights quantized from
    real-looking floats: still within the derived bound, and within 2% of the unquantized product."""
    from qwen2.quant.linear import QuantLinear
    g = torch.Generator().manual_seed(5)
    K, N = 896, 300
    x = torch.randn(K, generator=g)
    x[[3, 100, 517]] = torch.tensor([40.0, -25.0, 60.0])
    lin = torch.nn.Linear(K, N, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.02, generator=g)
    for bits, gs in ((8, -1), (4, 32), (4, 128)):
        ql = QuantLinear.from_linear(lin, bits, gs, torch.bfloat16)
        if bits == 8:
            y = ops.int8_gemv(x, ql.qweight, ql.scales)
            w = ql.qweight.double() * ql.scales.double()[:, None]
            mag = (ql.qweight.double().abs() + 256) * ql.scales.double()[:, None]
        else:
            y = ops.int4_gemv(x, ql.qweight, ql.scales, ql.zeros, gs)
            q = unpack_int4_halves(ql.qweight, gs).double()
            sd = ql.scales.double().repeat_interleave(gs, 1)
            w = (q - 8) * sd
            mag = (q + 8) * sd.abs()
        check(y, w, mag, x)


def test_exact_when_x_is_representable(ops):
    """x = +-1 quantizes exactly (xq = +-127, sx = 1/127): y is the plain dequantized product."""
    g = torch.Generator().manual_seed(1)
    K, N = 640, 21
    x = torch.where(torch.rand(K, generator=g) < 0.5, -1.0, 1.0)
    q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g)
    ref = (q.double() @ x.double()) * s.double()
    torch.testing.assert_close(ops.int8_gemv(x, q, s).double(), ref, rtol=1e-5, atol=1e-5)
    q4 = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    s4 = torch.rand(N, K // 64, generator=g)
    ref4 = ((q4.double() - 8) * s4.double().repeat_interleave(64, 1)) @ x.double()
    torch.testing.assert_close(ops.int4_gemv(x, pack_int4_halves(q4, 64), s4, None, 64).double(), ref4,
                               rtol=1e-5, atol=1e-5)


def test_zero_x_and_shapes(ops):
    q = torch.randint(-128, 128, (8, 64), dtype=torch.int8)
    s = torch.rand(8)
    assert torch.equal(ops.int8_gemv(torch.zeros(64), q, s), torch.zeros(8))
    assert ops.int8_gemv(torch.randn(1, 64), q, s).shape == (1, 8)
    p = torch.randint(0, 256, (8, 32), dtype=torch.uint8)
    assert ops.int4_gemv(torch.randn(1, 64), p, torch.rand(8, 2), None, 32).shape == (1, 8)
    assert ops.int8_gemv(torch.randn(64), q[:0], s[:0]).shape == (0,)


def test_bad_inputs(ops):
    q = torch.randint(-128, 128, (8, 64), dtype=torch.int8)
    with pytest.raises(RuntimeError, match="one row"):
        ops.int8_gemv(torch.randn(2, 64), q, torch.rand(8))
    with pytest.raises(RuntimeError, match="scales"):
        ops.int8_gemv(torch.randn(64), q, torch.rand(7))
    p = torch.randint(0, 256, (8, 48), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="group_size"):
        ops.int4_gemv(torch.randn(96), p, torch.rand(8, 2), None, 48)
    with pytest.raises(RuntimeError, match="multiple"):
        ops.int4_gemv(torch.randn(96), p, torch.rand(8, 1), None, 64)
    with pytest.raises(RuntimeError, match="zeros"):
        ops.int4_gemv(torch.randn(96), p, torch.rand(8, 3), torch.zeros(8, 3), 32)


def test_threads_agree(ops):
    """Rows are independent: 1 and 2 threads give bit-identical results."""
    (x, q, s), _, _ = int8_case(1000, 896, seed=9)
    args4, _, _ = int4_case(1000, 896, 32, True, seed=9)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a8, a4 = ops.int8_gemv(x, q, s), ops.int4_gemv(*args4)
        torch.set_num_threads(2)
        b8, b4 = ops.int8_gemv(x, q, s), ops.int4_gemv(*args4)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a8, b8) and torch.equal(a4, b4)


# ----------------------------------------------------------------------------- bf16
def bf16_bound(x, w):
    """(exact float64 product, derived fp32-accumulation bound) for y = w @ x."""
    xd, wd = x.double().reshape(-1), w.double()
    K = xd.numel()
    exact = wd @ xd
    bound = (K / 32 + 8) * U * (wd.abs() @ xd.abs())
    denormal = 2.0 ** -126 * (xd.abs().sum() + wd.abs().sum(-1) + K + 8)  # DAZ / FTZ of vdpbf16ps
    return exact, bound + denormal


def check_bf16(y, x, w):
    exact, bound = bf16_bound(x, w)
    y = y.double().reshape(-1)
    assert y.shape == exact.shape
    err = (y - exact).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g} (bound {bound.max().item():.3g})"


BF16_SHAPES = [(1, 1), (7, 33), (37, 896), (9, 4864), (5, 100), (130, 128), (3, 1000), (64, 1536), (11, 127),
               (4, 255), (2, 8960)]


@pytest.mark.parametrize("N,K", BF16_SHAPES)
@pytest.mark.parametrize("xdt", [torch.bfloat16, torch.float32])
def test_bf16_gemv(ops, N, K, xdt):
    g = torch.Generator().manual_seed(N * 31 + K)
    x = (torch.randn(K, generator=g) * 3).to(xdt)
    w = (torch.randn(N, K, generator=g) * 0.02).to(torch.bfloat16)
    for xx in (x, x.view(1, K)):
        y = ops.bf16_gemv(xx, w)
        assert y.dtype == torch.float32 and y.shape == (*xx.shape[:-1], N)
        check_bf16(y, x, w)


def test_bf16_exact_on_small_integers(ops):
    """Integer x and w (bf16-exact, every partial sum < 2^24): the result is exact on every path."""
    g = torch.Generator().manual_seed(7)
    for N, K in ((13, 896), (5, 1000), (3, 77)):
        x = torch.randint(-8, 9, (K,), generator=g).to(torch.bfloat16)
        w = torch.randint(-100, 101, (N, K), generator=g).to(torch.bfloat16)
        ref = w.double() @ x.double()
        for xx in (x, x.float()):
            assert torch.equal(ops.bf16_gemv(xx, w).double(), ref)


def test_bf16_cancellation_and_layout(ops):
    """Rows that cancel (y ~ 0 against large terms), huge activations, a weight that is a strided
    view (read through .contiguous()), and an exact zero x."""
    g = torch.Generator().manual_seed(11)
    K, N = 896, 40
    x = torch.randn(K, generator=g)
    x[[3, 100, 517]] = torch.tensor([40.0, -25.0, 60.0])
    x = x.to(torch.bfloat16)
    w = (torch.randn(N, K, generator=g) * 0.05).to(torch.bfloat16)
    w[::2, K // 2:] = -w[::2, :K // 2].flip(-1)  # half of each even row undoes the other half's x
    x[K // 2:] = x[:K // 2].flip(-1)
    check_bf16(ops.bf16_gemv(x, w), x, w)
    wide = (torch.randn(N, 2 * K, generator=g) * 0.05).to(torch.bfloat16)
    check_bf16(ops.bf16_gemv(x, wide[:, ::2]), x, wide[:, ::2])
    check_bf16(ops.bf16_gemv(x, wide.t()[:K].t()), x, wide[:, :K])
    assert torch.equal(ops.bf16_gemv(torch.zeros(K), w), torch.zeros(N))
    assert ops.bf16_gemv(x, w[:0]).shape == (0,)


def test_bf16_bad_inputs(ops):
    w = torch.randn(8, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.bf16_gemv(torch.randn(64), w.float())
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.bf16_gemv(torch.randn(64), w.half())
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        ops.bf16_gemv(torch.randn(64).half(), w)
    with pytest.raises(RuntimeError, match="one row"):
        ops.bf16_gemv(torch.randn(2, 64), w)
    with pytest.raises(RuntimeError, match="one row"):
        ops.bf16_gemv(torch.randn(63), w)


def test_bf16_threads_agree(ops):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(896, generator=g).to(torch.bfloat16)
    w = torch.randn(3000, 896, generator=g).to(torch.bfloat16)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.bf16_gemv(x, w)
        torch.set_num_threads(2)
        b = ops.bf16_gemv(x, w)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- fp32 (packed, any rows)
# f32_linear: every output is one recursive fp32 sum over k (FMA: one rounding per step; scalar:
# product then sum), then + bias, so (Higham, dot products) with gamma_n = n u / (1 - n u):
#     |y - exact| <= gamma_{K+1} * (sum_k |w_nk x_mk| + |b_n|)
F32_SHAPES = [(1, 1), (16, 896), (37, 896), (9, 4864), (100, 64), (17, 5), (130, 33), (1152, 896)]


def check_f32(y, x, w, b=None):
    xd, wd = x.double().reshape(-1, x.shape[-1]), w.double()
    K = w.shape[1]
    exact = xd @ wd.T + (0 if b is None else b.double())
    mag = xd.abs() @ wd.abs().T + (0 if b is None else b.double().abs())
    gamma = (K + 1) * U / (1 - (K + 1) * U)
    err = (y.double().reshape(exact.shape) - exact).abs()
    assert bool((err <= gamma * mag).all()), f"max excess {(err - gamma * mag).max().item():.3g}"


@pytest.mark.parametrize("N,K", F32_SHAPES)
def test_f32_linear(ops, N, K):
    g = torch.Generator().manual_seed(N * 17 + K)
    w = torch.randn(N, K, generator=g) * 0.05
    b = torch.randn(N, generator=g)
    packed = kernels.f32_pack(w)
    assert packed.shape == (-(-N // 16), K, 16)
    for M in (1, 2, 5, 6, 7, 13, 16, 40):
        x = torch.randn(M, K, generator=g) * 3
        for bias in (None, b):
            y = ops.f32_linear(x, packed, N, bias)
            assert y.dtype == torch.float32 and y.shape == (M, N)
            check_f32(y, x, w, bias)
            # the same operations whatever the batch: each row alone gives its batched result exactly
            if M in (7, 16):
                assert torch.equal(torch.cat([ops.f32_linear(x[i:i + 1], packed, N, bias) for i in range(M)]), y)
    x = torch.randn(2, 3, K, generator=g)
    y = ops.f32_linear(x, packed, N, b)
    assert y.shape == (2, 3, N)
    check_f32(y, x, w, b)


def test_f32_exact_on_small_integers(ops):
    g = torch.Generator().manual_seed(3)
    for N, K, M in ((13, 896, 1), (35, 1000, 9), (3, 77, 16)):
        x = torch.randint(-8, 9, (M, K), generator=g).float()
        w = torch.randint(-100, 101, (N, K), generator=g).float()
        b = torch.randint(-1000, 1000, (N,), generator=g).float()
        assert torch.equal(ops.f32_linear(x, kernels.f32_pack(w), N, b).double(), x.double() @ w.double().T + b.double())


def test_f32_pack_rows_and_views(ops):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(100, 37, generator=g)
    packed = kernels.f32_pack(w)
    assert torch.equal(packed[-1, :, 100 % 16:], torch.zeros(37, 16 - 100 % 16))  # zero padding
    ids = torch.tensor([[0, 99, 17], [5, 5, 64]])
    assert torch.equal(kernels.f32_unpack_rows(packed, ids), w[ids])
    assert torch.equal(ops.f32_rows(packed, torch.arange(100)), w)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.f32_rows(packed, torch.tensor([112]))
    # a strided x is read through .contiguous(); bf16 weights are widened when packed
    x = torch.randn(4, 74, generator=g)[:, ::2]
    check_f32(ops.f32_linear(x, packed, 100, None), x, w)
    wb = w.to(torch.bfloat16)
    check_f32(ops.f32_linear(x, kernels.f32_pack(wb), 100, None), x, wb.float())
    assert ops.f32_linear(torch.randn(0, 37), packed, 100, None).shape == (0, 100)


def test_f32_bad_inputs(ops):
    packed = kernels.f32_pack(torch.randn(20, 8))
    with pytest.raises(RuntimeError, match="float32"):
        ops.f32_linear(torch.randn(2, 8).double(), packed, 20, None)
    with pytest.raises(RuntimeError, match="does not match"):
        ops.f32_linear(torch.randn(2, 8), packed, 33, None)
    with pytest.raises(RuntimeError, match=r"x must be \[\.\.\., 8\]"):
        ops.f32_linear(torch.randn(2, 9), packed, 20, None)
    with pytest.raises(RuntimeError, match="packed must be"):
        ops.f32_linear(torch.randn(2, 8), torch.randn(20, 8), 20, None)
    with pytest.raises(RuntimeError, match="bias"):
        ops.f32_linear(torch.randn(2, 8), packed, 20, torch.randn(19))


def _f32_batch_and_row(ops, x, packed, n):
    """f32_linear of the whole batch and of its first row alone (two different kernel paths)."""
    return ops.f32_linear(x, packed, n, None), ops.f32_linear(x[:1], packed, n, None)


def test_f32_threads_agree(ops):
    g = torch.Generator().manual_seed(9)
    w, x = torch.randn(3000, 896, generator=g), torch.randn(16, 896, generator=g)
    packed = kernels.f32_pack(w)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = _f32_batch_and_row(ops, x, packed, 3000)
        torch.set_num_threads(2)
        b = _f32_batch_and_row(ops, x, packed, 3000)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_f32_pool_concurrent_callers_and_fork(ops):
    """The serving kernels' thread pool: callers on several Python threads (one job at a time),
    more torch threads than workers, and a forked child (no workers there: the caller does all
    chunks) all give the single-threaded results exactly."""
    import os
    import threading
    g = torch.Generator().manual_seed(12)
    w, x = torch.randn(700, 96, generator=g), torch.randn(5, 96, generator=g)
    packed = kernels.f32_pack(w)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = _f32_batch_and_row(ops, x, packed, 700)
        torch.set_num_threads(3)
        errors = []

        def hammer():
            for _ in range(100):
                got = _f32_batch_and_row(ops, x, packed, 700)
                if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                    errors.append("mismatch")
        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        if hasattr(os, "fork"):
            pid = os.fork()
            if pid == 0:  # the child: exit status 0 only if the pool still computes the same
                ok = torch.equal(ops.f32_linear(x, packed, 700, None), want[0])
                os._exit(0 if ok else 1)
            assert os.waitpid(pid, 0)[1] == 0
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------- serving helpers
def test_silu_mul(ops):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 2 * 1000, generator=g) * 6
    x[0, :12] = torch.tensor([-120.0, -100.0, -87.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.0, 1e4, -1e4, 3.0])
    y = ops.silu_mul(x)
    gate, up = x.double().chunk(2, -1)
    ref = gate * torch.sigmoid(gate) * up
    assert y.shape == (7, 1000)
    # exp within 2 ulp, the reciprocal within 2, three products: 8 ulp of the result (normal range)
    err = (y.double() - ref).abs()
    assert bool((err <= 8 * U * ref.abs() + 2.0 ** -126).all()), (err - 8 * U * ref.abs()).max()
    assert ops.silu_mul(x[:, :10].contiguous()).shape == (7, 5)
    with pytest.raises(RuntimeError, match="even"):
        ops.silu_mul(torch.randn(3, 5))


def test_rms_norm(ops):
    g = torch.Generator().manual_seed(3)
    for D in (896, 64, 7):
        x, w = torch.randn(5, D, generator=g) * 10, torch.randn(D, generator=g)
        y = ops.rms_norm(x, w, 1e-6)
        xd = x.double()
        ref = w.double() * (xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6))
        torch.testing.assert_close(y.double(), ref, rtol=(D / 16 + 8) * U, atol=0)
    assert torch.equal(ops.rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-6), torch.zeros(2, 8))


def test_rope_equals_apply_rope(ops):
    """rope_ rotates q / k views in place with exactly apply_rope's bits (the speed pass relies on
    it: logits equal to the eager model's), for strided views, broadcast cos/sin and odd D/2."""
    from qwen2.model.rope import apply_rope, default_inv_freq, rope_cos_sin
    g = torch.Generator().manual_seed(5)
    for b, h, t, d, cb in ((1, 14, 1, 64, 1), (2, 3, 7, 128, 2), (2, 2, 5, 64, 1), (1, 4, 33, 40, 1), (1, 1, 1, 2, 1)):
        qkv = torch.randn(b, t, (h + 2) * d, generator=g) * 4
        q = qkv[..., :h * d].view(b, t, h, d).transpose(1, 2)      # the projection's view, as in the model
        pos = torch.randint(0, 40000, (cb, t), generator=g)
        cos, sin = rope_cos_sin(default_inv_freq(1e6, d), pos, 1.0, torch.float32)
        ref = apply_rope(q, cos, sin)
        rest = qkv[..., h * d:].clone()
        out = ops.rope_(q, cos, sin)
        assert out.data_ptr() == q.data_ptr() and torch.equal(out, ref), (b, h, t, d)
        assert torch.equal(qkv[..., h * d:], rest)  # the k / v columns untouched
    with pytest.raises(RuntimeError, match="do not fit"):
        ops.rope_(torch.randn(1, 2, 3, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))


def test_argmax_rows(ops):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 1000, generator=g)
    x[1, 10] = x[1, 990] = 100.0            # a tie: the first index
    x[2, 995] = 200.0                        # past n: not picked
    x[3] = float("-inf")                     # nothing finite: 0, as torch.argmax
    x[4, 3] = x[4, 19] = x[4, 35] = 50.0     # a tie within one SIMD lane's residue class and across lanes
    x[5, :5] = 9.0
    for n in (1000, 990, 17, 5, 1):
        assert torch.equal(ops.argmax_rows(x, n), x[:, :n].argmax(-1)), n
    wide = torch.randn(3, 2000, generator=g)
    view = wide[:, 500:1500]                 # strided rows
    assert torch.equal(ops.argmax_rows(view, 1000), view.argmax(-1))
    with pytest.raises(RuntimeError, match="n must be"):
        ops.argmax_rows(x, 1001)


@pytest.mark.parametrize("D,H,KV", [(64, 14, 2), (128, 8, 8), (48, 4, 2), (8, 2, 1)])
def test_paged_attention(ops, D, H, KV):
    """Decode attention read in place from pool slots equals SDPA over the gathered keys, with
    and without a sliding window, rows of different lengths (padding slots ignored)."""
    g = torch.Generator().manual_seed(D + H)
    pool_k, pool_v = torch.randn(300, KV, D, generator=g), torch.randn(300, KV, D, generator=g)
    lens = torch.tensor([1, 17, 40, 33, 64, 16])
    slots = torch.randint(0, 300, (6, 64), generator=g)
    slots[0, 1:] = 10 ** 9                   # never read: past the row's length
    q = torch.randn(6, H, D, generator=g) * 2
    for window in (0, 10):
        out = ops.paged_attention(q, pool_k, pool_v, slots, lens, D ** -0.5, window)
        for i in range(6):
            L = int(lens[i])
            s0 = max(0, L - window) if window else 0
            k, v = pool_k[slots[i, s0:L]].transpose(0, 1), pool_v[slots[i, s0:L]].transpose(0, 1)
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[i].double().view(KV, H // KV, D), k.double(), v.double()).reshape(H, D)
            torch.testing.assert_close(out[i].double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="lens"):
        ops.paged_attention(q, pool_k, pool_v, slots, torch.tensor([0, 1, 1, 1, 1, 1]), 1.0, 0)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.paged_attention(q, pool_k, pool_v, slots, torch.tensor([2, 1, 1, 1, 1, 1]), 1.0, 0)


# ----------------------------------------------------------------------------- API and compile
def test_python_api():
    assert kernels.available(), kernels.unavailable_reason()
    assert kernels.unavailable_reason() is None
    assert kernels.isa() in ("avx512_vnni_bf16", "avx512_vnni", "avx2", "scalar")
    (x, q, s), w, mag = int8_case(17, 256, seed=2)
    check(kernels.int8_gemv(x, q, s), w, mag, x)
    args, w, mag = int4_case(17, 256, 128, False, seed=2)
    check(kernels.int4_gemv(*args), w, mag, args[0])
    xb, wb = torch.randn(1, 256).to(torch.bfloat16), torch.randn(17, 256).to(torch.bfloat16)
    check_bf16(kernels.bf16_gemv(xb, wb), xb, wb)


def test_inside_torch_compile():
    assert kernels.available(), kernels.unavailable_reason()
    (x, q, s), w, mag = int8_case(33, 256, torch.bfloat16, seed=4)
    (_, p4, s4, z4, G), w4, mag4 = int4_case(33, 256, 32, True, seed=4)

    def f(x, q, s, p4, s4, z4):
        a = torch.ops.qwen2.int8_gemv(x * 2, q, s)
        b = torch.ops.qwen2.int4_gemv(x, p4, s4, z4, 32)
        return a + b.relu(), b

    eager = f(x, q, s, p4, s4, z4)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=False)(x, q, s, p4, s4, z4)
    for e, c in zip(eager, compiled):
        assert c.dtype == torch.float32
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
    check(compiled[1], w4, mag4, x)


def test_bf16_inside_torch_compile():
    assert kernels.available(), kernels.unavailable_reason()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 896, generator=g).to(torch.bfloat16)
    w = (torch.randn(300, 896, generator=g) * 0.02).to(torch.bfloat16)
    b = torch.randn(300, generator=g)

    def f(x, w, b):  # as GemvLinear would: the caller adds the bias, casts back to bf16
        h = torch.nn.functional.silu(x.float()).to(torch.bfloat16)
        y = torch.ops.qwen2.bf16_gemv(h, w)
        return (y + b).to(torch.bfloat16), y

    eager = f(x, w, b)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=False)(x, w, b)
    assert compiled[0].dtype == torch.bfloat16 and compiled[1].dtype == torch.float32
    assert compiled[1].shape == (1, 300)
    torch.testing.assert_close(compiled[1], eager[1], rtol=0, atol=0)
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
    check_bf16(compiled[1], torch.nn.functional.silu(x.float()).to(torch.bfloat16), w)
