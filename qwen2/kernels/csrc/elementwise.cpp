// Small fp32 ops of a serving step that torch runs slowly at these shapes (each a handful of
// dispatches, strided views or a single-threaded reduction): decode attention straight from the
// paged KV pool, silu(gate) * up, RMSNorm and the greedy argmax.
// This file: silu_mul, rms_norm, rope_, argmax_rows; attention.cpp: paged_attention.
#include "common.h"
#include "threadpool.h"

namespace QWEN2_NS {

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

// x <- x * cos + rotate_half(x) * sin in place, rotate_half(x) = cat(-x[D/2:], x[:D/2]): the
// rotary embedding of q or k [B, H, T, D] (any strides, D contiguous) with cos / sin [B or 1, 1,
// T, D]. Products and the sum rounded separately, as torch's eager ops do (no fused multiply-add):
// the same bits as the model's apply_rope, in one dispatch instead of six.
at::Tensor& rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
              x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), "rope_: float32 CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && sin.sizes() == cos.sizes() && sin.strides() == cos.strides(),
              "rope_: x must be [B, H, T, D], cos and sin alike [B or 1, 1, T, D]");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && cos.size(3) == D && cos.size(2) == T && cos.size(1) == 1 &&
              (cos.size(0) == B || cos.size(0) == 1), "rope_: cos/sin ", cos.sizes(), " do not fit x ", x.sizes());
  TORCH_CHECK(x.stride(3) == 1 && cos.stride(3) == 1, "rope_: the last dimension must be contiguous");
  if (x.numel() == 0) return x;
  float* xp = x.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1), sx2 = x.stride(2);
  const int64_t sc0 = cos.size(0) == 1 ? 0 : cos.stride(0), sc2 = cos.stride(2);
  pool::parallel(B * H * T, std::max<int64_t>(1, 8192 / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * T), h = (r / T) % H, t = r % T;
      float* p = xp + b * sx0 + h * sx1 + t * sx2;
      const float* c = cp + b * sc0 + t * sc2;
      const float* s = sp + b * sc0 + t * sc2;
      int64_t i = 0;
#if defined(QWEN2_AVX512)
      for (; i + 16 <= half; i += 16) {
        const __m512 x1 = _mm512_loadu_ps(p + i), x2 = _mm512_loadu_ps(p + i + half);
        __m512 a1 = _mm512_mul_ps(x1, _mm512_loadu_ps(c + i)), b1 = _mm512_mul_ps(x2, _mm512_loadu_ps(s + i));
        __m512 a2 = _mm512_mul_ps(x2, _mm512_loadu_ps(c + i + half)), b2 = _mm512_mul_ps(x1, _mm512_loadu_ps(s + i + half));
        asm("" : "+v"(a1), "+v"(b1), "+v"(a2), "+v"(b2));  // each product rounded on its own: no FMA
        _mm512_storeu_ps(p + i, _mm512_sub_ps(a1, b1));
        _mm512_storeu_ps(p + i + half, _mm512_add_ps(a2, b2));
      }
#elif defined(QWEN2_AVX2)
      for (; i + 8 <= half; i += 8) {
        const __m256 x1 = _mm256_loadu_ps(p + i), x2 = _mm256_loadu_ps(p + i + half);
        __m256 a1 = _mm256_mul_ps(x1, _mm256_loadu_ps(c + i)), b1 = _mm256_mul_ps(x2, _mm256_loadu_ps(s + i));
        __m256 a2 = _mm256_mul_ps(x2, _mm256_loadu_ps(c + i + half)), b2 = _mm256_mul_ps(x1, _mm256_loadu_ps(s + i + half));
        asm("" : "+x"(a1), "+x"(b1), "+x"(a2), "+x"(b2));
        _mm256_storeu_ps(p + i, _mm256_sub_ps(a1, b1));
        _mm256_storeu_ps(p + i + half, _mm256_add_ps(a2, b2));
      }
#endif
      for (; i < half; ++i) {
        const float x1 = p[i], x2 = p[i + half];
        volatile float a1 = x1 * c[i], b1 = x2 * s[i], a2 = x2 * c[i + half], b2 = x1 * s[i + half];
        p[i] = a1 - b1;
        p[i + half] = a2 + b2;
      }
    }
  });
  return x;
}

}  // namespace QWEN2_NS
