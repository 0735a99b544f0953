// The int8 activations of the integer GEMVs (see gemv_quant.h).
#include "gemv_quant.h"

namespace QWEN2_NS {
namespace {

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

}  // namespace

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

}  // namespace QWEN2_NS
