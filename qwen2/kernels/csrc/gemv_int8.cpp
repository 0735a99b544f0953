// int8_gemv: int8 [N, K] weights, one scale per row (numerics: gemv_quant.h).
#include "gemv_quant.h"

namespace QWEN2_NS {
namespace {

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

}  // namespace

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

}  // namespace QWEN2_NS
