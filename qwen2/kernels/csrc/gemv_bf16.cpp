// bf16_gemv: bf16 [N, K] weights (a plain nn.Linear weight) times one bf16 or fp32 row, no quantization.
#include "common.h"

namespace QWEN2_NS {
namespace {

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
#if defined(QWEN2_BF16DP)
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

}  // namespace

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

}  // namespace QWEN2_NS
