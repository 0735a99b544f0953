// The fp32 register tiles of f32_linear (f32_linear.cpp), shared with the GGUF block kernels
// (gguf_linear.cpp), which dequantize a few 16-column blocks into this layout and run the same tiles.
#pragma once

#include "common.h"

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

}  // namespace
}  // namespace QWEN2_NS
