// Shared by every kernel file: the instruction-set selection (made once, here, from the compiler's
// -march flags, so that every file of one build takes the same path), the op namespace QWEN2_NS (one
// per build variant, so that several builds can live in one process), bf16 loads, horizontal sums,
// exp, and the declarations of the ops that ops.cpp registers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
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
#if defined(QWEN2_AVX512) && defined(__AVX512BF16__)
#define QWEN2_BF16DP 1  // vdpbf16ps: bf16_gemv's path for a bf16 x
#endif

namespace QWEN2_NS {

using bf16_t = uint16_t;

inline float ld1(const float* p) { return *p; }
inline float ld1(const bf16_t* p) {
  uint32_t u = uint32_t(*p) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
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

#if defined(QWEN2_AVX512)
// 16 bf16 values (the lanes of mask m; the others 0) widened exactly to fp32
inline __m512 bf16x16m(const bf16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

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
#endif

inline std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = N;
  return s;
}

// ----------------------------------------------------------------------------- the ops (ops.cpp registers them)
// gemv_int8.cpp, gemv_int4.cpp, gemv_bf16.cpp: one-row matrix-vector products
at::Tensor int8_gemv(const at::Tensor& x_, const at::Tensor& qweight, const at::Tensor& scales_);
at::Tensor int4_gemv(const at::Tensor& x_, const at::Tensor& qweight, const at::Tensor& scales_,
                     const std::optional<at::Tensor>& zeros_, int64_t G);
at::Tensor bf16_gemv(const at::Tensor& x_, const at::Tensor& weight);
// f32_linear.cpp: fp32 weights packed in k16 blocks, any number of rows; rows of such a weight
at::Tensor f32_linear(const at::Tensor& x_, const at::Tensor& packed, int64_t N, const std::optional<at::Tensor>& bias_);
at::Tensor f32_rows(const at::Tensor& packed_, const at::Tensor& ids_);
// elementwise.cpp: serving helpers
at::Tensor silu_mul(const at::Tensor& x_);
at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& w_, double eps);
at::Tensor& rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor argmax_rows(const at::Tensor& x, int64_t n);
// block_linear.cpp: weights quantized in blocks (GGUF's block types, repacked), fp32 activations
at::Tensor block4_linear(const at::Tensor& x, const at::Tensor& qweight, const std::optional<at::Tensor>& qh,
                         const at::Tensor& scales, const std::optional<at::Tensor>& offsets, int64_t zero,
                         const std::optional<at::Tensor>& bias, bool exact, const std::optional<at::Tensor>& sscales,
                         const std::optional<at::Tensor>& soffsets);
at::Tensor block8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const std::optional<at::Tensor>& bias, bool exact, const std::optional<at::Tensor>& sscales);
at::Tensor block4_rows(const at::Tensor& qweight, const std::optional<at::Tensor>& qh, const at::Tensor& scales,
                       const std::optional<at::Tensor>& offsets, int64_t zero, const at::Tensor& ids,
                       const std::optional<at::Tensor>& sscales, const std::optional<at::Tensor>& soffsets);
at::Tensor block8_rows(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& ids,
                       const std::optional<at::Tensor>& sscales);
at::Tensor block6_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const std::optional<at::Tensor>& bias, bool exact, const std::optional<at::Tensor>& sscales);
at::Tensor block6_rows(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& ids,
                       const std::optional<at::Tensor>& sscales);
// attention.cpp: decode attention over the paged KV pool
at::Tensor paged_attention(const at::Tensor& q_, const at::Tensor& kpool, const at::Tensor& vpool,
                           const at::Tensor& slots_, const at::Tensor& lens_, double scale, int64_t window);

}  // namespace QWEN2_NS
