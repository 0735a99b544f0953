// f32_linear over fp32 weights packed in k16 blocks (kernels.f32_pack), and f32_rows: rows of such
// a packed weight (an embedding lookup from a tied lm_head).
#include "common.h"
#include "f32_tile.h"
#include "threadpool.h"

namespace QWEN2_NS {
namespace {

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
