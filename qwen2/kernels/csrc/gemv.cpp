// One-row (decode) matrix-vector products over int8 / int4 weights with integer dot products.
//
// Both ops quantize the activation row x to int8 in blocks of 32 (llama.cpp's Q8_0 activations):
//     sx_b = amax_b / 127 (fp32),  xq_k = round_half_even(x_k * (127 / amax_b)) in -127..127
// and then compute, per output row n, with exact int32 block dot products:
//     int8:  y_n = s_n * sum_b sx_b * sum_{k in b} xq_k * w_nk
//     int4:  y_n = sum_g s_ng * sum_{b in g} sx_b * (sum_{k in b} q_nk * xq_k - z_ng * S_b),
//            S_b = sum_{k in b} xq_k, z_ng = zeros[n, g] (8 when zeros is None)
// in fp32 from there on. The only approximation beyond fp32 rounding is the activation rounding,
// |x_k - sx_b * xq_k| <= sx_b / 2 = amax_b / 254, so |y_n - exact_n| <= sum_b amax_b / 254 *
// sum_{k in b} |w_nk| (plus fp32 accumulation error).
//
// Layouts: int8 qweight int8 [N, K]; int4 qweight uint8 [N, K/2] in "halves" order (byte i of
// group g holds q[g*G + i] in its low nibble and q[g*G + G/2 + i] in its high one), scales
// [N, K/G], zeros uint8 [N, K/G] or None. The kernels read these as they are; the activation row
// is permuted once per call instead, so that every 32-byte load of weights meets its activations.
//
// Code paths, chosen at compile time (-march=native): AVX512-VNNI (vpdpbusd; int4 high nibbles by
// GFNI vgf2p8affineqb where the CPU has it), AVX2+FMA (vpmaddubsw + vpmaddwd), and scalar. Rows are
// split over torch's intra-op threads.
//
// bf16_gemv (below) does not quantize: fp32 accumulation of bf16 weights times a bf16/fp32 x.
// f32_linear (below): fp32 weights in a packed layout, any number of rows (one-row decode and batches).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define QWEN2_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define QWEN2_AVX2 1
#include <immintrin.h>
#endif

#ifndef QWEN2_NS
#define QWEN2_NS qwen2
#endif

namespace {

using bf16_t = uint16_t;

inline float ld1(const float* p) { return *p; }
inline float ld1(const bf16_t* p) {
  uint32_t u = uint32_t(*p) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ----------------------------------------------------------------------------- activations
// xq: int8, zero-padded to a multiple of 64; sx, S: per block of 32 (padded with zeros).
struct Act {
  int64_t K = 0, nb = 0;
  std::vector<int8_t> xq;
  std::vector<float> sx;
  std::vector<int32_t> S;
};

template <typename XT>
void quantize_act(const XT* x, int64_t K, Act& a) {
  a.K = K;
  a.nb = (K + 31) / 32;
  const int64_t kp = (K + 63) / 64 * 64;
  a.xq.assign(kp, 0);
  a.sx.assign(a.nb + 16, 0.f);
  a.S.assign(a.nb + 16, 0);
  for (int64_t b = 0; b < a.nb; ++b) {
    const int64_t k0 = b * 32, n = std::min<int64_t>(32, K - k0);
    float v[32];
    for (int64_t i = 0; i < 32; ++i) v[i] = i < n ? ld1(x + k0 + i) : 0.f;
    int8_t* q = a.xq.data() + k0;
#if defined(QWEN2_AVX512)
    __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
    __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
    a.S[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    _mm_storeu_si128((__m128i*)q, _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtsepi32_epi8(q1));
#else
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t s = 0;
    for (int i = 0; i < 32; ++i) {
      const int32_t qi = (int32_t)std::nearbyint(v[i] * inv);  // round half to even
      q[i] = (int8_t)qi;
      s += qi;
    }
    a.S[b] = s;
#endif
    a.sx[b] = amax / 127.f;
  }
}

void quantize_x(const at::Tensor& x, int64_t K, Act& a) {
  if (x.scalar_type() == at::kFloat) {
    quantize_act(x.data_ptr<float>(), K, a);
  } else if (x.scalar_type() == at::kBFloat16) {
    quantize_act(reinterpret_cast<const bf16_t*>(x.data_ptr()), K, a);
  } else {
    at::Tensor xf = x.to(at::kFloat).contiguous();
    quantize_act(xf.data_ptr<float>(), K, a);
  }
}

#if defined(QWEN2_AVX512)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#elif defined(QWEN2_AVX2)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// Row tiles: R rows share every activation load. 1 is fastest on the AVX512 machine measured
// (interleaved rows 2-3x slower from DRAM: the prefetcher loses the streams); the AVX2 and scalar
// kernels take any R.
#ifndef QWEN2_ROWS
#define QWEN2_ROWS 1
#endif
constexpr int R = QWEN2_ROWS;

// ----------------------------------------------------------------------------- int8
struct Act8 {
  Act a;
  std::vector<float> sxv;  // AVX512: per 64-byte chunk, 16 lanes [sx_2c x8, sx_2c+1 x8]
  float C = 0.f;           // AVX512: 128 * sum_b sx_b * S_b (the w + 128 offset of vpdpbusd)
};

void prep8(Act8& p) {
#if defined(QWEN2_AVX512)
  const int64_t nc = (p.a.K + 63) / 64;
  p.sxv.assign(nc * 16 + 16, 0.f);
  double c = 0;
  for (int64_t ch = 0; ch < nc; ++ch)
    for (int l = 0; l < 16; ++l) p.sxv[ch * 16 + l] = p.a.sx[2 * ch + l / 8];
  for (int64_t b = 0; b < p.a.nb; ++b) c += 128.0 * p.a.sx[b] * p.a.S[b];
  p.C = (float)c;
#endif
}

template <int NR, typename ST>
void i8_rows(const int8_t* W, int64_t K, const ST* sc, int64_t n0, const Act8& p, float* y) {
  const int8_t* w[NR];
  for (int r = 0; r < NR; ++r) w[r] = W + (n0 + r) * K;
#if defined(QWEN2_AVX512)
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const int64_t nfull = K / 64;
  for (int64_t c = 0; c < nfull; ++c) {
    const __m512i xv = _mm512_loadu_si512(p.a.xq.data() + 64 * c);
    const __m512 sv = _mm512_loadu_ps(p.sxv.data() + 16 * c);
    for (int r = 0; r < NR; ++r) {
      __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w[r] + 64 * c), flip);  // w + 128, as u8
      __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, acc[r]);
    }
  }
  if (K % 64) {
    const __mmask64 m = (~0ULL) >> (64 - K % 64);
    const __m512i xv = _mm512_loadu_si512(p.a.xq.data() + 64 * nfull);  // zero-padded
    const __m512 sv = _mm512_loadu_ps(p.sxv.data() + 16 * nfull);
    for (int r = 0; r < NR; ++r) {
      __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w[r] + 64 * nfull), flip);
      __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, acc[r]);
    }
  }
  for (int r = 0; r < NR; ++r) y[n0 + r] = ld1(sc + n0 + r) * (hsum(acc[r]) - p.C);
#elif defined(QWEN2_AVX2)
  __m256 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t nfull = K / 32;
  for (int64_t b = 0; b < nfull; ++b) {
    const __m256i xv = _mm256_loadu_si256((const __m256i*)(p.a.xq.data() + 32 * b));
    const __m256 sv = _mm256_broadcast_ss(p.a.sx.data() + b);
    for (int r = 0; r < NR; ++r) {
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(w[r] + 32 * b));
      // |w| * (x with w's sign): u8 x s8 pairs, at most 2 * 128 * 127 < 2^15 (no saturation)
      __m256i d = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
      d = _mm256_madd_epi16(d, ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sv, acc[r]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    float t = hsum(acc[r]);
    if (K % 32) {
      int32_t s = 0;
      for (int64_t k = nfull * 32; k < K; ++k) s += (int32_t)w[r][k] * p.a.xq[k];
      t += p.a.sx[nfull] * (float)s;
    }
    y[n0 + r] = ld1(sc + n0 + r) * t;
  }
#else
  for (int r = 0; r < NR; ++r) {
    float t = 0.f;
    for (int64_t b = 0; b < p.a.nb; ++b) {
      int32_t s = 0;
      const int64_t k1 = std::min<int64_t>(K, 32 * b + 32);
      for (int64_t k = 32 * b; k < k1; ++k) s += (int32_t)w[r][k] * p.a.xq[k];
      t += p.a.sx[b] * (float)s;
    }
    y[n0 + r] = ld1(sc + n0 + r) * t;
  }
#endif
}

template <typename ST>
void i8_run(const int8_t* W, int64_t N, int64_t K, const ST* sc, const Act8& p, float* y) {
  const int64_t tiles = (N + R - 1) / R;
  // at least ~64 KiB of weights per task, so that small matrices do not pay for a fork
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, R * K));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * R;
      if (n0 + R <= N) {
        i8_rows<R>(W, K, sc, n0, p, y);
      } else {
        for (int64_t n = n0; n < N; ++n) i8_rows<1>(W, K, sc, n, p, y);
      }
    }
  });
}

// ----------------------------------------------------------------------------- int4
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
inline __m512 ld16(const bf16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
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

// ----------------------------------------------------------------------------- bf16
std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N);

// y_n = sum_k w_nk * x_k in fp32, weights bf16 [N, K] row-major as nn.Linear holds them. Every path
// keeps at least 32 independent fp32 partial sums per row (lane j sums the products of k = j mod 32
// (AVX512: k mod 64, pairs), in order), then adds them up pairwise-ish; the products of a bf16 x
// with bf16 weights are exact in fp32 (8 + 8 significant bits), those of an fp32 x are rounded once
// (FMA: not at all). So |y_n - exact_n| <= (K/32 + 8) * 2^-24 * sum_k |w_nk * x_k| (+ denormals:
// vdpbf16ps treats denormal inputs as zero and flushes denormal results, 2^-126 each at most).
//
// Paths: AVX512-BF16 vdpbf16ps on bf16 pairs (bf16 x); AVX512F / AVX2 bf16 -> fp32 by a 16-bit
// shift and FMA (fp32 x, or no AVX512-BF16); scalar.
#if defined(QWEN2_AVX512)
inline __m512 bf16x16(const bf16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 bf16x16m(const bf16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
#if defined(__AVX512BF16__)
#define QWEN2_BF16DP 1
// x bf16, zero-padded to a multiple of 128 (xp); 4 accumulators of 16 lanes over 128 weights
inline float bf16_row_dp(const bf16_t* w, const bf16_t* xp, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const int64_t n128 = K / 128;
  for (int64_t c = 0; c < n128; ++c) {
    const bf16_t* wc = w + 128 * c;
    const bf16_t* xc = xp + 128 * c;
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(xc), (__m512bh)_mm512_loadu_si512(wc));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(xc + 32), (__m512bh)_mm512_loadu_si512(wc + 32));
    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(xc + 64), (__m512bh)_mm512_loadu_si512(wc + 64));
    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(xc + 96), (__m512bh)_mm512_loadu_si512(wc + 96));
  }
  for (int64_t k = 128 * n128, j = 0; k < K; k += 32, ++j) {  // up to 4 more (masked) loads
    const int64_t left = std::min<int64_t>(32, K - k);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((~0ULL) >> (64 - left)), w + k);
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + k);
    if (j == 0) a0 = _mm512_dpbf16_ps(a0, xv, wv);
    else if (j == 1) a1 = _mm512_dpbf16_ps(a1, xv, wv);
    else if (j == 2) a2 = _mm512_dpbf16_ps(a2, xv, wv);
    else a3 = _mm512_dpbf16_ps(a3, xv, wv);
  }
  return hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#endif
// x fp32, zero-padded to a multiple of 64
inline float bf16_row_fma(const bf16_t* w, const float* xp, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const int64_t n64 = K / 64;
  for (int64_t c = 0; c < n64; ++c) {
    const bf16_t* wc = w + 64 * c;
    const float* xc = xp + 64 * c;
    a0 = _mm512_fmadd_ps(bf16x16(wc), _mm512_loadu_ps(xc), a0);
    a1 = _mm512_fmadd_ps(bf16x16(wc + 16), _mm512_loadu_ps(xc + 16), a1);
    a2 = _mm512_fmadd_ps(bf16x16(wc + 32), _mm512_loadu_ps(xc + 32), a2);
    a3 = _mm512_fmadd_ps(bf16x16(wc + 48), _mm512_loadu_ps(xc + 48), a3);
  }
  for (int64_t k = 64 * n64, j = 0; k < K; k += 16, ++j) {
    const int64_t left = std::min<int64_t>(16, K - k);
    const __m512 t = _mm512_mul_ps(bf16x16m(w + k, (__mmask16)((1u << left) - 1)), _mm512_loadu_ps(xp + k));
    if (j == 0) a0 = _mm512_add_ps(a0, t);
    else if (j == 1) a1 = _mm512_add_ps(a1, t);
    else if (j == 2) a2 = _mm512_add_ps(a2, t);
    else a3 = _mm512_add_ps(a3, t);
  }
  return hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#elif defined(QWEN2_AVX2)
inline __m256 bf16x8(const bf16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
// x fp32 (a bf16 x is widened exactly), zero-padded to a multiple of 32; 4 x 8 lanes
inline float bf16_row_fma(const bf16_t* w, const float* xp, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const int64_t n32 = K / 32;
  for (int64_t c = 0; c < n32; ++c) {
    const bf16_t* wc = w + 32 * c;
    const float* xc = xp + 32 * c;
    a0 = _mm256_fmadd_ps(bf16x8(wc), _mm256_loadu_ps(xc), a0);
    a1 = _mm256_fmadd_ps(bf16x8(wc + 8), _mm256_loadu_ps(xc + 8), a1);
    a2 = _mm256_fmadd_ps(bf16x8(wc + 16), _mm256_loadu_ps(xc + 16), a2);
    a3 = _mm256_fmadd_ps(bf16x8(wc + 24), _mm256_loadu_ps(xc + 24), a3);
  }
  if (K % 32) {  // a zero-padded copy of the last partial 32 weights
    alignas(32) bf16_t t[32] = {0};
    std::memcpy(t, w + 32 * n32, (K % 32) * sizeof(bf16_t));
    const float* xc = xp + 32 * n32;
    a0 = _mm256_fmadd_ps(bf16x8(t), _mm256_loadu_ps(xc), a0);
    a1 = _mm256_fmadd_ps(bf16x8(t + 8), _mm256_loadu_ps(xc + 8), a1);
    a2 = _mm256_fmadd_ps(bf16x8(t + 16), _mm256_loadu_ps(xc + 16), a2);
    a3 = _mm256_fmadd_ps(bf16x8(t + 24), _mm256_loadu_ps(xc + 24), a3);
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}
#else
inline float bf16_row_fma(const bf16_t* w, const float* xp, int64_t K) {
  float a[32] = {0};
  const int64_t n32 = K / 32;
  for (int64_t c = 0; c < n32; ++c)
    for (int j = 0; j < 32; ++j) a[j] += ld1(w + 32 * c + j) * xp[32 * c + j];
  for (int64_t k = 32 * n32; k < K; ++k) a[k - 32 * n32] += ld1(w + k) * xp[k];
  for (int h = 16; h >= 1; h /= 2)
    for (int j = 0; j < h; ++j) a[j] += a[j + h];
  return a[0];
}
#endif

at::Tensor bf16_gemv(const at::Tensor& x_, const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2,
              "bf16_gemv: weight must be bfloat16 [N, K], got ", weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(weight.device().is_cpu(), "bf16_gemv: CPU tensors only");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x_.device().is_cpu(), "bf16_gemv: CPU tensors only");
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) == K && x_.numel() == K, "bf16_gemv: x must be one row of ", K,
              " values ([K] or [1, K]), got ", x_.sizes());
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16 || x_.scalar_type() == at::kFloat,
              "bf16_gemv: x must be bfloat16 or float32, got ", x_.scalar_type());
  const at::Tensor W = weight.contiguous();
  at::Tensor y = at::empty(out_shape(x_, N), x_.options().dtype(at::kFloat));
  if (N == 0) return y;
  const at::Tensor x = x_.contiguous();
  const bf16_t* wp = reinterpret_cast<const bf16_t*>(W.data_ptr());
  float* yp = y.data_ptr<float>();
  const int64_t kp = (K + 127) / 128 * 128;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, 2 * K));
#if defined(QWEN2_BF16DP)
  if (x.scalar_type() == at::kBFloat16) {
    std::vector<bf16_t> xp(kp, 0);
    std::memcpy(xp.data(), x.data_ptr(), K * sizeof(bf16_t));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) yp[n] = bf16_row_dp(wp + n * K, xp.data(), K);
    });
    return y;
  }
#endif
  std::vector<float> xp(kp, 0.f);
  if (x.scalar_type() == at::kFloat) {
    std::memcpy(xp.data(), x.data_ptr<float>(), K * sizeof(float));
  } else {
    const bf16_t* xb = reinterpret_cast<const bf16_t*>(x.data_ptr());
    for (int64_t k = 0; k < K; ++k) xp[k] = ld1(xb + k);
  }
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) yp[n] = bf16_row_fma(wp + n * K, xp.data(), K);
  });
  return y;
}

// ----------------------------------------------------------------------------- thread pool
// The serving kernels below split their work over qwen2's own threads instead of OpenMP's.
// With OMP_WAIT_POLICY=PASSIVE (what `qwen2 serve` runs under, for shared machines), every OpenMP
// region wakes its sleeping worker and, at the end, the waiting caller: in this VM that measured
// ~0.2 ms a region, ~23 ms of a 70 ms one-row decode step (97 regions). Spinning OpenMP threads
// avoid that on an idle machine but made steps 5-10x slower when other processes held the cores
// (a spinning thread holds a core the caller needs, and a static split waits for a descheduled
// thread's whole half). Here instead:
//   * workers spin between jobs (pause, and sched_yield so that anything else runnable goes
//     first), and sleep after 2 ms without work (between requests);
//   * a job is cut into chunks that participants claim one at a time (one atomic word: job
//     generation | chunk count | next chunk), the caller included: a worker that is not running
//     takes no chunk, the caller does the work itself and waits for at most one chunk in flight.
// Chunks are whole output tiles, each computed by one thread in a fixed order, so results do not
// depend on who ran what. One job at a time (a mutex); workers: torch's intra-op thread count - 1.
namespace pool {

using Fn = void (*)(const void*, int64_t, int64_t);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

struct Pool {
  std::atomic<uint64_t> state{0};  // generation (32 bits) | chunks (16) | next chunk (16)
  std::atomic<int64_t> done{0};    // chunks finished in the current job
  std::atomic<Fn> fn{nullptr};
  std::atomic<const void*> ctx{nullptr};
  std::atomic<int64_t> n{0}, csize{1};
  std::atomic<int> sleepers{0}, allowed{0};
  std::mutex m, run_mu;
  std::condition_variable cv;
  int nworkers = 0;
  pid_t pid = getpid();
  uint32_t gen = 0;
};

Pool& get() {
  static Pool* p = new Pool();  // never destroyed: workers may still wait on it at exit
  return *p;
}

// claim and run chunks of job g until none is left (or another job has started)
inline void participate(Pool& p, uint32_t g) {
  for (;;) {
    uint64_t s = p.state.load(std::memory_order_acquire);
    if ((uint32_t)(s >> 32) != g) return;
    const int64_t chunks = (s >> 16) & 0xFFFF, idx = s & 0xFFFF;
    if (idx >= chunks) return;
    const Fn f = p.fn.load(std::memory_order_relaxed);
    const void* c = p.ctx.load(std::memory_order_relaxed);
    const int64_t n = p.n.load(std::memory_order_relaxed), cs = p.csize.load(std::memory_order_relaxed);
    // the fields belong to job g if the claim succeeds: a new job is only posted once every chunk
    // of this one is claimed and finished, which changes the word compared here
    if (!p.state.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
    f(c, idx * cs, std::min(n, idx * cs + cs));
    p.done.fetch_add(1, std::memory_order_release);
  }
}

void worker(Pool* p, int id) {
  uint32_t seen = (uint32_t)(p->state.load() >> 32);
  for (;;) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0;; ++i) {
      const uint32_t g = (uint32_t)(p->state.load(std::memory_order_acquire) >> 32);
      if (g != seen) {
        seen = g;
        break;
      }
      if (i % 64 != 63) {
        cpu_relax();
        continue;
      }
      sched_yield();
      // no job for 2 ms, or not one of this job's threads (torch's thread count went down): sleep
      if (std::chrono::steady_clock::now() - t0 > std::chrono::milliseconds(2) ||
          id >= p->allowed.load(std::memory_order_relaxed)) {
        std::unique_lock<std::mutex> lk(p->m);
        p->sleepers.fetch_add(1);
        p->cv.wait(lk, [&] { return (uint32_t)(p->state.load() >> 32) != seen; });
        p->sleepers.fetch_sub(1);
        t0 = std::chrono::steady_clock::now();
      }
    }
    if (id < p->allowed.load(std::memory_order_relaxed)) participate(*p, seen);
  }
}

// fn(ctx, b, e) over [b, e) chunks of [0, n) of csize items each, on this thread and the workers
void run(int64_t n, int64_t csize, Fn fn, const void* ctx) {
  Pool& p = get();
  csize = std::max<int64_t>(csize, (n + 0xFFFE) / 0xFFFF);
  const int64_t chunks = (n + csize - 1) / csize;
  const int threads = at::get_num_threads();
  if (chunks <= 1 || threads <= 1 || getpid() != p.pid) {
    fn(ctx, 0, n);
    return;
  }
  std::lock_guard<std::mutex> run_lock(p.run_mu);
  while (p.nworkers < threads - 1) std::thread(worker, &p, p.nworkers++).detach();
  p.allowed.store(threads - 1, std::memory_order_relaxed);
  p.fn.store(fn, std::memory_order_relaxed);
  p.ctx.store(ctx, std::memory_order_relaxed);
  p.n.store(n, std::memory_order_relaxed);
  p.csize.store(csize, std::memory_order_relaxed);
  p.done.store(0, std::memory_order_relaxed);
  const uint32_t g = ++p.gen;
  p.state.store(((uint64_t)g << 32) | ((uint64_t)chunks << 16));  // seq_cst: before the sleepers check
  if (p.sleepers.load() > 0) {
    std::lock_guard<std::mutex> lk(p.m);
    p.cv.notify_all();
  }
  participate(p, g);
  for (int i = 0; p.done.load(std::memory_order_acquire) < chunks; ++i) {  // a chunk in flight
    if (i % 64 != 63) cpu_relax();
    else sched_yield();
  }
}

// parallel_for-like: fn(b, e) over [0, n), chunks of at least `grain` items (about 16 per thread)
template <typename F>
void parallel(int64_t n, int64_t grain, const F& fn) {
  if (n <= 0) return;
  const int64_t per = (n + 16 * at::get_num_threads() - 1) / (16 * at::get_num_threads());
  run(n, std::max<int64_t>({grain, per, 1}),
      [](const void* c, int64_t b, int64_t e) { (*static_cast<const F*>(c))(b, e); }, &fn);
}

}  // namespace pool

// ----------------------------------------------------------------------------- fp32, any rows
// f32_linear: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for fp32 x [M, K] and a weight packed
// (kernels.f32_pack) into k16 blocks, [ceil(N/16), K, 16]: block b holds columns 16b..16b+15, the
// 16 values of one k side by side, k after k (padding columns are zero). One layout serves every
// row count: a block is one contiguous stream of K * 64 bytes, read once per call whether for one
// row (one decoding request: bound by memory bandwidth) or for many (a batch: each weight vector
// loaded meets MR rows of x, broadcast, in MR x NV register accumulators: bound by the FMA units).
//
// Numerics: each y[m, n] is one fp32 accumulation over k in order 0..K-1 (FMA on the SIMD paths;
// multiply then add on the scalar one), then + bias. The operations are the same whatever M and
// however the rows are tiled, so a row's result does not depend on the other rows of the batch
// (bit for bit within one build). Error: sequential summation,
//     |y - exact| <= (K + 1) * 2^-24 * (sum_k |w_nk x_mk| + |bias_n|)  (to first order).
constexpr int64_t F32_BLOCK = 16;

#if defined(QWEN2_AVX512)
// Tiles (rows x 16-column blocks): batches 8 x 2 (16 accumulators, 2 weight loads and 8
// broadcasts per 16 FMAs; measured here against 6x4, 8x1, 8x3, 12x2, 14x2: within 2% of the best
// at 16 rows (~175 GFLOP/s on 2 cores, where 16 rows also stream the weights at ~22 GB/s) and at
// 512 (~220 GFLOP/s, oneDNN's speed)), one row 1 x 4 (four independent FMA chains, four streams:
// ~33 GB/s, the measured stream bandwidth).
constexpr int F32_MR = 8, F32_NV = 2, F32_NV1 = 4;
template <int MR, int NV>
inline void f32_tile(const float* w, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy,
                     int64_t nvalid, const float* bias) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(w + (v * K + k) * 16);
    for (int m = 0; m < MR; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(xb, wv[v], acc[m][v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t left = std::min<int64_t>(16, nvalid - 16 * v);
    if (left <= 0) break;
    const __mmask16 mk = (__mmask16)((1u << left) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mk, bias + 16 * v) : _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m) {
      const __m512 r = bias ? _mm512_add_ps(acc[m][v], b) : acc[m][v];
      _mm512_mask_storeu_ps(y + m * ldy + 16 * v, mk, r);
    }
  }
}
#elif defined(QWEN2_AVX2)
// a 16-column block is two 8-lane registers: batches 6 x 1 (12 accumulators), one row 1 x 4
constexpr int F32_MR = 6, F32_NV = 1, F32_NV1 = 4;
template <int MR, int NV>
inline void f32_tile(const float* w, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy,
                     int64_t nvalid, const float* bias) {
  __m256 acc[MR][2 * NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < 2 * NV; ++v) acc[m][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 wv[2 * NV];
    for (int v = 0; v < 2 * NV; ++v) wv[v] = _mm256_loadu_ps(w + ((v / 2) * K + k) * 16 + 8 * (v % 2));
    for (int m = 0; m < MR; ++m) {
      const __m256 xb = _mm256_set1_ps(x[m * ldx + k]);
      for (int v = 0; v < 2 * NV; ++v) acc[m][v] = _mm256_fmadd_ps(xb, wv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    alignas(32) float t[16 * NV];
    for (int v = 0; v < 2 * NV; ++v) _mm256_store_ps(t + 8 * v, acc[m][v]);
    const int64_t n = std::min<int64_t>(16 * NV, nvalid);
    for (int64_t j = 0; j < n; ++j) y[m * ldy + j] = bias ? t[j] + bias[j] : t[j];
  }
}
#else
constexpr int F32_MR = 4, F32_NV = 1, F32_NV1 = 1;
template <int MR, int NV>
inline void f32_tile(const float* w, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy,
                     int64_t nvalid, const float* bias) {
  float acc[MR][16 * NV] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int m = 0; m < MR; ++m) {
      const float xv = x[m * ldx + k];
      for (int v = 0; v < NV; ++v)
        for (int j = 0; j < 16; ++j) acc[m][16 * v + j] += xv * w[(v * K + k) * 16 + j];
    }
  const int64_t n = std::min<int64_t>(16 * NV, nvalid);
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < n; ++j) y[m * ldy + j] = bias ? acc[m][j] + bias[j] : acc[m][j];
}
#endif

// rows r < R of a column tile: f32_tile<r, NV>
template <int NV, int R>
inline void f32_rest(const float* w, int64_t K, const float* x, float* y, int64_t N, int64_t nvalid,
                     const float* bias, int64_t r) {
  if constexpr (R >= 1) {
    if (r == R) return f32_tile<R, NV>(w, K, x, K, y, N, nvalid, bias);
    f32_rest<NV, R - 1>(w, K, x, y, N, nvalid, bias, r);
  }
}

// all M rows against NV blocks (columns 16 * NV from the tile's first): the weights of the tile
// stay in cache while the rows go by
template <int MR, int NV>
void f32_cols(const float* w, int64_t K, const float* x, int64_t M, float* y, int64_t N, int64_t nvalid,
              const float* bias) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) f32_tile<MR, NV>(w, K, x + m * K, K, y + m * N, N, nvalid, bias);
  if (m < M) f32_rest<NV, MR - 1>(w, K, x + m * K, y + m * N, N, nvalid, bias, M - m);
}

template <int MR, int NV>
void f32_run(const float* x, int64_t M, int64_t K, const float* wp, int64_t N, const float* bias, float* y) {
  const int64_t NB = (N + F32_BLOCK - 1) / F32_BLOCK, tiles = (NB + NV - 1) / NV;
  // at least ~64 KiB of weights per task, so that small matrices do not pay for a fork
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, NV * K * 64));
  pool::parallel(tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * NV, c0 = b0 * F32_BLOCK;
      const float* w = wp + b0 * K * F32_BLOCK;
      const float* bs = bias ? bias + c0 : nullptr;
      if (b0 + NV <= NB) {
        f32_cols<MR, NV>(w, K, x, M, y + c0, N, std::min<int64_t>(N - c0, NV * F32_BLOCK), bs);
      } else {
        for (int64_t b = b0; b < NB; ++b) {
          const int64_t c = b * F32_BLOCK;
          f32_cols<MR, 1>(wp + b * K * F32_BLOCK, K, x, M, y + c, N, std::min<int64_t>(N - c, F32_BLOCK),
                          bias ? bias + c : nullptr);
        }
      }
    }
  });
}

at::Tensor f32_linear(const at::Tensor& x_, const at::Tensor& packed, int64_t N, const std::optional<at::Tensor>& bias_) {
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.dim() == 3 && packed.size(2) == F32_BLOCK,
              "f32_linear: packed must be float32 [ceil(N/16), K, 16] (kernels.f32_pack), got ",
              packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(packed.device().is_cpu() && x_.device().is_cpu(), "f32_linear: CPU tensors only");
  const int64_t K = packed.size(1);
  TORCH_CHECK(N >= 0 && (N + F32_BLOCK - 1) / F32_BLOCK == packed.size(0), "f32_linear: N = ", N,
              " does not match packed ", packed.sizes());
  TORCH_CHECK(x_.scalar_type() == at::kFloat, "f32_linear: x must be float32, got ", x_.scalar_type());
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) == K, "f32_linear: x must be [..., ", K, "], got ", x_.sizes());
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    bias = bias_->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == N && bias.device().is_cpu(),
                "f32_linear: bias must be float32 [N]");
  }
  const at::Tensor x = x_.contiguous(), W = packed.contiguous();
  at::Tensor y = at::empty(out_shape(x_, N), x_.options());
  if (y.numel() == 0) return y;
  const int64_t M = y.numel() / N;
  if (K == 0) return bias.defined() ? y.copy_(bias.expand_as(y)) : y.zero_();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (M == 1)
    f32_run<1, F32_NV1>(x.data_ptr<float>(), 1, K, W.data_ptr<float>(), N, bp, y.data_ptr<float>());
  else
    f32_run<F32_MR, F32_NV>(x.data_ptr<float>(), M, K, W.data_ptr<float>(), N, bp, y.data_ptr<float>());
  return y;
}

// ----------------------------------------------------------------------------- serving helpers
// Small fp32 ops of a serving step that torch runs slowly at these shapes (each a handful of
// dispatches, strided views or a single-threaded reduction): decode attention straight from the
// paged KV pool, silu(gate) * up, RMSNorm and the greedy argmax.

#if defined(QWEN2_AVX512)
// exp(x) for x <= 0 (softmax terms, silu's exp(-|g|)), Cephes' expf: Cody-Waite reduction by
// ln 2, degree-6 polynomial, scaled by 2^n (vscalefps, denormal results included); within 2 ulp
// of the correctly rounded result on the normal range; 0 below -104 (where expf is 0).
inline __m512 exp_neg_ps(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-104.f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  y = _mm512_scalef_ps(y, fx);
  return _mm512_maskz_mov_ps(~tiny, y);
}

// lane i of the result = the sum of the 16 lanes of a[T[i]], T = the 4 x 4 transpose
// (0 4 8 12 1 5 ...); T is its own inverse, so a caller that puts vector t at a[T[t]] gets lane t
// = sum of its vector t (15 adds for 16 sums instead of 16 separate reductions)
constexpr int kT16[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
inline __m512 reduce16(const __m512* a) {
  __m512 c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit quarters
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88), _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    e[i] = _mm512_add_ps(_mm512_shuffle_ps(d[2 * i], d[2 * i + 1], 0x44), _mm512_shuffle_ps(d[2 * i], d[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xDD));
}
#endif

// out[m, j] = silu(x[m, j]) * x[m, F + j] for x [M, 2F] (a fused gate/up projection's output);
// silu(g) = g / (1 + exp(-g)) as torch computes it
at::Tensor silu_mul(const at::Tensor& x_) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && x_.device().is_cpu(), "silu_mul: x must be float32 on the CPU");
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) % 2 == 0, "silu_mul: the last dimension must be even, got ", x_.sizes());
  const at::Tensor x = x_.contiguous();
  const int64_t F = x.size(-1) / 2, M = F ? x.numel() / (2 * F) : 0;
  at::Tensor y = at::empty(out_shape(x_, F), x_.options());
  if (y.numel() == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  pool::parallel(M * F, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1;) {
      const int64_t m = i / F, j = i % F, n = std::min(i1 - i, F - j);
      const float* g = xp + m * 2 * F + j;
      const float* u = g + F;
      float* o = yp + i;
      int64_t t = 0;
#if defined(QWEN2_AVX512)
      for (; t + 16 <= n; t += 16) {
        const __m512 gv = _mm512_loadu_ps(g + t);
        // exp(-g) for g >= 0; for g < 0, exp(-g) = 1 / exp(g)
        const __m512 e = exp_neg_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(gv)));
        const __mmask16 neg = _mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_LT_OQ);
        // g >= 0: g / (1 + e);  g < 0: g / (1 + 1/e) = g * e / (e + 1); 1 / (1 + e) (in [1/2, 1])
        // by a 14-bit reciprocal and one Newton step (within 2 ulp)
        const __m512 den = _mm512_add_ps(e, _mm512_set1_ps(1.f));
        __m512 r = _mm512_rcp14_ps(den);
        r = _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, _mm512_set1_ps(2.f)));
        const __m512 num = _mm512_mask_mul_ps(gv, neg, gv, e);
        _mm512_storeu_ps(o + t, _mm512_mul_ps(_mm512_mul_ps(num, r), _mm512_loadu_ps(u + t)));
      }
#endif
      for (; t < n; ++t) o[t] = g[t] / (1.f + std::exp(-g[t])) * u[t];
      i += n;
    }
  });
  return y;
}

// y = weight * (x * rsqrt(mean(x^2) + eps)) over the last dimension (the model's RMSNorm, fp32)
at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && w_.scalar_type() == at::kFloat && x_.device().is_cpu() &&
              w_.device().is_cpu(), "rms_norm: float32 CPU tensors only");
  const int64_t D = w_.numel();
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) == D, "rms_norm: x must be [..., ", D, "], got ", x_.sizes());
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t M = D ? x.numel() / D : 0;
  if (M == 0 || D == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  pool::parallel(M, std::max<int64_t>(1, 16384 / D), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* r = xp + m * D;
      float* o = yp + m * D;
      int64_t k = 0;
      float ss = 0.f;
#if defined(QWEN2_AVX512)
      __m512 a = _mm512_setzero_ps();
      for (; k + 16 <= D; k += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(r + k), _mm512_loadu_ps(r + k), a);
      ss = hsum(a);
#endif
      for (; k < D; ++k) ss += r[k] * r[k];
      const float inv = 1.f / std::sqrt(ss / (float)D + (float)eps);
      k = 0;
#if defined(QWEN2_AVX512)
      const __m512 iv = _mm512_set1_ps(inv);
      for (; k + 16 <= D; k += 16)
        _mm512_storeu_ps(o + k, _mm512_mul_ps(_mm512_loadu_ps(wp + k), _mm512_mul_ps(_mm512_loadu_ps(r + k), iv)));
#endif
      for (; k < D; ++k) o[k] = wp[k] * (r[k] * inv);
    }
  });
  return y;
}

// rows ids of the weight packed by f32_pack: out[..., k] = packed[id / 16, k, id % 16]
at::Tensor f32_rows(const at::Tensor& packed_, const at::Tensor& ids_) {
  TORCH_CHECK(packed_.scalar_type() == at::kFloat && packed_.dim() == 3 && packed_.size(2) == F32_BLOCK,
              "f32_rows: packed must be float32 [NB, K, 16]");
  TORCH_CHECK(ids_.scalar_type() == at::kLong, "f32_rows: ids must be int64");
  const at::Tensor packed = packed_.contiguous(), ids = ids_.contiguous();
  const int64_t K = packed.size(1), rows = packed.size(0) * F32_BLOCK, n = ids.numel();
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(K);
  at::Tensor out = at::empty(shape, packed.options());
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < rows, "f32_rows: id ", ip[i], " out of range");
  const float* pp = packed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  pool::parallel(n, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* src = pp + (ip[i] / F32_BLOCK) * K * F32_BLOCK + ip[i] % F32_BLOCK;
      float* dst = op + i * K;
      for (int64_t k = 0; k < K; ++k) dst[k] = src[k * F32_BLOCK];
    }
  });
  return out;
}

// index of the first maximum of each row among its first n values (x [B, V], rows may be strided);
// NaN is never picked (a row of NaNs gives 0)
at::Tensor argmax_rows(const at::Tensor& x, int64_t n) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.device().is_cpu(), "argmax_rows: x must be float32 [B, V]");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "argmax_rows: rows must be contiguous");
  TORCH_CHECK(n >= 1 && n <= x.size(1), "argmax_rows: n must be in 1..", x.size(1));
  const int64_t B = x.size(0), ld = x.stride(0);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  pool::parallel(B, std::max<int64_t>(1, 65536 / n), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* r = xp + b * ld;
      float best = -INFINITY;
      int64_t bi = 0, k = 0;
#if defined(QWEN2_AVX512)
      if (n >= 16) {
        // per lane: the first maximum of its residue class; then the best lane, lowest index on ties
        __m512 bv = _mm512_set1_ps(-INFINITY);
        __m512i bidx = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i step = _mm512_set1_epi32(16);
        for (; k + 16 <= n; k += 16) {
          const __m512 v = _mm512_loadu_ps(r + k);
          const __mmask16 gt = _mm512_cmp_ps_mask(v, bv, _CMP_GT_OQ);
          bv = _mm512_mask_mov_ps(bv, gt, v);
          bidx = _mm512_mask_mov_epi32(bidx, gt, idx);
          idx = _mm512_add_epi32(idx, step);
        }
        alignas(64) float vv[16];
        alignas(64) int32_t ii[16];
        _mm512_store_ps(vv, bv);
        _mm512_store_si512(ii, bidx);
        for (int l = 0; l < 16; ++l)
          if (vv[l] > best || (vv[l] == best && ii[l] < bi)) best = vv[l], bi = ii[l];
      }
#endif
      for (; k < n; ++k)
        if (r[k] > best) best = r[k], bi = k;
      op[b] = bi;
    }
  });
  return out;
}

// Decode attention over the paged KV pool: one query token per row, its keys and values read in
// place from their pool slots (no gathered copy). q [n, H, D]; pools [slots, KV, D]; slots [n, S]
// (row i's keys are at positions 0..lens[i]-1, entries past that are ignored); a query head j
// reads KV head j / (H / KV). window > 0: only the last `window` positions (sliding window).
// Per (row, KV head): scores q.k * scale for its H/KV query heads, softmax (max-subtracted, fp32),
// then the probability-weighted sum of the values, divided by the probability sum at the end.
at::Tensor paged_attention(const at::Tensor& q_, const at::Tensor& kpool, const at::Tensor& vpool,
                           const at::Tensor& slots_, const at::Tensor& lens_, double scale, int64_t window) {
  TORCH_CHECK(q_.scalar_type() == at::kFloat && kpool.scalar_type() == at::kFloat && vpool.scalar_type() == at::kFloat,
              "paged_attention: float32 q and pools only");
  TORCH_CHECK(q_.dim() == 3 && kpool.dim() == 3 && vpool.sizes() == kpool.sizes(), "paged_attention: q [n, H, D], pools [slots, KV, D]");
  TORCH_CHECK(kpool.is_contiguous() && vpool.is_contiguous(), "paged_attention: pools must be contiguous");
  const int64_t n = q_.size(0), H = q_.size(1), D = q_.size(2), KV = kpool.size(1), nslots = kpool.size(0);
  TORCH_CHECK(kpool.size(2) == D && KV > 0 && H % KV == 0, "paged_attention: head dims do not match");
  TORCH_CHECK(slots_.scalar_type() == at::kLong && slots_.dim() == 2 && slots_.size(0) == n, "paged_attention: slots must be int64 [n, S]");
  TORCH_CHECK(lens_.scalar_type() == at::kLong && lens_.numel() == n, "paged_attention: lens must be int64 [n]");
  const at::Tensor q = q_.contiguous(), slots = slots_.contiguous(), lens = lens_.contiguous();
  const int64_t S = slots.size(1), G = H / KV;
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= S, "paged_attention: lens[", i, "] = ", lp[i], " outside 1..", S);
    for (int64_t s = 0; s < lp[i]; ++s)
      TORCH_CHECK(sp[i * S + s] >= 0 && sp[i * S + s] < nslots, "paged_attention: slot out of range");
  }
  at::Tensor out = at::empty({n, H, D}, q_.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = kpool.data_ptr<float>();
  const float* vp = vpool.data_ptr<float>();
  float* opt = out.data_ptr<float>();
  const float sc = (float)scale;
  const int64_t grain = std::max<int64_t>(1, (1 << 17) / std::max<int64_t>(1, 2 * S * D * G));
  pool::parallel(n * KV, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> p;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / KV, h = t % KV, len = lp[i];
      const int64_t s0 = window > 0 ? std::max<int64_t>(0, len - window) : 0, L = len - s0;
      const int64_t* rs = sp + i * S + s0;
      p.resize(G * L + 16);
#if defined(QWEN2_AVX512)
      if (D % 16 == 0) {
        // 16 keys at a time: 16 per-lane partial dot products, summed by one reduce16
        for (int64_t j = 0; j < G; ++j) {
          const float* qj = qp + (i * H + h * G + j) * D;
          for (int64_t s = 0; s < L; s += 16) {
            const int64_t nk = std::min<int64_t>(16, L - s);
            __m512 a[16];
            for (int t = 0; t < 16; ++t) {
              __m512 acc = _mm512_setzero_ps();
              if (t < nk) {
                const float* k = kp + (rs[s + t] * KV + h) * D;
                for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qj + d), _mm512_loadu_ps(k + d), acc);
              }
              a[kT16[t]] = acc;
            }
            _mm512_mask_storeu_ps(p.data() + j * L + s, (__mmask16)((1u << nk) - 1),
                                  _mm512_mul_ps(reduce16(a), _mm512_set1_ps(sc)));
          }
        }
      } else
#endif
      for (int64_t s = 0; s < L; ++s) {
        const float* k = kp + (rs[s] * KV + h) * D;
        for (int64_t j = 0; j < G; ++j) {
          const float* qj = qp + (i * H + h * G + j) * D;
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += qj[d] * k[d];
          p[j * L + s] = dot * sc;
        }
      }
      for (int64_t j = 0; j < G; ++j) {
        float* pj = p.data() + j * L;
        float mx = -INFINITY, sum = 0.f;
        for (int64_t s = 0; s < L; ++s) mx = std::max(mx, pj[s]);
        int64_t s = 0;
#if defined(QWEN2_AVX512)
        __m512 sv = _mm512_setzero_ps();
        const __m512 mv = _mm512_set1_ps(mx);
        for (; s + 16 <= L; s += 16) {
          const __m512 e = exp_neg_ps(_mm512_sub_ps(_mm512_loadu_ps(pj + s), mv));
          _mm512_storeu_ps(pj + s, e);
          sv = _mm512_add_ps(sv, e);
        }
        sum = hsum(sv);
#endif
        for (; s < L; ++s) {
          pj[s] = std::exp(pj[s] - mx);
          sum += pj[s];
        }
        float* o = opt + (i * H + h * G + j) * D;
        const float inv = 1.f / sum;
        int64_t d = 0;
#if defined(QWEN2_AVX512)
        for (; d + 64 <= D; d += 64) {
          __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          for (int64_t s2 = 0; s2 < L; ++s2) {
            const float* v = vp + (rs[s2] * KV + h) * D + d;
            const __m512 pv = _mm512_set1_ps(pj[s2]);
            a0 = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v), a0);
            a1 = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + 16), a1);
            a2 = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + 32), a2);
            a3 = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + 48), a3);
          }
          const __m512 iv = _mm512_set1_ps(inv);
          _mm512_storeu_ps(o + d, _mm512_mul_ps(a0, iv));
          _mm512_storeu_ps(o + d + 16, _mm512_mul_ps(a1, iv));
          _mm512_storeu_ps(o + d + 32, _mm512_mul_ps(a2, iv));
          _mm512_storeu_ps(o + d + 48, _mm512_mul_ps(a3, iv));
        }
        for (; d + 16 <= D; d += 16) {
          __m512 a0 = _mm512_setzero_ps();
          for (int64_t s2 = 0; s2 < L; ++s2)
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(pj[s2]), _mm512_loadu_ps(vp + (rs[s2] * KV + h) * D + d), a0);
          _mm512_storeu_ps(o + d, _mm512_mul_ps(a0, _mm512_set1_ps(inv)));
        }
#endif
        for (; d < D; ++d) {
          float a = 0.f;
          for (int64_t s2 = 0; s2 < L; ++s2) a += pj[s2] * vp[(rs[s2] * KV + h) * D + d];
          o[d] = a * inv;
        }
      }
    }
  });
  return out;
}

// ----------------------------------------------------------------------------- ops
int64_t check_x(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K && x.numel() == K, op, ": x must be one row of ", K,
              " values ([K] or [1, K]), got ", x.sizes());
  return K;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = N;
  return s;
}

at::Tensor scales_f(const at::Tensor& s) {
  // fp32 and bf16 are read as they are; anything else (fp16) is converted once
  if (s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16) return s.contiguous();
  return s.to(at::kFloat).contiguous();
}

at::Tensor int8_gemv(const at::Tensor& x_, const at::Tensor& qweight, const at::Tensor& scales_) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, "int8_gemv: qweight must be int8 [N, K]");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  check_x(x_, K, "int8_gemv");
  TORCH_CHECK(scales_.numel() == N, "int8_gemv: scales must have N = ", N, " values");
  const at::Tensor x = x_.contiguous(), W = qweight.contiguous(), sc = scales_f(scales_);
  at::Tensor y = at::empty(out_shape(x_, N), x_.options().dtype(at::kFloat));
  if (N == 0) return y;
  Act8 p;
  quantize_x(x, K, p.a);
  prep8(p);
  float* yp = y.data_ptr<float>();
  const int8_t* wp = W.data_ptr<int8_t>();
  if (sc.scalar_type() == at::kFloat)
    i8_run(wp, N, K, sc.data_ptr<float>(), p, yp);
  else
    i8_run(wp, N, K, reinterpret_cast<const bf16_t*>(sc.data_ptr()), p, yp);
  return y;
}

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

std::string isa() {
#if defined(QWEN2_AVX512) && defined(QWEN2_BF16DP)
  return "avx512_vnni_bf16";
#elif defined(QWEN2_AVX512)
  return "avx512_vnni";
#elif defined(QWEN2_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

#define QWEN2_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define QWEN2_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

QWEN2_LIBRARY(QWEN2_NS, m) {
  m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int group_size) -> Tensor");
  m.def("bf16_gemv(Tensor x, Tensor weight) -> Tensor");
  m.def("f32_linear(Tensor x, Tensor packed, int N, Tensor? bias) -> Tensor");
  m.def("f32_rows(Tensor packed, Tensor ids) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("argmax_rows(Tensor x, int n) -> Tensor");
  m.def("paged_attention(Tensor q, Tensor kpool, Tensor vpool, Tensor slots, Tensor lens, float scale, int window) -> Tensor");
  m.def("isa() -> str", &isa);
}

QWEN2_LIBRARY_IMPL(QWEN2_NS, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("bf16_gemv", &bf16_gemv);
  m.impl("f32_linear", &f32_linear);
  m.impl("f32_rows", &f32_rows);
  m.impl("silu_mul", &silu_mul);
  m.impl("rms_norm", &rms_norm);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("paged_attention", &paged_attention);
}
