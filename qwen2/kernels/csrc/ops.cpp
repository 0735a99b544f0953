// The torch ops: torch.ops.<QWEN2_NS>.* (qwen2 for the native build; see qwen2/kernels/__init__.py).
// Each op is defined in the file common.h names; the thread pool is threadpool.cpp.
#include <torch/library.h>

#include "common.h"

namespace QWEN2_NS {
namespace {

std::string isa() {
#if defined(QWEN2_AVX512) && defined(QWEN2_BF16DP)
  return "avx512_vnni_bf16";
#elif defined(QWEN2_AVX512)
  return "avx512_vnni";
#elif defined(QWEN2_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace
}  // namespace QWEN2_NS

using namespace QWEN2_NS;

#define QWEN2_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define QWEN2_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

QWEN2_LIBRARY(QWEN2_NS, m) {
  m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int group_size) -> Tensor");
  m.def("bf16_gemv(Tensor x, Tensor weight) -> Tensor");
  m.def("f32_linear(Tensor x, Tensor packed, int N, Tensor? bias) -> Tensor");
  m.def("f32_rows(Tensor packed, Tensor ids) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> Tensor(a!)");
  m.def("argmax_rows(Tensor x, int n) -> Tensor");
  m.def("paged_attention(Tensor q, Tensor kpool, Tensor vpool, Tensor slots, Tensor lens, float scale, int window) -> Tensor");
  m.def("block4_linear(Tensor x, Tensor qweight, Tensor? qh, Tensor scales, Tensor? offsets, int zero, Tensor? bias, bool exact=False, Tensor? sscales=None, Tensor? soffsets=None) -> Tensor");
  m.def("block8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, bool exact=False, Tensor? sscales=None) -> Tensor");
  m.def("block4_rows(Tensor qweight, Tensor? qh, Tensor scales, Tensor? offsets, int zero, Tensor ids, Tensor? sscales=None, Tensor? soffsets=None) -> Tensor");
  m.def("block8_rows(Tensor qweight, Tensor scales, Tensor ids, Tensor? sscales=None) -> Tensor");
  m.def("block6_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, bool exact=False, Tensor? sscales=None) -> Tensor");
  m.def("block6_rows(Tensor qweight, Tensor scales, Tensor ids, Tensor? sscales=None) -> Tensor");
  m.def("isa() -> str", &isa);
}

QWEN2_LIBRARY_IMPL(QWEN2_NS, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("bf16_gemv", &bf16_gemv);
  m.impl("f32_linear", &f32_linear);
  m.impl("f32_rows", &f32_rows);
  m.impl("silu_mul", &silu_mul);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope_", &rope_);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("paged_attention", &paged_attention);
  m.impl("block4_linear", &block4_linear);
  m.impl("block8_linear", &block8_linear);
  m.impl("block4_rows", &block4_rows);
  m.impl("block8_rows", &block8_rows);
  m.impl("block6_linear", &block6_linear);
  m.impl("block6_rows", &block6_rows);
}
