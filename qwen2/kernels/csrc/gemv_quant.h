// One-row (decode) matrix-vector products over int8 / int4 weights with integer dot products.
//
// Both ops quantize the activation row x to int8 in blocks of 32 (llama.cpp's Q8_0 activations):
//     sx_b = amax_b / 127 (fp32),  xq_k = round_half_even(x_k * (127 / amax_b)) in -127..127
// and then compute, per output row n, with exact int32 block dot products:
//     int8:  y_n = s_n * sum_b sx_b * sum_{k in b} xq_k * w_nk
//     int4:  y_n = sum_g s_ng * sum_{b in g} sx_b * (sum_{k in b} q_nk * xq_k - z_ng * S_b),
//            S_b = sum_{k in b} xq_k, z_ng = zeros[n, g] (8 when zeros is None)
// in fp32 from there on. The only approximation beyond fp32 rounding is the activation rounding,
// |x_k - sx_b * xq_k| <= sx_b / 2 = amax_b / 254, so |y_n - exact_n| <= sum_b amax_b / 254 *
// sum_{k in b} |w_nk| (plus fp32 accumulation error).
//
// Layouts: int8 qweight int8 [N, K]; int4 qweight uint8 [N, K/2] in "halves" order (byte i of
// group g holds q[g*G + i] in its low nibble and q[g*G + G/2 + i] in its high one), scales
// [N, K/G], zeros uint8 [N, K/G] or None. The kernels read these as they are; the activation row
// is permuted once per call instead, so that every 32-byte load of weights meets its activations.
//
// Code paths, chosen at compile time (-march=native): AVX512-VNNI (vpdpbusd; int4 high nibbles by
// GFNI vgf2p8affineqb where the CPU has it), AVX2+FMA (vpmaddubsw + vpmaddwd), and scalar. Rows are
// split over torch's intra-op threads.
//
// This header: what the two (gemv_int8.cpp, gemv_int4.cpp) share, the int8 activation row
// (gemv_quant.cpp), the row tiling and the argument checks.
#pragma once

#include "common.h"

namespace QWEN2_NS {

// ----------------------------------------------------------------------------- activations
// xq: int8, zero-padded to a multiple of 64; sx, S: per block of 32 (padded with zeros).
struct Act {
  int64_t K = 0, nb = 0;
  std::vector<int8_t> xq;
  std::vector<float> sx;
  std::vector<int32_t> S;
};

// x (float32 or bfloat16 read as it is, anything else converted to float32) quantized into a
void quantize_x(const at::Tensor& x, int64_t K, Act& a);

// Row tiles: R rows share every activation load. 1 is fastest on the AVX512 machine measured
// (interleaved rows 2-3x slower from DRAM: the prefetcher loses the streams); the AVX2 and scalar
// kernels take any R.
#ifndef QWEN2_ROWS
#define QWEN2_ROWS 1
#endif
constexpr int R = QWEN2_ROWS;

inline int64_t check_x(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K && x.numel() == K, op, ": x must be one row of ", K,
              " values ([K] or [1, K]), got ", x.sizes());
  return K;
}

inline at::Tensor scales_f(const at::Tensor& s) {
  // fp32 and bf16 are read as they are; anything else (fp16) is converted once
  if (s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16) return s.contiguous();
  return s.to(at::kFloat).contiguous();
}

}  // namespace QWEN2_NS
