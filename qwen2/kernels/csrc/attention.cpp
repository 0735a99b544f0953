// paged_attention: decode attention straight from the paged KV pool (a serving helper, like the ops
// of elementwise.cpp).
#include "common.h"
#include "threadpool.h"

namespace QWEN2_NS {
namespace {

#if defined(QWEN2_AVX512)
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

}  // namespace

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

}  // namespace QWEN2_NS
