// block4_linear / block8_linear: linear layers over weights quantized in blocks, the layouts that
// GGUF's block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) repack into without loss
// (qwen2/quant/blocks.py), with float32 activations, so that the result is the dequantized
// weight's product up to float32 rounding (no activation quantization).
//
// block4: groups of 32 weights along k, q in 0..15 (or 0..31 with the qh bit plane):
//     w[n, k] = s[n, g] * (q[n, k] - zero) + o[n, g]          g = k / 32
//   qweight uint8 [N, K/2]: byte i of group g holds q[g*32 + i] in its low nibble and
//   q[g*32 + 16 + i] in its high one (Q4_0 / Q5_0's own order); qh int32 [N, K/32] or None: bit j
//   adds 16 to q[g*32 + j]; scales, offsets (or None) [N, K/32], float32 or float16.
// block8: groups of G = 16 or 32, q int8 [N, K]: w[n, k] = s[n, k / G] * q[n, k].
//
// One row (decode; up to 3 rows likewise, each weight row converted once per row of x): the
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

// ----------------------------------------------------------------------------- the ops' driver
struct Layout {
  // block4
  const uint8_t* q4 = nullptr;
  const int32_t* qh = nullptr;
  int32_t zero = 0;
  // block8
  const int8_t* q8 = nullptr;
  int64_t G = 32;
  // both
  const void* s = nullptr;
  const void* o = nullptr;
  bool half = false;
  int64_t N = 0, K = 0;

  template <typename ST>
  void row_t(int64_t n, float* out) const {
    const int64_t ng = K / G;
    const ST* sp = static_cast<const ST*>(s) + n * ng;
    if (q4) {
      const ST* op = o ? static_cast<const ST*>(o) + n * ng : nullptr;
      b4_row(q4 + n * (K / 2), qh ? qh + n * ng : nullptr, sp, op, zero, ng, out);
    } else {
      b8_row(q8 + n * K, sp, K, G, out);
    }
  }
  void row(int64_t n, float* out) const { half ? row_t<half_t>(n, out) : row_t<float>(n, out); }

  template <typename ST>
  float dot_t(int64_t n, const float* x, const float* X) const {
    const int64_t ng = K / G;
    const ST* sp = static_cast<const ST*>(s) + n * ng;
    float y;
    if (q4) {
      const uint8_t* w = q4 + n * (K / 2);
      y = qh ? b4_dot<ST, true>(w, qh + n * ng, sp, zero, x, ng) : b4_dot<ST, false>(w, nullptr, sp, zero, x, ng);
      if (o) {
        const ST* op = static_cast<const ST*>(o) + n * ng;
        float t = 0.f;
        for (int64_t g = 0; g < ng; ++g) t += ldh(op + g) * X[g];
        y += t;
      }
    } else {
      y = G == 16 ? b8_dot<ST, 16>(q8 + n * K, sp, x, ng) : b8_dot<ST, 32>(q8 + n * K, sp, x, ng);
    }
    return y;
  }
  float dot(int64_t n, const float* x, const float* X) const {
    return half ? dot_t<half_t>(n, x, X) : dot_t<float>(n, x, X);
  }
};

at::Tensor run_linear(const Layout& L, const at::Tensor& x_, const std::optional<at::Tensor>& bias_, const char* op) {
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
  if (M <= 3) {
    // decode (and batches of up to 3 rows, where converting each weight row once per row of x
    // costs less than dequantizing into tiles): the blocks streamed once, from cache for rows 2-3
    const int64_t ng = K / L.G;
    std::vector<float> X(L.o ? M * ng : 0);
    for (int64_t m = 0; m < M && L.o; ++m)  // group sums of x, for the offsets
      for (int64_t g = 0; g < ng; ++g) {
        float t = 0.f;
        for (int64_t i = 0; i < L.G; ++i) t += xp[m * K + g * L.G + i];
        X[m * ng + g] = t;
      }
    const int64_t bytes = L.q4 ? K / 2 : K;
    pool::parallel(N, std::max<int64_t>(1, (32 << 10) / std::max<int64_t>(1, bytes)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m)
          yp[m * N + n] = L.dot(n, xp + m * K, L.o ? X.data() + m * ng : nullptr) + (bp ? bp[n] : 0.f);
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

void check_scales(Layout& L, const at::Tensor& scales, const std::optional<at::Tensor>& offsets, const char* op,
                  at::Tensor& s, at::Tensor& o) {
  const int64_t ng = L.K / L.G;
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf, op,
              ": scales must be float32 or float16");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == L.N && scales.size(1) == ng, op, ": scales must be [", L.N, ", ",
              ng, "], got ", scales.sizes());
  s = scales.contiguous();
  L.s = s.data_ptr();
  L.half = s.scalar_type() == at::kHalf;
  if (offsets.has_value() && offsets->defined()) {
    TORCH_CHECK(offsets->scalar_type() == s.scalar_type() && offsets->sizes() == s.sizes(), op,
                ": offsets must be like scales");
    o = offsets->contiguous();
    L.o = o.data_ptr();
  }
}

Layout block4(const at::Tensor& qweight, const std::optional<at::Tensor>& qh_, const at::Tensor& scales,
              const std::optional<at::Tensor>& offsets, int64_t zero, at::Tensor (&keep)[4]) {
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
  check_scales(L, scales, offsets, "block4", keep[2], keep[3]);
  return L;
}

Layout block8(const at::Tensor& qweight, const at::Tensor& scales, at::Tensor (&keep)[4]) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, "block8: qweight must be int8 [N, K]");
  Layout L;
  L.N = qweight.size(0);
  L.K = qweight.size(1);
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) > 0 && L.K % scales.size(1) == 0, "block8: scales must be [N, K/G]");
  L.G = L.K / scales.size(1);
  TORCH_CHECK(L.G == 16 || L.G == 32, "block8: the group size must be 16 or 32, not ", L.G);
  keep[0] = qweight.contiguous();
  L.q8 = keep[0].data_ptr<int8_t>();
  check_scales(L, scales, std::nullopt, "block8", keep[2], keep[3]);
  return L;
}

}  // namespace

at::Tensor block4_linear(const at::Tensor& x, const at::Tensor& qweight, const std::optional<at::Tensor>& qh,
                         const at::Tensor& scales, const std::optional<at::Tensor>& offsets, int64_t zero,
                         const std::optional<at::Tensor>& bias) {
  at::Tensor keep[4];
  return run_linear(block4(qweight, qh, scales, offsets, zero, keep), x, bias, "block4_linear");
}

at::Tensor block8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const std::optional<at::Tensor>& bias) {
  at::Tensor keep[4];
  return run_linear(block8(qweight, scales, keep), x, bias, "block8_linear");
}

at::Tensor block4_rows(const at::Tensor& qweight, const std::optional<at::Tensor>& qh, const at::Tensor& scales,
                       const std::optional<at::Tensor>& offsets, int64_t zero, const at::Tensor& ids) {
  at::Tensor keep[4];
  return run_rows(block4(qweight, qh, scales, offsets, zero, keep), ids);
}

at::Tensor block8_rows(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& ids) {
  at::Tensor keep[4];
  return run_rows(block8(qweight, scales, keep), ids);
}

}  // namespace QWEN2_NS
