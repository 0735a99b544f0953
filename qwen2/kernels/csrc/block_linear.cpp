// block4_linear / block8_linear: linear layers over weights quantized in blocks, the layouts that
// GGUF's block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) repack into without loss
// (qwen2/quant/blocks.py). Two numerics: by default (exact=False) up to 16 rows of x are quantized
// to int8 per block of 32 and meet the weights in integer dot products, as llama.cpp does (section
// "int8 activations" below); exact=True, and more than 16 rows, keep x in float32, so that the
// result is the dequantized weight's product up to float32 rounding.
//
// block4: groups of 32 weights along k, q in 0..15 (or 0..31 with the qh bit plane):
//     w[n, k] = s[n, g] * (q[n, k] - zero) + o[n, g]          g = k / 32
//   qweight uint8 [N, K/2]: byte i of group g holds q[g*32 + i] in its low nibble and
//   q[g*32 + 16 + i] in its high one (Q4_0 / Q5_0's own order); qh int32 [N, K/32] or None: bit j
//   adds 16 to q[g*32 + j]; scales, offsets (or None) [N, K/32], float32 or float16.
// block8: groups of G = 16 or 32, q int8 [N, K]: w[n, k] = s[n, k / G] * q[n, k].
// block6: GGUF's Q6_K values as stored, 6 bits a weight (b6_unpack), G = 16: w = s[n, k / 16] * (q - 32);
//   run as block8 of G = 16 whose bytes are unpacked in registers.
//
// exact, one row (decode; up to 3 rows likewise, each weight row converted once per row of x): the
// kernel streams the quantized weight once, converting each group to fp32
// in registers: y[n] = sum_g s_ng * sum_{k in g} (q_nk - zero) * x_k + sum_g o_ng * X_g, where
// X_g = sum_{k in g} x_k (computed once per call). Several rows (prefill, batches): each task
// dequantizes 32 output columns into f32_linear's k16 layout (a thread-local buffer) and runs its
// register tiles over all the rows, so the dequantizing costs 1/M of the multiply-adds.
// Numerics: fp32 throughout; the products (q - zero) * x are exact-input FMAs, so the error is
// that of an fp32 dot product (plus, with offsets, that of the group sums X_g).
//
// ISA: AVX512 (zmm, 16 lanes: the qh bits are lane masks), AVX2 (ymm), scalar; picked by the
// build's -march like every kernel here (common.h).
#include "common.h"
#include "f32_tile.h"
#include "threadpool.h"

namespace QWEN2_NS {
namespace {

using half_t = at::Half;

inline float ldh(const float* p) { return *p; }
inline float ldh(const half_t* p) {
#if defined(__F16C__)
  return _cvtsh_ss(p->x);
#else
  return static_cast<float>(*p);
#endif
}

// super-block factors (GGUF's K types' d / dmin), float32 or float16 (the file's own, converted
// exactly as they are read: half the bytes of float32)
struct SupD {
  const void* p = nullptr;
  bool half = false;
  float operator[](int64_t i) const { return half ? ldh(static_cast<const half_t*>(p) + i) : static_cast<const float*>(p)[i]; }
  SupD operator+(int64_t n) const {
    return {half ? (const void*)(static_cast<const half_t*>(p) + n) : (const void*)(static_cast<const float*>(p) + n), half};
  }
  explicit operator bool() const { return p != nullptr; }
};

struct B4 {
  const uint8_t* q;
  const int32_t* qh;  // may be null
  int64_t K, ng;
  int32_t zero;
};

// ----------------------------------------------------------------------------- one group to fp32
// the 32 weights of group g of a row, (q - zero) as floats (scale and offset are the caller's)
inline void b4_group(const uint8_t* w, const int32_t* qh, int64_t g, int32_t zero, float* out) {
#if defined(QWEN2_AVX512)
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + 16 * g)));
  __m512i lo = _mm512_and_si512(v, _mm512_set1_epi32(15)), hi = _mm512_srli_epi32(v, 4);
  if (qh) {
    const uint32_t h = (uint32_t)qh[g];
    lo = _mm512_mask_add_epi32(lo, (__mmask16)h, lo, _mm512_set1_epi32(16));
    hi = _mm512_mask_add_epi32(hi, (__mmask16)(h >> 16), hi, _mm512_set1_epi32(16));
  }
  const __m512i z = _mm512_set1_epi32(zero);
  _mm512_storeu_ps(out, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, z)));
  _mm512_storeu_ps(out + 16, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, z)));
#else
  const uint32_t h = qh ? (uint32_t)qh[g] : 0u;
  for (int i = 0; i < 16; ++i) {
    const uint8_t b = w[16 * g + i];
    out[i] = (float)((int32_t)(b & 15) + (int32_t)((h >> i) & 1) * 16 - zero);
    out[i + 16] = (float)((int32_t)(b >> 4) + (int32_t)((h >> (i + 16)) & 1) * 16 - zero);
  }
#endif
}

// ----------------------------------------------------------------------------- block6 to int8
// block6 (GGUF's Q6_K values as stored): per 256 weights 192 bytes, ql[128] then qh[64]; weight
// 128h + 32c + i (h, c in 0..1 / 0..3, i < 32) has low bits ql[64h + 32(c & 1) + i] >> 4(c >> 1) & 15
// and high bits qh[32h + i] >> 2c & 3: q = low | high << 4 in 0..63, the value q - 32.
inline void b6_unpack(const uint8_t* w, int64_t K, int8_t* out) {
  for (int64_t sb = 0; sb < K / 256; ++sb) {
    const uint8_t *ql = w + 192 * sb, *qh = ql + 128;
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < 4; ++c)
        for (int i = 0; i < 32; ++i) {
          const int lo = (ql[64 * h + 32 * (c & 1) + i] >> (4 * (c >> 1))) & 15, hi = (qh[32 * h + i] >> (2 * c)) & 3;
          out[256 * sb + 128 * h + 32 * c + i] = (int8_t)((lo | (hi << 4)) - 32);
        }
  }
}

// ----------------------------------------------------------------------------- block4, one row
template <typename ST, bool QH>
float b4_dot(const uint8_t* w, const int32_t* qh, const ST* s, int32_t zero, const float* x, int64_t ng) {
#if defined(QWEN2_AVX512)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const __m512i m4 = _mm512_set1_epi32(15), z = _mm512_set1_epi32(zero), c16 = _mm512_set1_epi32(16);
  auto group = [&](int64_t g) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + 16 * g)));
    __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_srli_epi32(v, 4);
    if constexpr (QH) {
      const uint32_t h = (uint32_t)qh[g];
      lo = _mm512_mask_add_epi32(lo, (__mmask16)h, lo, c16);
      hi = _mm512_mask_add_epi32(hi, (__mmask16)(h >> 16), hi, c16);
    }
    __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, z)), _mm512_loadu_ps(x + 32 * g));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, z)), _mm512_loadu_ps(x + 32 * g + 16), a);
  };
  int64_t g = 0;
  for (; g + 1 < ng; g += 2) {
    acc0 = _mm512_fmadd_ps(group(g), _mm512_set1_ps(ldh(s + g)), acc0);
    acc1 = _mm512_fmadd_ps(group(g + 1), _mm512_set1_ps(ldh(s + g + 1)), acc1);
  }
  if (g < ng) acc0 = _mm512_fmadd_ps(group(g), _mm512_set1_ps(ldh(s + g)), acc0);
  return hsum(_mm512_add_ps(acc0, acc1));
#elif defined(QWEN2_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi32(15), z = _mm256_set1_epi32(zero), c16 = _mm256_set1_epi32(16);
  const __m256i bits = _mm256_set_epi32(128, 64, 32, 16, 8, 4, 2, 1);
  auto plane = [&](__m256i q, uint32_t h8) {  // + 16 where bit i of h8 is set (lane i)
    if constexpr (QH) {
      const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)h8), bits), bits);
      q = _mm256_add_epi32(q, _mm256_and_si256(m, c16));
    }
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(q, z));
  };
  auto group = [&](int64_t g) {
    const __m128i b = _mm_loadu_si128((const __m128i*)(w + 16 * g));
    const __m256i v0 = _mm256_cvtepu8_epi32(b), v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
    const uint32_t h = QH ? (uint32_t)qh[g] : 0u;
    const float* xg = x + 32 * g;
    __m256 a = _mm256_mul_ps(plane(_mm256_and_si256(v0, m4), h & 255), _mm256_loadu_ps(xg));
    a = _mm256_fmadd_ps(plane(_mm256_and_si256(v1, m4), (h >> 8) & 255), _mm256_loadu_ps(xg + 8), a);
    a = _mm256_fmadd_ps(plane(_mm256_srli_epi32(v0, 4), (h >> 16) & 255), _mm256_loadu_ps(xg + 16), a);
    return _mm256_fmadd_ps(plane(_mm256_srli_epi32(v1, 4), h >> 24), _mm256_loadu_ps(xg + 24), a);
  };
  int64_t g = 0;
  for (; g + 1 < ng; g += 2) {
    acc0 = _mm256_fmadd_ps(group(g), _mm256_set1_ps(ldh(s + g)), acc0);
    acc1 = _mm256_fmadd_ps(group(g + 1), _mm256_set1_ps(ldh(s + g + 1)), acc1);
  }
  if (g < ng) acc0 = _mm256_fmadd_ps(group(g), _mm256_set1_ps(ldh(s + g)), acc0);
  return hsum(_mm256_add_ps(acc0, acc1));
#else
  float acc = 0.f, t[32];
  for (int64_t g = 0; g < ng; ++g) {
    b4_group(w, QH ? qh : nullptr, g, zero, t);
    float a = 0.f;
    for (int i = 0; i < 32; ++i) a += t[i] * x[32 * g + i];
    acc += ldh(s + g) * a;
  }
  return acc;
#endif
}

// ----------------------------------------------------------------------------- block8, one row
template <typename ST, int G>
float b8_dot(const int8_t* w, const ST* s, const float* x, int64_t ng) {
#if defined(QWEN2_AVX512)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  auto half = [&](int64_t k) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k))));
  };
  auto group = [&](int64_t g) {
    const int64_t k = G * g;
    __m512 a = _mm512_mul_ps(half(k), _mm512_loadu_ps(x + k));
    if constexpr (G == 32) a = _mm512_fmadd_ps(half(k + 16), _mm512_loadu_ps(x + k + 16), a);
    return a;
  };
  int64_t g = 0;
  for (; g + 1 < ng; g += 2) {
    acc0 = _mm512_fmadd_ps(group(g), _mm512_set1_ps(ldh(s + g)), acc0);
    acc1 = _mm512_fmadd_ps(group(g + 1), _mm512_set1_ps(ldh(s + g + 1)), acc1);
  }
  if (g < ng) acc0 = _mm512_fmadd_ps(group(g), _mm512_set1_ps(ldh(s + g)), acc0);
  return hsum(_mm512_add_ps(acc0, acc1));
#elif defined(QWEN2_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  auto eight = [&](int64_t k) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k))));
  };
  auto group = [&](int64_t g) {
    const int64_t k = G * g;
    __m256 a = _mm256_mul_ps(eight(k), _mm256_loadu_ps(x + k));
    for (int j = 8; j < G; j += 8) a = _mm256_fmadd_ps(eight(k + j), _mm256_loadu_ps(x + k + j), a);
    return a;
  };
  int64_t g = 0;
  for (; g + 1 < ng; g += 2) {
    acc0 = _mm256_fmadd_ps(group(g), _mm256_set1_ps(ldh(s + g)), acc0);
    acc1 = _mm256_fmadd_ps(group(g + 1), _mm256_set1_ps(ldh(s + g + 1)), acc1);
  }
  if (g < ng) acc0 = _mm256_fmadd_ps(group(g), _mm256_set1_ps(ldh(s + g)), acc0);
  return hsum(_mm256_add_ps(acc0, acc1));
#else
  float acc = 0.f;
  for (int64_t g = 0; g < ng; ++g) {
    float a = 0.f;
    for (int i = 0; i < G; ++i) a += (float)w[G * g + i] * x[G * g + i];
    acc += ldh(s + g) * a;
  }
  return acc;
#endif
}

// ----------------------------------------------------------------------------- dequantized rows
template <typename ST>
void b4_row(const uint8_t* w, const int32_t* qh, const ST* s, const ST* o, int32_t zero, int64_t ng, float* out) {
  for (int64_t g = 0; g < ng; ++g) {
    float* r = out + 32 * g;
    b4_group(w, qh, g, zero, r);
    const float sg = ldh(s + g), og = o ? ldh(o + g) : 0.f;
    if (o) {
      for (int i = 0; i < 32; ++i) r[i] = r[i] * sg + og;
    } else {
      for (int i = 0; i < 32; ++i) r[i] *= sg;
    }
  }
}

template <typename ST>
void b8_row(const int8_t* w, const ST* s, int64_t K, int64_t G, float* out) {
  for (int64_t g = 0; g < K / G; ++g) {
    const float sg = ldh(s + g);
    for (int64_t i = 0; i < G; ++i) out[g * G + i] = (float)w[g * G + i] * sg;
  }
}

// ----------------------------------------------------------------------------- int8 activations
// The fast path (the default for up to QMAX rows): each row of x is quantized to int8 in blocks of
// 32, like llama.cpp's Q8 activations (sx = amax / 127, xq = round-half-even(x / sx)), and the
// weights meet it in exact integer dot products (AVX512-VNNI vpdpbusd; AVX2 vpmaddubsw +
// vpmaddwd; scalar), scaled per group in fp32:
//   block4: y = sum_g s_g * sx_g * (sum_{k in g} q_k xq_k - zero * sum_{k in g} xq_k) + o_g * X_g
//   block8: y = sum_g s_g * sx_b(g) * sum_{k in g} q_k xq_k
// X_g is the group's exact fp32 sum of x (the offsets do not meet the rounded x). The only error
// beyond fp32 rounding is x's rounding: |y - exact| <= sum_b amax_b / 254 * sum_{k in b} |q_k s_g(k)|.
// Several rows (2..QMAX: batches, speculative verification) stream each weight row once and feed
// it to every row of x (NR at a time, the weight row from L1 for the others), so that k rows cost
// about one decode step's memory traffic, not k.
constexpr int64_t QMAX = 16;
#ifndef QWEN2_QPF
#define QWEN2_QPF 4096
#endif
constexpr int64_t QPF = QWEN2_QPF;  // prefetch distance, bytes of weight rows
#if defined(QWEN2_AVX512) || defined(QWEN2_AVX2)
constexpr bool QDOT_STREAMS = true;  // qdot prefetches the weight rows as it goes (its pf)
#else
constexpr bool QDOT_STREAMS = false;
#endif
enum QKind { QB4 = 0, QB8_32 = 1, QB8_16 = 2, QB6 = 3 };

#if defined(QWEN2_AVX512)
constexpr int64_t QCB = 64;  // weight bytes per chunk (one register)
#elif defined(QWEN2_AVX2)
constexpr int64_t QCB = 32;
#else
constexpr int64_t QCB = 0;  // scalar: x not permuted
#endif

// one row of x, prepared for the weights' groups (arrays padded with zeros past the last group)
struct QRow {
  const int8_t* xq;  // block4 on SIMD: permuted so a chunk's low / high nibbles meet theirs
  const float* sxg;  // per weight group: the activation scale of its block
  const float* T;    // per weight group: c * sxg * sum_{k in g} xq_k (c: block4's zero; block8 +128 bias)
  const float* X;    // per weight group: sum of x (block4 with offsets)
};

struct QAct {
  int64_t ng = 0, xstride = 0, gstride = 0;
  std::vector<int8_t> xq;
  std::vector<float> f;  // sxg | T | X per row
  QRow row(int64_t m) const {
    const float* b = f.data() + m * 3 * gstride;
    return {xq.data() + m * xstride, b, b + gstride, b + 2 * gstride};
  }
};

// 32 values to int8 (round half to even), returns amax / 127
inline float quant32(const float* x, int8_t* q, int32_t* sum_lo, int32_t* sum_hi) {
#if defined(QWEN2_AVX512)
  const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
  *sum_lo = _mm512_reduce_add_epi32(q0);
  *sum_hi = _mm512_reduce_add_epi32(q1);
  _mm_storeu_si128((__m128i*)q, _mm512_cvtsepi32_epi8(q0));
  _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtsepi32_epi8(q1));
#else
  float amax = 0.f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t s0 = 0, s1 = 0;
  for (int i = 0; i < 32; ++i) {
    const int32_t qi = (int32_t)std::nearbyint(x[i] * inv);  // round half to even, as cvtps
    q[i] = (int8_t)qi;
    (i < 16 ? s0 : s1) += qi;
  }
  *sum_lo = s0;
  *sum_hi = s1;
#endif
  return amax / 127.f;
}

void qprep(const float* x, int64_t M, int64_t K, int kind, int32_t zero, bool offsets, QAct& a) {
  const int64_t G = (kind == QB8_16 || kind == QB6) ? 16 : 32, ng = K / G;
  a.ng = ng;
  a.xstride = K + 128;
  a.gstride = ng + 32;
  a.xq.assign(M * a.xstride, 0);
  a.f.assign(M * 3 * a.gstride, 0.f);
#if defined(QWEN2_AVX512)
  const float c = kind == QB4 ? (float)zero : kind == QB6 ? 32.f : 128.f;  // vpdpbusd: block8 weights + 128 as unsigned
#else
  const float c = kind == QB4 ? (float)zero : kind == QB6 ? 32.f : 0.f;  // AVX2 / scalar: signed block8 products
#endif
  std::vector<int8_t> tmp(32);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    int8_t* xq = a.xq.data() + m * a.xstride;
    float *sxg = a.f.data() + m * 3 * a.gstride, *T = sxg + a.gstride, *X = T + a.gstride;
    for (int64_t b = 0; b < K / 32; ++b) {
      int32_t s0, s1;
      int8_t* dst = (kind == QB4 && QCB) ? tmp.data() : xq + 32 * b;
      const float sx = quant32(xm + 32 * b, dst, &s0, &s1);
      if (kind == QB4) {
        if (QCB) {  // group b: low nibbles (bytes 16b..16b+15 of the row) meet x[32b..32b+15], high ones the rest
          const int64_t gpc = QCB / 16, ch = b / gpc, j = b % gpc;
          std::memcpy(xq + 2 * QCB * ch + 16 * j, tmp.data(), 16);
          std::memcpy(xq + 2 * QCB * ch + QCB + 16 * j, tmp.data() + 16, 16);
        }
        sxg[b] = sx;
        T[b] = c * sx * (float)(s0 + s1);
        if (offsets) {
          float t = 0.f;
          for (int i = 0; i < 32; ++i) t += xm[32 * b + i];
          X[b] = t;
        }
      } else if (kind == QB8_32) {
        sxg[b] = sx;
        T[b] = c * sx * (float)(s0 + s1);
      } else {  // QB8_16, QB6: two groups of 16
        sxg[2 * b] = sxg[2 * b + 1] = sx;
        T[2 * b] = c * sx * (float)s0;
        T[2 * b + 1] = c * sx * (float)s1;
      }
    }
  }
}

// one row's super-block scales (Layout::s8): the int8-activation kernels form s_g = sd[g / gps] *
// s8[g] (and o_g) as they load them, 16 (8) groups at a time: no expanded copy per row
struct Sup {
  const uint8_t* s8;
  SupD sd;
  const uint8_t* o8;
  SupD od;
  int64_t gps;  // 8 or 16
  bool sgn;     // s8 holds int8
};
inline float scale1(const float* s, int64_t g) { return s[g]; }
inline float scale1(const half_t* s, int64_t g) { return ldh(s + g); }
inline float scale1(const Sup* p, int64_t g) {
  return p->sd[g / p->gps] * (p->sgn ? (float)(int8_t)p->s8[g] : (float)p->s8[g]);
}
inline float offset1(const float* o, int64_t g) { return o[g]; }
inline float offset1(const half_t* o, int64_t g) { return ldh(o + g); }
inline float offset1(const Sup* p, int64_t g) { return p->od[g / p->gps] * (float)p->o8[g]; }

#if defined(QWEN2_AVX512)
template <typename ST>
inline __m512 lds16(const ST* p, __mmask16 m);
template <>
inline __m512 lds16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
template <>
inline __m512 lds16(const half_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
template <typename ST>
inline __m512 scales16(const ST* s, int64_t g0, __mmask16 m) { return lds16(s + g0, m); }
template <typename ST>
inline __m512 offsets16(const ST* o, int64_t g0, __mmask16 m) { return lds16(o + g0, m); }
// 16 groups' super-block factors: gps 16, one; gps 8, the first 8 lanes' and the last 8's
inline __m512 super16(const SupD& d, int64_t g0, int64_t gps, __mmask16 m) {
  if (gps == 16) return _mm512_set1_ps(d[g0 / 16]);
  const float hi = (m >> 8) ? d[g0 / 8 + 1] : 0.f;
  return _mm512_insertf32x8(_mm512_set1_ps(d[g0 / 8]), _mm256_set1_ps(hi), 1);
}
inline __m512 scales16(const Sup* p, int64_t g0, __mmask16 m) {
  const __m128i b = _mm_maskz_loadu_epi8(m, p->s8 + g0);
  const __m512i v = p->sgn ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
  return _mm512_mul_ps(super16(p->sd, g0, p->gps, m), _mm512_cvtepi32_ps(v));
}
inline __m512 offsets16(const Sup* p, int64_t g0, __mmask16 m) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p->o8 + g0));
  return _mm512_mul_ps(super16(p->od, g0, p->gps, m), _mm512_cvtepi32_ps(v));
}

// NR rows of x against one weight row of ng groups: out[r] = y for x row r (no bias)
template <int KIND, bool QH, bool OFF, typename ST, int NR>
void qdot(const uint8_t* w, const int32_t* qh, const ST* s, const ST* o, int64_t ng, const QRow* xr, float* out,
          const char* pf) {
  constexpr int64_t WB = KIND == QB8_32 ? 32 : 16;  // weight bytes per group (block6: once unpacked to bytes)
  constexpr int GPC = 64 / WB, LPG = 16 / GPC;     // groups per chunk, int32 lanes per group
  __m512 acc[NR][2], accz[NR];
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = accz[r] = _mm512_setzero_ps();
  const __m512i m4 = _mm512_set1_epi8(0x0F), c16 = _mm512_set1_epi8(16), x80 = _mm512_set1_epi8((char)0x80);
  const __m512i lane_g = LPG == 4 ? _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
                                  : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  // qh: the low 16 bits of 4 groups' words (low nibbles' plane) and the high 16 (high nibbles')
#if defined(__AVX512BITALG__)
  // the same masks by vpshufbitqmb: qwords 0-3 hold groups g, g + 1 (qh[g] | qh[g + 1] << 32), 4-7
  // groups g + 2, g + 3; mask bit 16i + t (group i, weight t < 16) is bit 32 (i & 1) + t of its
  // qword (the low nibbles' plane; the high nibbles' is 16 bits up). 5-10% faster on the demo's
  // Q5_0 matrices, one row, Zen 4, than the shuffle below (one A/B run).
  const __m512i hq = _mm512_set_epi64(1, 1, 1, 1, 0, 0, 0, 0);
  alignas(64) static const uint8_t hbit_tab[64] = {
      0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47,
      0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47};
  const __m512i hbit = _mm512_load_si512(hbit_tab), hbit_hi = _mm512_add_epi8(hbit, c16);
#else
  const __m128i hsh = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
#endif
  // block6: the qh byte's 2-bit field of each chunk, shifted per 16-bit lane (low / high 256 bits)
  const __m512i sh_a = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
  const __m512i sh_b = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
  const __m512i m3 = _mm512_set1_epi8(3);
  constexpr int64_t SPAN = KIND == QB6 ? 192 : 16 * WB;  // weight bytes of 16 groups as stored
  for (int64_t g0 = 0; g0 < ng; g0 += 16) {
    if (pf) {  // the weight stream prefetched a fixed distance ahead, a few lines at a time
      const char* p = pf + g0 / 16 * SPAN;
      for (int64_t b = 0; b < SPAN; b += 64) __builtin_prefetch(p + b);
    }
    const int64_t left = std::min<int64_t>(16, ng - g0);
    const __mmask16 mk = (__mmask16)((1u << left) - 1);
    const __m512 sv = scales16(s, g0, mk);
    __m512 F[NR];
    for (int r = 0; r < NR; ++r) {
      F[r] = _mm512_mul_ps(sv, _mm512_loadu_ps(xr[r].sxg + g0));
      accz[r] = _mm512_fnmadd_ps(sv, _mm512_loadu_ps(xr[r].T + g0), accz[r]);
      if constexpr (OFF) accz[r] = _mm512_fmadd_ps(offsets16(o, g0, mk), _mm512_loadu_ps(xr[r].X + g0), accz[r]);
    }
    const int64_t b0 = g0 * WB, nb = left * WB, nch = (nb + 63) / 64;
    for (int64_t j = 0; j < nch; ++j) {
      const __m512i idx = _mm512_add_epi32(lane_g, _mm512_set1_epi32((int)(GPC * j)));
      if constexpr (KIND == QB6) {  // a whole super-block per g0: chunk j = weights 64j.. of it
        const uint8_t* sb = w + 12 * g0;  // 192 bytes per 16 groups
        const int64_t h = j >> 1;
        const __m512i ql = _mm512_loadu_si512(sb + 64 * h);
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(sb + 128 + 32 * h)));
        const __m512i lo = (j & 1) ? _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4) : _mm512_and_si512(ql, m4);
        const __m512i hi = _mm512_and_si512(_mm512_srlv_epi16(qh, (j & 1) ? sh_b : sh_a), m3);
        const __m512i wu = _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));  // q in 0..63 (T takes the 32 back)
        const int64_t k0 = 16 * g0 + 64 * j;
        for (int r = 0; r < NR; ++r) {
          const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, _mm512_loadu_si512(xr[r].xq + k0));
          acc[r][j & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(idx, F[r]), acc[r][j & 1]);
        }
        continue;
      }
      const uint8_t* wp = w + b0 + 64 * j;
      const __m512i wv = 64 * (j + 1) <= nb ? _mm512_loadu_si512(wp)
                                            : _mm512_maskz_loadu_epi8((~0ULL) >> (64 - (nb - 64 * j)), wp);
      if constexpr (KIND == QB4) {
        __m512i lo = _mm512_and_si512(wv, m4), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4);
        if constexpr (QH) {
          const int64_t g = g0 + 4 * j;
          const __m128i h4 = _mm_maskz_loadu_epi32((__mmask8)((1u << std::min<int64_t>(4, ng - g)) - 1), qh + g);
#if defined(__AVX512BITALG__)
          // the masks straight from the vector's bits (vpshufbitqmb), no trip through general registers
          const __m512i hb = _mm512_permutexvar_epi64(hq, _mm512_zextsi128_si512(h4));
          lo = _mm512_mask_add_epi8(lo, _mm512_bitshuffle_epi64_mask(hb, hbit), lo, c16);
          hi = _mm512_mask_add_epi8(hi, _mm512_bitshuffle_epi64_mask(hb, hbit_hi), hi, c16);
#else
          const __m128i h = _mm_shuffle_epi8(h4, hsh);
          lo = _mm512_mask_add_epi8(lo, (__mmask64)_mm_cvtsi128_si64(h), lo, c16);
          hi = _mm512_mask_add_epi8(hi, (__mmask64)_mm_extract_epi64(h, 1), hi, c16);
#endif
        }
        for (int r = 0; r < NR; ++r) {
          const int8_t* xb = xr[r].xq + 2 * (b0 + 64 * j);
          const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xb)),
                                                hi, _mm512_loadu_si512(xb + 64));
          acc[r][j & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(idx, F[r]), acc[r][j & 1]);
        }
      } else {
        const __m512i wu = _mm512_xor_si512(wv, x80);  // q + 128, unsigned (T takes the 128 back)
        const int64_t k0 = (b0 + 64 * j);
        for (int r = 0; r < NR; ++r) {
          const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, _mm512_loadu_si512(xr[r].xq + k0));
          acc[r][j & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(idx, F[r]), acc[r][j & 1]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = hsum(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), accz[r]));
}

#elif defined(QWEN2_AVX2)
template <typename ST>
inline __m256 lds8(const ST* p, int64_t n) {
  float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < std::min<int64_t>(8, n); ++i) t[i] = ldh(p + i);
  return _mm256_loadu_ps(t);
}
template <>
inline __m256 lds8(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return _mm256_loadu_ps(t);
}
template <>
inline __m256 lds8(const half_t* p, int64_t n) {
  if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(t, p, 2 * n);
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)t));
}

template <typename ST>
inline __m256 scales8(const ST* s, int64_t g0, int64_t n) { return lds8(s + g0, n); }
template <typename ST>
inline __m256 offsets8(const ST* o, int64_t g0, int64_t n) { return lds8(o + g0, n); }
inline __m256 bytes8(const uint8_t* p, int64_t n, bool sgn) {
  uint8_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(t, p, std::min<int64_t>(8, n));
  const __m128i b = _mm_loadl_epi64((const __m128i*)t);
  return _mm256_cvtepi32_ps(sgn ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
}
// 8 groups (g0 a multiple of 8) share one super-block factor when gps is 8 or 16
inline __m256 scales8(const Sup* p, int64_t g0, int64_t n) {
  return _mm256_mul_ps(_mm256_set1_ps(p->sd[g0 / p->gps]), bytes8(p->s8 + g0, n, p->sgn));
}
inline __m256 offsets8(const Sup* p, int64_t g0, int64_t n) {
  return _mm256_mul_ps(_mm256_set1_ps(p->od[g0 / p->gps]), bytes8(p->o8 + g0, n, false));
}

// the 32 bits of b as 32 bytes (0xFF where set)
inline __m256i bytes_from_bits(uint32_t b) {
  const __m256i sh = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  const __m256i v = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)b), sh),
                                    _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1));
}

template <int KIND, bool QH, bool OFF, typename ST, int NR>
void qdot(const uint8_t* w, const int32_t* qh, const ST* s, const ST* o, int64_t ng, const QRow* xr, float* out,
          const char* pf) {
  constexpr int64_t WB = KIND == QB8_32 ? 32 : 16;
  constexpr int GPC = 32 / WB, LPG = 8 / GPC;
  __m256 acc[NR][2], accz[NR];
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = accz[r] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F), c16 = _mm256_set1_epi8(16), ones = _mm256_set1_epi16(1);
  const __m256i lane_g = LPG == 4 ? _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0) : _mm256_setzero_si256();
  constexpr int64_t SPAN = KIND == QB6 ? 96 : 8 * WB;  // weight bytes of 8 groups as stored
  for (int64_t g0 = 0; g0 < ng; g0 += 8) {
    if (pf) {  // the weight stream prefetched a fixed distance ahead, a line or a few at a time
      const char* p = pf + g0 / 8 * SPAN;
      for (int64_t b = 0; b < SPAN; b += 64) __builtin_prefetch(p + b);
    }
    const int64_t left = std::min<int64_t>(8, ng - g0);
    const __m256 sv = scales8(s, g0, left);
    __m256 F[NR];
    for (int r = 0; r < NR; ++r) {
      F[r] = _mm256_mul_ps(sv, _mm256_loadu_ps(xr[r].sxg + g0));
      accz[r] = _mm256_fnmadd_ps(sv, _mm256_loadu_ps(xr[r].T + g0), accz[r]);
      if constexpr (OFF) accz[r] = _mm256_fmadd_ps(offsets8(o, g0, left), _mm256_loadu_ps(xr[r].X + g0), accz[r]);
    }
    const int64_t b0 = g0 * WB, nb = left * WB, nch = (nb + 31) / 32;
    for (int64_t j = 0; j < nch; ++j) {
      const __m256i idx = _mm256_add_epi32(lane_g, _mm256_set1_epi32((int)(GPC * j)));
      if constexpr (KIND == QB6) {  // g0 = a half super-block (128 weights); chunk j = its weights 32j..
        const int64_t h = (g0 >> 3) & 1;
        const uint8_t* sb = w + 12 * (g0 - 8 * h);  // the super-block's 192 bytes
        const __m256i ql = _mm256_loadu_si256((const __m256i*)(sb + 64 * h + 32 * (j & 1)));
        const __m256i qh = _mm256_loadu_si256((const __m256i*)(sb + 128 + 32 * h));
        const __m256i lo = _mm256_and_si256((j >> 1) ? _mm256_srli_epi16(ql, 4) : ql, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, (int)(2 * j)), _mm256_set1_epi8(3));
        const __m256i wu = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));  // q in 0..63 (T takes the 32 back)
        const int64_t k0 = 16 * g0 + 32 * j;
        for (int r = 0; r < NR; ++r) {
          // q <= 63: pair sums <= 2 * 63 * 127, no saturation
          const __m256i d = _mm256_madd_epi16(
              _mm256_maddubs_epi16(wu, _mm256_loadu_si256((const __m256i*)(xr[r].xq + k0))), ones);
          acc[r][j & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_permutevar8x32_ps(F[r], idx), acc[r][j & 1]);
        }
        continue;
      }
      const uint8_t* wp = w + b0 + 32 * j;
      const bool full = 32 * (j + 1) <= nb;  // else one group of 16 bytes
      const __m256i wv = full ? _mm256_loadu_si256((const __m256i*)wp)
                              : _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128((const __m128i*)wp), 0);
      if constexpr (KIND == QB4) {
        __m256i lo = _mm256_and_si256(wv, m4), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4);
        if constexpr (QH) {
          const int64_t g = g0 + 2 * j;
          const uint32_t h0 = (uint32_t)qh[g], h1 = full ? (uint32_t)qh[g + 1] : 0u;
          lo = _mm256_or_si256(lo, _mm256_and_si256(bytes_from_bits((h0 & 0xFFFF) | (h1 << 16)), c16));
          hi = _mm256_or_si256(hi, _mm256_and_si256(bytes_from_bits((h0 >> 16) | (h1 & 0xFFFF0000u)), c16));
        }
        for (int r = 0; r < NR; ++r) {
          const int8_t* xb = xr[r].xq + 2 * (b0 + 32 * j);
          // q <= 31: each pair sum <= 2 * 31 * 127, low + high < 2^15: no saturation
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)xb)),
                                             _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xb + 32))));
          const __m256i d = _mm256_madd_epi16(p, ones);
          acc[r][j & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_permutevar8x32_ps(F[r], idx), acc[r][j & 1]);
        }
      } else {
        const __m256i aw = _mm256_sign_epi8(wv, wv);  // |q| (128 for -128, read unsigned)
        const int64_t k0 = b0 + 32 * j;
        for (int r = 0; r < NR; ++r) {
          const __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(xr[r].xq + k0)), wv);
          const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), ones);  // pairs <= 2*128*127
          acc[r][j & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_permutevar8x32_ps(F[r], idx), acc[r][j & 1]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = hsum(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), accz[r]));
}

#else
template <int KIND, bool QH, bool OFF, typename ST, int NR>
void qdot(const uint8_t* w, const int32_t* qh, const ST* s, const ST* o, int64_t ng, const QRow* xr, float* out, const char*) {
  constexpr int64_t G = (KIND == QB8_16 || KIND == QB6) ? 16 : 32;
  int8_t u[16];
  for (int r = 0; r < NR; ++r) {
    float acc = 0.f;
    for (int64_t g = 0; g < ng; ++g) {
      const int8_t* xq = xr[r].xq + G * g;
      int32_t d = 0;
      if constexpr (KIND == QB6) {
        const uint8_t* sb = w + 192 * (g / 16);
        const int64_t l0 = 16 * (g % 16);  // the group's first weight in its super-block
        for (int i = 0; i < 16; ++i) {
          const int64_t l = l0 + i, h = l / 128, c = (l % 128) / 32, k = l % 32;
          u[i] = (int8_t)(((sb[64 * h + 32 * (c & 1) + k] >> (4 * (c >> 1))) & 15) | (((sb[128 + 32 * h + k] >> (2 * c)) & 3) << 4));
          d += u[i] * xq[i];
        }
      } else if constexpr (KIND == QB4) {
        const uint32_t h = QH ? (uint32_t)qh[g] : 0u;
        for (int i = 0; i < 16; ++i) {
          const uint8_t b = w[16 * g + i];
          d += ((b & 15) + (int32_t)((h >> i) & 1) * 16) * xq[i];
          d += ((b >> 4) + (int32_t)((h >> (i + 16)) & 1) * 16) * xq[16 + i];
        }
      } else {
        const int8_t* wq = reinterpret_cast<const int8_t*>(w) + G * g;
        for (int i = 0; i < G; ++i) d += wq[i] * xq[i];
      }
      const float sg = scale1(s, g);
      acc += sg * xr[r].sxg[g] * (float)d - sg * xr[r].T[g];
      if constexpr (OFF) acc += offset1(o, g) * xr[r].X[g];
    }
    out[r] = acc;
  }
}
#endif

// ----------------------------------------------------------------------------- the ops' driver
struct Layout {
  // block4
  const uint8_t* q4 = nullptr;
  const int32_t* qh = nullptr;
  int32_t zero = 0;
  // block8
  const int8_t* q8 = nullptr;
  int64_t G = 32;
  // block6 (G = 16): 192 bytes per 256 weights (b6_unpack)
  const uint8_t* q6 = nullptr;
  int64_t row_bytes() const { return q4 ? K / 2 : q6 ? K / 4 * 3 : K; }
  // a block6 row as int8 (q - 32), for the float32 paths: a thread's buffer
  const int8_t* q8_row(int64_t n) const {
    if (!q6) return q8 + n * K;
    thread_local std::vector<int8_t> buf;
    if ((int64_t)buf.size() < K) buf.resize(K);
    b6_unpack(q6 + n * row_bytes(), K, buf.data());
    return buf.data();
  }
  // both
  const void* s = nullptr;
  const void* o = nullptr;
  bool half = false;
  int64_t N = 0, K = 0;
  // super-block scales (GGUF's K types): per group an 8-bit scale (s8: uint8, or int8 if s8_signed)
  // and offset (o8: uint8), times a float32 or float16 per gps groups (sd, od): s_g = sd[g / gps] * s8[g] and
  // o_g = od[g / gps] * o8[g], exactly the float32 products of the file's reference dequantization,
  // streamed at ~1 byte per group instead of 4. `expand` writes one row's as floats; s and o unused.
  const void* s8 = nullptr;
  bool s8_signed = false;
  SupD sd;
  const uint8_t* o8 = nullptr;
  SupD od;
  int64_t gps = 0;
  bool offsets() const { return o || o8; }

  void expand(int64_t n, float* so, float* oo) const {
    const int64_t ng = K / G, ns = ng / gps;
    const SupD d = sd + n * ns;
    if (s8_signed) {
      const int8_t* q = static_cast<const int8_t*>(s8) + n * ng;
      for (int64_t j = 0; j < ns; ++j)
        for (int64_t i = 0; i < gps; ++i) so[j * gps + i] = d[j] * (float)q[j * gps + i];
    } else {
      const uint8_t* q = static_cast<const uint8_t*>(s8) + n * ng;
      for (int64_t j = 0; j < ns; ++j)
        for (int64_t i = 0; i < gps; ++i) so[j * gps + i] = d[j] * (float)q[j * gps + i];
    }
    if (oo && o8) {
      const uint8_t* m = o8 + n * ng;
      const SupD e = od + n * ns;
      for (int64_t j = 0; j < ns; ++j)
        for (int64_t i = 0; i < gps; ++i) oo[j * gps + i] = e[j] * (float)m[j * gps + i];
    }
  }
  // this row's scales and offsets as ST arrays (expanded into sb / ob for super-block layouts)
  template <typename ST>
  void row_scales(int64_t n, float* sb, float* ob, const ST*& sp, const ST*& op) const {
    const int64_t ng = K / G;
    if constexpr (std::is_same_v<ST, float>) {
      if (sd) {
        expand(n, sb, o8 ? ob : nullptr);
        sp = sb;
        op = o8 ? ob : nullptr;
        return;
      }
    }
    sp = static_cast<const ST*>(s) + n * ng;
    op = o ? static_cast<const ST*>(o) + n * ng : nullptr;
  }

  template <typename ST>
  void row_t(int64_t n, float* out) const {
    const int64_t ng = K / G;
    thread_local std::vector<float> sb, ob;
    if (sd && (int64_t)sb.size() < ng) sb.resize(ng), ob.resize(ng);
    const ST *sp, *op;
    row_scales<ST>(n, sb.data(), ob.data(), sp, op);
    if (q4) {
      b4_row(q4 + n * (K / 2), qh ? qh + n * ng : nullptr, sp, op, zero, ng, out);
    } else {
      b8_row(q8_row(n), sp, K, G, out);
    }
  }
  void row(int64_t n, float* out) const { half ? row_t<half_t>(n, out) : row_t<float>(n, out); }

  template <typename ST>
  float dot_t(int64_t n, const float* x, const float* X) const {
    const int64_t ng = K / G;
    thread_local std::vector<float> sb, ob;
    if (sd && (int64_t)sb.size() < ng) sb.resize(ng), ob.resize(ng);
    const ST *sp, *op;
    row_scales<ST>(n, sb.data(), ob.data(), sp, op);
    float y;
    if (q4) {
      const uint8_t* w = q4 + n * (K / 2);
      y = qh ? b4_dot<ST, true>(w, qh + n * ng, sp, zero, x, ng) : b4_dot<ST, false>(w, nullptr, sp, zero, x, ng);
      if (op) {
        float t = 0.f;
        for (int64_t g = 0; g < ng; ++g) t += ldh(op + g) * X[g];
        y += t;
      }
    } else {
      y = G == 16 ? b8_dot<ST, 16>(q8_row(n), sp, x, ng) : b8_dot<ST, 32>(q8_row(n), sp, x, ng);
    }
    return y;
  }
  float dot(int64_t n, const float* x, const float* X) const {
    return half ? dot_t<half_t>(n, x, X) : dot_t<float>(n, x, X);
  }
};

template <int KIND, bool QH, bool OFF, typename ST>
void qrows(const Layout& L, const QAct& a, int64_t M, int64_t n0, int64_t n1, float* y, const float* bp) {
  const int64_t ng = a.ng, rb = L.row_bytes();
  const uint8_t* W = KIND == QB4 ? L.q4 : KIND == QB6 ? L.q6 : reinterpret_cast<const uint8_t*>(L.q8);
  // the scale / offset streams (super-block layouts: their 8-bit rows; the floats are few)
  const int64_t sbytes = L.sd ? 1 : (int64_t)sizeof(ST);
  const char* sbase = static_cast<const char*>(L.sd ? L.s8 : L.s);
  const char* obase = L.sd ? reinterpret_cast<const char*>(L.o8) : static_cast<const char*>(L.o);
  QRow xr[QMAX];
  for (int64_t m = 0; m < M; ++m) xr[m] = a.row(m);
  // software prefetch PF bytes ahead in each stream: a task's rows are one short stream per array,
  // restarted at every task, and the hardware prefetcher alone left decode at ~40% of the
  // machine's bandwidth (it ramps up too late on rows of a few hundred bytes). The SIMD qdots
  // prefetch the weights themselves, a few lines per 16 (8) groups (QDOT_STREAMS): a whole row
  // asked for at once stalled on rows of kilobytes (the 1.5B's down projections streamed at 30 GB/s
  // from DRAM against 62 from L3; 1.3x faster so; A/B runs on Zen 4, one row, the step's products:
  // AVX-512 1.10-1.13x on the 1.5B, 1.03x on the demo; the AVX2 build 1.09x and 1.05-1.07x;
  // verification's 6 and 11 rows 1.07x).
  const int64_t pd = std::max<int64_t>(1, (QPF + rb - 1) / rb);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = W + n * rb;
    const int32_t* qh = QH ? L.qh + n * ng : nullptr;
    {  // past the array's end is harmless: a prefetch never faults
      if constexpr (!QDOT_STREAMS) {
        const char* pw = reinterpret_cast<const char*>(w + pd * rb);
        for (int64_t b = 0; b < rb; b += 64) __builtin_prefetch(pw + b);
      }
      const char* ps = sbase + (n + pd) * ng * sbytes;
      for (int64_t b = 0; b < ng * sbytes; b += 64) __builtin_prefetch(ps + b);
      if constexpr (QH) {
        const char* ph = reinterpret_cast<const char*>(L.qh + (n + pd) * ng);
        for (int64_t b = 0; b < ng * 4; b += 64) __builtin_prefetch(ph + b);
      }
      if constexpr (OFF) {
        const char* po = obase + (n + pd) * ng * sbytes;
        for (int64_t b = 0; b < ng * sbytes; b += 64) __builtin_prefetch(po + b);
      }
    }
    const ST *sn, *on;
    Sup sup;
    if constexpr (std::is_same_v<ST, Sup>) {  // super-block scales: formed as the kernel loads them
      const int64_t ns = ng / L.gps;
      sup = {static_cast<const uint8_t*>(L.s8) + n * ng, L.sd + n * ns, L.o8 ? L.o8 + n * ng : nullptr,
             L.od ? L.od + n * ns : SupD{}, L.gps, L.s8_signed};
      sn = on = &sup;
    } else {
      L.row_scales<ST>(n, nullptr, nullptr, sn, on);
    }
    const float b = bp ? bp[n] : 0.f;
    const char* pf0 = QDOT_STREAMS ? reinterpret_cast<const char*>(w) + QPF : nullptr;
    float out[4];
    for (int64_t m = 0; m < M; m += 4) {  // 4 rows of x per pass over the weight row (L1 after the first)
      const int64_t r = std::min<int64_t>(4, M - m);
      const char* pf = m == 0 ? pf0 : nullptr;
      switch (r) {
        case 4: qdot<KIND, QH, OFF, ST, 4>(w, qh, sn, on, ng, xr + m, out, pf); break;
        case 3: qdot<KIND, QH, OFF, ST, 3>(w, qh, sn, on, ng, xr + m, out, pf); break;
        case 2: qdot<KIND, QH, OFF, ST, 2>(w, qh, sn, on, ng, xr + m, out, pf); break;
        default: qdot<KIND, QH, OFF, ST, 1>(w, qh, sn, on, ng, xr + m, out, pf);
      }
      for (int64_t i = 0; i < r; ++i) y[(m + i) * L.N + n] = out[i] + b;
    }
  }
}

using QFn = void (*)(const Layout&, const QAct&, int64_t, int64_t, int64_t, float*, const float*);

template <typename ST>
QFn qpick_t(const Layout& L) {
  if (L.q6) return qrows<QB6, false, false, ST>;
  if (!L.q4) return L.G == 16 ? qrows<QB8_16, false, false, ST> : qrows<QB8_32, false, false, ST>;
  if (L.qh) return L.offsets() ? qrows<QB4, true, true, ST> : qrows<QB4, true, false, ST>;
  return L.offsets() ? qrows<QB4, false, true, ST> : qrows<QB4, false, false, ST>;
}

at::Tensor run_linear(const Layout& L, const at::Tensor& x_, const std::optional<at::Tensor>& bias_, const char* op,
                      bool exact) {
  TORCH_CHECK(x_.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) == L.K, op, ": x must be [..., ", L.K, "], got ", x_.sizes());
  const at::Tensor x = x_.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    bias = bias_->to(at::kFloat).contiguous();
    TORCH_CHECK(bias.numel() == L.N, op, ": bias must have N = ", L.N, " values");
  }
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty(out_shape(x_, L.N), x_.options().dtype(at::kFloat));
  if (y.numel() == 0) return y;
  const int64_t M = y.numel() / L.N, K = L.K, N = L.N;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (!exact && M <= QMAX && K % 32 == 0) {
    // the default: int8 activations, integer dot products, each weight row read once for all rows
    QAct a;
    qprep(xp, M, K, L.q4 ? QB4 : L.q6 ? QB6 : (L.G == 16 ? QB8_16 : QB8_32), L.zero, L.offsets(), a);
    const QFn fn = L.sd ? qpick_t<Sup>(L) : L.half ? qpick_t<half_t>(L) : qpick_t<float>(L);
    const int64_t bytes = L.row_bytes() * M;
    pool::parallel(N, std::max<int64_t>(1, (32 << 10) / std::max<int64_t>(1, bytes)),
                   [&](int64_t n0, int64_t n1) { fn(L, a, M, n0, n1, yp, bp); });
    return y;
  }
  if (M <= 3) {
    // decode (and batches of up to 3 rows, where converting each weight row once per row of x
    // costs less than dequantizing into tiles): the blocks streamed once, from cache for rows 2-3
    const int64_t ng = K / L.G;
    std::vector<float> X(L.offsets() ? M * ng : 0);
    for (int64_t m = 0; m < M && L.offsets(); ++m)  // group sums of x, for the offsets
      for (int64_t g = 0; g < ng; ++g) {
        float t = 0.f;
        for (int64_t i = 0; i < L.G; ++i) t += xp[m * K + g * L.G + i];
        X[m * ng + g] = t;
      }
    const int64_t bytes = L.row_bytes();
    pool::parallel(N, std::max<int64_t>(1, (32 << 10) / std::max<int64_t>(1, bytes)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m)
          yp[m * N + n] = L.dot(n, xp + m * K, L.offsets() ? X.data() + m * ng : nullptr) + (bp ? bp[n] : 0.f);
    });
    return y;
  }
  // several rows: 32 output columns (two k16 blocks) per task, dequantized into a k16 buffer
  constexpr int64_t NV = F32_NV, COLS = 16 * NV;
  const int64_t tiles = (N + COLS - 1) / COLS;
  pool::parallel(tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(NV * K * 16), rows(16 * K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * COLS, nc = std::min<int64_t>(COLS, N - c0);
      for (int64_t j0 = 0; j0 < COLS; j0 += 16) {
        // 16 rows dequantized one after the other, then transposed k by k into the k16 block:
        // contiguous 64-byte stores (storing each row with a stride of 16 floats was 5x slower)
        const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, nc - j0));
        for (int64_t j = 0; j < 16; ++j) {
          if (j < n) L.row(c0 + j0 + j, rows.data() + j * K);
          else std::fill(rows.data() + j * K, rows.data() + (j + 1) * K, 0.f);
        }
        float* b = buf.data() + (j0 / 16) * K * 16;
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < 16; ++j) b[k * 16 + j] = rows[j * K + k];
      }
      const float* bs = bp ? bp + c0 : nullptr;
      if (nc > 16)
        f32_cols<F32_MR, NV>(buf.data(), K, xp, M, yp + c0, N, nc, bs);
      else
        f32_cols<F32_MR, 1>(buf.data(), K, xp, M, yp + c0, N, nc, bs);
    }
  });
  return y;
}

at::Tensor run_rows(const Layout& L, const at::Tensor& ids_) {
  TORCH_CHECK(ids_.scalar_type() == at::kLong, "block rows: ids must be int64");
  const at::Tensor ids = ids_.contiguous();
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(L.K);
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  const int64_t n = ids.numel();
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < L.N, "block rows: id ", ip[i], " out of range");
  float* op = out.data_ptr<float>();
  pool::parallel(n, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L.K)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) L.row(ip[i], op + i * L.K);
  });
  return out;
}

using OptT = std::optional<at::Tensor>;
using Keep = at::Tensor[6];

void check_scales(Layout& L, const at::Tensor& scales, const OptT& offsets, const OptT& sscales, const OptT& soffsets,
                  const char* op, Keep& keep) {
  const int64_t ng = L.K / L.G;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == L.N && scales.size(1) == ng, op, ": scales must be [", L.N, ", ",
              ng, "], got ", scales.sizes());
  const bool has_off = offsets.has_value() && offsets->defined();
  const bool has_soff = soffsets.has_value() && soffsets->defined();
  if (sscales.has_value() && sscales->defined()) {  // super-block scales (Layout::s8)
    TORCH_CHECK(scales.scalar_type() == at::kByte || scales.scalar_type() == at::kChar, op,
                ": scales under super-block scales must be uint8 or int8");
    const at::Tensor& sd = *sscales;
    TORCH_CHECK((sd.scalar_type() == at::kFloat || sd.scalar_type() == at::kHalf) && sd.dim() == 2 &&
                sd.size(0) == L.N && sd.size(1) > 0 && ng % sd.size(1) == 0, op,
                ": super-block scales must be float32 or float16 [", L.N, ", groups / n]");
    keep[2] = scales.contiguous();
    keep[4] = sd.contiguous();
    L.s8 = keep[2].data_ptr();
    L.s8_signed = scales.scalar_type() == at::kChar;
    L.sd = {keep[4].data_ptr(), sd.scalar_type() == at::kHalf};
    L.gps = ng / sd.size(1);
    TORCH_CHECK(L.gps == 8 || L.gps == 16, op, ": super-block scales must span 8 or 16 groups, not ", L.gps);
    TORCH_CHECK(has_off == has_soff, op, ": offsets and super-block offsets come together");
    if (has_off) {
      TORCH_CHECK(offsets->scalar_type() == at::kByte && offsets->sizes() == scales.sizes() &&
                  soffsets->scalar_type() == sd.scalar_type() && soffsets->sizes() == sd.sizes(), op,
                  ": offsets must be uint8 like scales, super-block offsets like super-block scales");
      keep[3] = offsets->contiguous();
      keep[5] = soffsets->contiguous();
      L.o8 = keep[3].data_ptr<uint8_t>();
      L.od = {keep[5].data_ptr(), sd.scalar_type() == at::kHalf};
    }
    return;
  }
  TORCH_CHECK(!has_soff, op, ": super-block offsets need super-block scales");
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf, op,
              ": scales must be float32 or float16 (or 8-bit with super-block scales)");
  keep[2] = scales.contiguous();
  L.s = keep[2].data_ptr();
  L.half = keep[2].scalar_type() == at::kHalf;
  if (has_off) {
    TORCH_CHECK(offsets->scalar_type() == keep[2].scalar_type() && offsets->sizes() == keep[2].sizes(), op,
                ": offsets must be like scales");
    keep[3] = offsets->contiguous();
    L.o = keep[3].data_ptr();
  }
}

Layout block4(const at::Tensor& qweight, const OptT& qh_, const at::Tensor& scales, const OptT& offsets, int64_t zero,
              const OptT& sscales, const OptT& soffsets, Keep& keep) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.size(1) % 16 == 0,
              "block4: qweight must be uint8 [N, K/2] with K a multiple of 32");
  Layout L;
  L.N = qweight.size(0);
  L.K = qweight.size(1) * 2;
  L.G = 32;
  L.zero = (int32_t)zero;
  keep[0] = qweight.contiguous();
  L.q4 = keep[0].data_ptr<uint8_t>();
  if (qh_.has_value() && qh_->defined()) {
    TORCH_CHECK(qh_->scalar_type() == at::kInt && qh_->dim() == 2 && qh_->size(0) == L.N && qh_->size(1) == L.K / 32,
                "block4: qh must be int32 [N, K/32]");
    keep[1] = qh_->contiguous();
    L.qh = keep[1].data_ptr<int32_t>();
  }
  check_scales(L, scales, offsets, sscales, soffsets, "block4", keep);
  return L;
}

Layout block8(const at::Tensor& qweight, const at::Tensor& scales, const OptT& sscales, Keep& keep) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, "block8: qweight must be int8 [N, K]");
  Layout L;
  L.N = qweight.size(0);
  L.K = qweight.size(1);
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) > 0 && L.K % scales.size(1) == 0, "block8: scales must be [N, K/G]");
  L.G = L.K / scales.size(1);
  TORCH_CHECK(L.G == 16 || L.G == 32, "block8: the group size must be 16 or 32, not ", L.G);
  keep[0] = qweight.contiguous();
  L.q8 = keep[0].data_ptr<int8_t>();
  check_scales(L, scales, std::nullopt, sscales, std::nullopt, "block8", keep);
  return L;
}

Layout block6(const at::Tensor& qweight, const at::Tensor& scales, const OptT& sscales, Keep& keep) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.size(1) % 192 == 0,
              "block6: qweight must be uint8 [N, K * 3/4] with K a multiple of 256");
  Layout L;
  L.N = qweight.size(0);
  L.K = qweight.size(1) / 192 * 256;
  L.G = 16;
  keep[0] = qweight.contiguous();
  L.q6 = keep[0].data_ptr<uint8_t>();
  check_scales(L, scales, std::nullopt, sscales, std::nullopt, "block6", keep);
  return L;
}

}  // namespace

at::Tensor block6_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const OptT& bias,
                         bool exact, const OptT& sscales) {
  Keep keep;
  return run_linear(block6(qweight, scales, sscales, keep), x, bias, "block6_linear", exact);
}

at::Tensor block6_rows(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& ids, const OptT& sscales) {
  Keep keep;
  return run_rows(block6(qweight, scales, sscales, keep), ids);
}

at::Tensor block4_linear(const at::Tensor& x, const at::Tensor& qweight, const OptT& qh, const at::Tensor& scales,
                         const OptT& offsets, int64_t zero, const OptT& bias, bool exact, const OptT& sscales,
                         const OptT& soffsets) {
  Keep keep;
  return run_linear(block4(qweight, qh, scales, offsets, zero, sscales, soffsets, keep), x, bias, "block4_linear",
                    exact);
}

at::Tensor block8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const OptT& bias,
                         bool exact, const OptT& sscales) {
  Keep keep;
  return run_linear(block8(qweight, scales, sscales, keep), x, bias, "block8_linear", exact);
}

at::Tensor block4_rows(const at::Tensor& qweight, const OptT& qh, const at::Tensor& scales, const OptT& offsets,
                       int64_t zero, const at::Tensor& ids, const OptT& sscales, const OptT& soffsets) {
  Keep keep;
  return run_rows(block4(qweight, qh, scales, offsets, zero, sscales, soffsets, keep), ids);
}

at::Tensor block8_rows(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& ids, const OptT& sscales) {
  Keep keep;
  return run_rows(block8(qweight, scales, sscales, keep), ids);
}

}  // namespace QWEN2_NS
