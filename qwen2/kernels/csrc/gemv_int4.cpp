// int4_gemv: int4 weights in "halves" order, a scale (and a zero) per group (numerics: gemv_quant.h).
#include "gemv_quant.h"

namespace QWEN2_NS {
namespace {

// A chunk is CB weight bytes (2 * CB weights: CB = 64 on AVX512, 32 on AVX2). The permuted
// activations xp hold, per chunk, the CB activations that meet its low nibbles, then the CB that
// meet its high nibbles, so one load of weights feeds two integer dot products. Lane l (int32) of
// such a product covers bytes 4l..4l+3 of the chunk; sxv holds, per chunk and lane, the scale of
// the activation block the lane's low nibbles meet (CB / 4 floats), then the high ones'.
#if defined(QWEN2_AVX512)
constexpr int64_t CB = 64;
#else
constexpr int64_t CB = 32;
#endif

struct Act4 {
  Act a;
  int64_t G = 0, ng = 0, nc = 0;
  std::vector<int8_t> xp;  // nc * 2 * CB
  std::vector<float> sxv;  // nc * CB / 2
  std::vector<float> sxg;  // G == 32: activation scale per group (padded with 16 zeros)
  std::vector<float> T;    // per group: sum_{b in g} sx_b * S_b (padded with 16 zeros)
};

void prep4(Act4& p, int64_t G) {
  const int64_t K = p.a.K, half = G / 2;
  p.G = G;
  p.ng = K / G;
  p.nc = (K / 2 + CB - 1) / CB;
  p.xp.assign(p.nc * 2 * CB + 64, 0);
  p.sxv.assign(p.nc * CB / 2 + 16, 0.f);
  p.sxg.assign(p.ng + 16, 0.f);
  p.T.assign(p.ng + 16, 0.f);
  const int8_t* xq = p.a.xq.data();
  // group g's bytes [g*G/2, (g+1)*G/2) meet x[g*G + i] (low) and x[g*G + G/2 + i] (high)
  for (int64_t g = 0; g < p.ng; ++g) {
    for (int64_t i = 0; i < half; i += std::min(half, CB)) {
      const int64_t byte = g * half + i, c = byte / CB, j = byte % CB, n = std::min(half, CB);
      std::memcpy(p.xp.data() + 2 * CB * c + j, xq + g * G + i, n);
      std::memcpy(p.xp.data() + 2 * CB * c + CB + j, xq + g * G + half + i, n);
      for (int64_t l = j / 4; l < (j + n) / 4; ++l) {
        const int64_t i_l = i + 4 * l - j;  // the lane's first byte, within the group
        p.sxv[CB / 2 * c + l] = p.a.sx[(g * G + i_l) / 32];
        p.sxv[CB / 2 * c + CB / 4 + l] = p.a.sx[(g * G + half + i_l) / 32];
      }
    }
    double t = 0;
    for (int64_t b = g * G / 32; b < (g + 1) * G / 32; ++b) t += (double)p.a.sx[b] * p.a.S[b];
    p.T[g] = (float)t;
    if (G == 32) p.sxg[g] = p.a.sx[g];
  }
}

#if defined(QWEN2_AVX512)
template <typename ST>
inline __m512 ld16(const ST* p, __mmask16 m);
template <>
inline __m512 ld16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
template <>
inline __m512 ld16(const bf16_t* p, __mmask16 m) { return bf16x16m(p, m); }
inline __m512 ldz16(const uint8_t* z, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, z)));
}

// One row at a time (several interleaved rows confuse the hardware prefetcher: measured 2-3x
// slower). Groups go in blocks of 16 (one zmm F of scales; each chunk's lanes get theirs by vpermps).
// G == 32: a 64-byte chunk holds 4 groups (lanes 4m..4m+3: group m), each lane's low and high
// nibbles meet the same activation block (the group), so both products add up in int32 and are
// scaled by F = s * sx of their group. G >= 64: lanes 0-7 / 8-15 of the low-nibble product meet one
// activation block each, those of the high-nibble product two others (scales sxv); G == 64: lanes
// 0-7 group 2j, 8-15 group 2j+1; G >= 128: the chunk lies in one group.
template <int NR, bool ASYM, int G, typename ST>
void i4_rows(const uint8_t* W, int64_t K, const ST* sc, const uint8_t* zp, int64_t n0, const Act4& p, float* y) {
  static_assert(NR == 1, "AVX512 int4 rows go one at a time");
  constexpr int64_t BB = 16 * G / 2;  // bytes per block of 16 groups
  const int64_t ng = p.ng, rb = K / 2;
  const uint8_t* w = W + n0 * rb;
  const ST* srow = sc + n0 * ng;
  // four accumulators (chunk j of a block goes to acc[j % 4]: short dependency chains, so that
  // rows overlap in the out-of-order window); the zero-point terms -s*z*T go into acc[3]
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  // the per-chunk group scales come out of the block's register F by vpermps (no store/reload)
  constexpr int GPC = G <= 128 ? 128 / G : 1;  // groups per chunk (G >= 256: 1, a chunk per half-group)
  const __m512i idx0 = G == 32   ? _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
                       : G == 64 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                 : _mm512_setzero_si512();
  for (int64_t g0 = 0; g0 < ng; g0 += 16) {
    const int64_t left = std::min<int64_t>(16, ng - g0);
    const __mmask16 m = (__mmask16)((1u << left) - 1);
    const __m512 s = ld16(srow + g0, m);
    const __m512 z = ASYM ? ldz16(zp + n0 * ng + g0, m) : _mm512_set1_ps(8.f);
    acc[3] = _mm512_fnmadd_ps(_mm512_mul_ps(s, z), _mm512_loadu_ps(p.T.data() + g0), acc[3]);
    const __m512 F = G == 32 ? _mm512_mul_ps(s, _mm512_loadu_ps(p.sxg.data() + g0)) : s;
    const int64_t b0 = g0 * (G / 2), b1 = std::min(rb, b0 + BB);
    const int64_t nfull = (b1 - b0) / 64, tail = (b1 - b0) % 64;  // tail: last block only
    const uint8_t* wb = w + b0;
    const int8_t* xb = p.xp.data() + 2 * b0;
    const float* sv = p.sxv.data() + b0 / 2;
    auto step = [&](__m512i wv, int64_t j, __m512& acc) {
#if defined(__GFNI__)
      // high nibbles: one affine byte transform (bit i of the result = bit i + 4 of the byte)
      const __m512i lo = _mm512_and_si512(wv, m4), hi = _mm512_gf2p8affine_epi64_epi8(wv, _mm512_set1_epi64(0x1020408000000000LL), 0);
#else
      const __m512i lo = _mm512_and_si512(wv, m4), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4);
#endif
      const __m512i xlo = _mm512_loadu_si512(xb + 128 * j), xhi = _mm512_loadu_si512(xb + 128 * j + 64);
      const __m512i ix = _mm512_add_epi32(idx0, _mm512_set1_epi32((int)(G <= 128 ? GPC * j : j * 128 / G)));
      const __m512 fs = _mm512_permutexvar_ps(ix, F);
      if constexpr (G == 32) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo), hi, xhi);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), fs, acc);
      } else {
        const __m512i dlo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo);
        const __m512i dhi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xhi);
        const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dhi), _mm512_loadu_ps(sv + 32 * j + 16),
                                         _mm512_mul_ps(_mm512_cvtepi32_ps(dlo), _mm512_loadu_ps(sv + 32 * j)));
        acc = _mm512_fmadd_ps(t, fs, acc);
      }
    };
    if (b1 - b0 == BB) {  // a full block: a constant trip count (unrolled, constant indices)
      for (int64_t j = 0; j < BB / 64; ++j) step(_mm512_loadu_si512(wb + 64 * j), j, acc[j % 4]);
    } else {
      int64_t j = 0;
      for (; j + 1 < nfull; j += 2) {
        step(_mm512_loadu_si512(wb + 64 * j), j, acc[0]);
        step(_mm512_loadu_si512(wb + 64 * j + 64), j + 1, acc[1]);
      }
      if (j < nfull) step(_mm512_loadu_si512(wb + 64 * j), j, acc[2]);
      if (tail) step(_mm512_maskz_loadu_epi8((~0ULL) >> (64 - tail), wb + 64 * nfull), nfull, acc[0]);
    }
  }
  y[n0] = hsum(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

#elif defined(QWEN2_AVX2)
// 8 scales / zeros as fp32; a partial last block goes through a zero-padded copy
template <typename ST>
inline __m256 ld8(const ST* p, int64_t n);
template <>
inline __m256 ld8(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return _mm256_loadu_ps(t);
}
template <>
inline __m256 ld8(const bf16_t* p, int64_t n) {
  __m128i v;
  if (n >= 8) {
    v = _mm_loadu_si128((const __m128i*)p);
  } else {
    bf16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; ++i) t[i] = p[i];
    v = _mm_loadu_si128((const __m128i*)t);
  }
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 ldz8(const uint8_t* z, int64_t n) {
  uint64_t u = 0;
  std::memcpy(&u, z, std::min<int64_t>(8, n));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)u)));
}

template <int NR, bool ASYM, typename ST>
void i4_rows_g32(const uint8_t* W, int64_t K, const ST* sc, const uint8_t* zp, int64_t n0, const Act4& p, float* y) {
  const int64_t ng = p.ng, rb = K / 2;
  __m256 acc[NR], zacc[NR], F[NR];
  for (int r = 0; r < NR; ++r) acc[r] = zacc[r] = _mm256_setzero_ps();
  const __m256i base = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
  const __m256i two = _mm256_set1_epi32(2), m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t g0 = 0; g0 < ng; g0 += 8) {
    const int64_t left = std::min<int64_t>(8, ng - g0);
    const __m256 sxg = _mm256_loadu_ps(p.sxg.data() + g0), T = _mm256_loadu_ps(p.T.data() + g0);
    for (int r = 0; r < NR; ++r) {
      const __m256 s = ld8(sc + (n0 + r) * ng + g0, left);
      F[r] = _mm256_mul_ps(s, sxg);
      const __m256 z = ASYM ? ldz8(zp + (n0 + r) * ng + g0, left) : _mm256_set1_ps(8.f);
      zacc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s, z), T, zacc[r]);
    }
    const int64_t nch = (left + 1) / 2, nfull = left / 2;
    __m256i idx = base;
    for (int64_t j = 0; j < nch; ++j) {
      const int64_t c = g0 / 2 + j;
      const __m256i xlo = _mm256_loadu_si256((const __m256i*)(p.xp.data() + 64 * c));
      const __m256i xhi = _mm256_loadu_si256((const __m256i*)(p.xp.data() + 64 * c + 32));
      for (int r = 0; r < NR; ++r) {
        const uint8_t* wp = W + (n0 + r) * rb + 32 * c;
        const __m256i wv = j < nfull ? _mm256_loadu_si256((const __m256i*)wp)
                                     : _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128((const __m128i*)wp), 0);
        const __m256i lo = _mm256_and_si256(wv, m4), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4);
        // q (0..15) x xq: pairs at most 2 * 15 * 127, low + high at most 7620: no saturation
        __m256i d = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
        d = _mm256_madd_epi16(d, ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_permutevar8x32_ps(F[r], idx), acc[r]);
      }
      idx = _mm256_add_epi32(idx, two);
    }
  }
  for (int r = 0; r < NR; ++r) y[n0 + r] = hsum(acc[r]) - hsum(zacc[r]);
}

template <int NR, bool ASYM, int G, typename ST>
void i4_rows_big(const uint8_t* W, int64_t K, const ST* sc, const uint8_t* zp, int64_t n0, const Act4& p, float* y) {
  constexpr int CPG = G / 64;
  const int64_t ng = p.ng, rb = K / 2;
  __m256 acc[NR], zacc[NR], s[NR], ag[NR];
  for (int r = 0; r < NR; ++r) acc[r] = zacc[r] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t g0 = 0; g0 < ng; g0 += 8) {
    const int64_t left = std::min<int64_t>(8, ng - g0);
    const __m256 T = _mm256_loadu_ps(p.T.data() + g0);
    for (int r = 0; r < NR; ++r) {
      s[r] = ld8(sc + (n0 + r) * ng + g0, left);
      const __m256 z = ASYM ? ldz8(zp + (n0 + r) * ng + g0, left) : _mm256_set1_ps(8.f);
      zacc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s[r], z), T, zacc[r]);
    }
    for (int64_t j = 0; j < left; ++j) {
      for (int r = 0; r < NR; ++r) ag[r] = _mm256_setzero_ps();
      for (int cc = 0; cc < CPG; ++cc) {
        const int64_t c = (g0 + j) * CPG + cc;
        const __m256i xlo = _mm256_loadu_si256((const __m256i*)(p.xp.data() + 64 * c));
        const __m256i xhi = _mm256_loadu_si256((const __m256i*)(p.xp.data() + 64 * c + 32));
        const __m256 slo = _mm256_loadu_ps(p.sxv.data() + 16 * c), shi = _mm256_loadu_ps(p.sxv.data() + 16 * c + 8);
        for (int r = 0; r < NR; ++r) {
          const __m256i wv = _mm256_loadu_si256((const __m256i*)(W + (n0 + r) * rb + 32 * c));
          const __m256i lo = _mm256_and_si256(wv, m4), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4);
          const __m256i dlo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xlo), ones);
          const __m256i dhi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xhi), ones);
          ag[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dlo), slo, ag[r]);
          ag[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dhi), shi, ag[r]);
        }
      }
      const __m256i jv = _mm256_set1_epi32((int)j);
      for (int r = 0; r < NR; ++r) acc[r] = _mm256_fmadd_ps(ag[r], _mm256_permutevar8x32_ps(s[r], jv), acc[r]);
    }
  }
  for (int r = 0; r < NR; ++r) y[n0 + r] = hsum(acc[r]) - hsum(zacc[r]);
}

#else
// scalar: the same math on the plain activation order
template <int NR, bool ASYM, int G, typename ST>
void i4_rows_scalar(const uint8_t* W, int64_t K, const ST* sc, const uint8_t* zp, int64_t n0, const Act4& p, float* y) {
  const int64_t ng = p.ng, rb = K / 2;
  const int8_t* xq = p.a.xq.data();
  for (int r = 0; r < NR; ++r) {
    const int64_t n = n0 + r;
    const uint8_t* w = W + n * rb;
    float t = 0.f;
    for (int64_t g = 0; g < ng; ++g) {
      const float s = ld1(sc + n * ng + g);
      const int32_t z = ASYM ? zp[n * ng + g] : 8;
      const uint8_t* wg = w + g * (G / 2);
      float tg = 0.f;
      for (int64_t b = 0; b < G / 32; ++b) {
        int32_t acc = 0;
        for (int64_t i = 32 * b; i < 32 * b + 32; ++i) {
          const int32_t q = i < G / 2 ? (wg[i] & 15) : (wg[i - G / 2] >> 4);
          acc += q * xq[g * G + i];
        }
        const int64_t blk = g * G / 32 + b;
        tg += p.a.sx[blk] * (float)(acc - z * p.a.S[blk]);
      }
      t += s * tg;
    }
    y[n] = t;
  }
}
#endif

#if !defined(QWEN2_AVX512)
template <int NR, bool ASYM, int G, typename ST>
inline void i4_rows(const uint8_t* W, int64_t K, const ST* sc, const uint8_t* zp, int64_t n0, const Act4& p, float* y) {
#if defined(QWEN2_AVX2)
  if constexpr (G == 32) {
    i4_rows_g32<NR, ASYM>(W, K, sc, zp, n0, p, y);
  } else {
    i4_rows_big<NR, ASYM, G>(W, K, sc, zp, n0, p, y);
  }
#else
  i4_rows_scalar<NR, ASYM, G>(W, K, sc, zp, n0, p, y);
#endif
}
#endif

template <bool ASYM, int G, typename ST>
void i4_run(const uint8_t* W, int64_t N, int64_t K, const ST* sc, const uint8_t* zp, const Act4& p, float* y) {
  const int64_t tiles = (N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, R * K / 2));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * R;
      if (n0 + R <= N) {
        i4_rows<R, ASYM, G>(W, K, sc, zp, n0, p, y);
      } else {
        for (int64_t n = n0; n < N; ++n) i4_rows<1, ASYM, G>(W, K, sc, zp, n, p, y);
      }
    }
  });
}

template <bool ASYM, typename ST>
void i4_dispatch_g(int64_t G, const uint8_t* W, int64_t N, int64_t K, const ST* sc, const uint8_t* zp, const Act4& p, float* y) {
  switch (G) {
    case 32: return i4_run<ASYM, 32>(W, N, K, sc, zp, p, y);
    case 64: return i4_run<ASYM, 64>(W, N, K, sc, zp, p, y);
    case 128: return i4_run<ASYM, 128>(W, N, K, sc, zp, p, y);
    case 256: return i4_run<ASYM, 256>(W, N, K, sc, zp, p, y);
  }
  TORCH_CHECK(false, "int4_gemv: group_size must be 32, 64, 128 or 256, not ", G);
}

}  // namespace

at::Tensor int4_gemv(const at::Tensor& x_, const at::Tensor& qweight, const at::Tensor& scales_,
                     const std::optional<at::Tensor>& zeros_, int64_t G) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2, "int4_gemv: qweight must be uint8 [N, K/2]");
  TORCH_CHECK(G == 32 || G == 64 || G == 128 || G == 256, "int4_gemv: group_size must be 32, 64, 128 or 256, not ", G);
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  check_x(x_, K, "int4_gemv");
  TORCH_CHECK(K % G == 0, "int4_gemv: K = ", K, " is not a multiple of group_size ", G);
  const int64_t ng = K / G;
  TORCH_CHECK(scales_.dim() == 2 && scales_.size(0) == N && scales_.size(1) == ng, "int4_gemv: scales must be [N, K/G] = [",
              N, ", ", ng, "], got ", scales_.sizes());
  at::Tensor zeros;
  if (zeros_.has_value() && zeros_->defined()) {
    zeros = zeros_->contiguous();
    TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.dim() == 2 && zeros.size(0) == N && zeros.size(1) == ng,
                "int4_gemv: zeros must be uint8 [N, K/G]");
  }
  const at::Tensor x = x_.contiguous(), W = qweight.contiguous(), sc = scales_f(scales_);
  at::Tensor y = at::empty(out_shape(x_, N), x_.options().dtype(at::kFloat));
  if (N == 0) return y;
  Act4 p;
  quantize_x(x, K, p.a);
  prep4(p, G);
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = W.data_ptr<uint8_t>();
  const uint8_t* zp = zeros.defined() ? zeros.data_ptr<uint8_t>() : nullptr;
  const bool f32 = sc.scalar_type() == at::kFloat;
  const float* sf = f32 ? sc.data_ptr<float>() : nullptr;
  const bf16_t* sb = f32 ? nullptr : reinterpret_cast<const bf16_t*>(sc.data_ptr());
  if (zp) {
    if (f32) i4_dispatch_g<true>(G, wp, N, K, sf, zp, p, yp);
    else i4_dispatch_g<true>(G, wp, N, K, sb, zp, p, yp);
  } else {
    if (f32) i4_dispatch_g<false>(G, wp, N, K, sf, zp, p, yp);
    else i4_dispatch_g<false>(G, wp, N, K, sb, zp, p, yp);
  }
  return y;
}

}  // namespace QWEN2_NS
