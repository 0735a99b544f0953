// f32_linear over fp32 weights packed in k16 blocks (kernels.f32_pack), and f32_rows: rows of such
// a packed weight (an embedding lookup from a tied lm_head).
#include "common.h"
#include "threadpool.h"

namespace QWEN2_NS {
namespace {

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

}  // namespace

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

}  // namespace QWEN2_NS
