"""The model runner: which speed passes a model gets, and how one engine step runs it.

`prepare(model, mode)` applies the fastest path for the machine once, in place, before the engine
drives the model (the CLI, `qwen2.load` and the server all call it; "auto" is the default):

* float32 on the CPU with qwen2's kernels built: the packed fp32 kernels (qwen2.engine.fast), one
  copy of the weights serving one row, batches and prefill at memory bandwidth. (Compiling a
  float32 step is no faster than these kernels, and costs start-up time.) A GGUF file loaded at
  its own precision (qwen2.quant.blocks) takes the same path, its blocks run by the block kernels
  ("gguf-blocks"): no compile, and qwen2's own threads (see below).
* bfloat16 / int8 / int4: the compiled decode step (qwen2.engine.compiled: Inductor's generated
  C++ and qwen2's GEMV kernels, weights in huge pages). Compiling costs 30-60 s on the first run on
  2 cores; Inductor keeps what it built in its on-disk cache, so later runs start in seconds.
* models the step cannot trace (MoE, long-context attention variants) or no C++ compiler: eager,
  with oneDNN matmuls for bfloat16 where the CPU has AVX-512, and PyTorch's packed int4 matmuls
  for quantized weights when qwen2's kernels could not be built.

`mode="eager"` turns every pass off (`--eager` on the command line); "compiled" asks for the
compiled step whatever the dtype.
"""
from __future__ import annotations

import torch

from qwen2 import kernels
from qwen2.engine.compiled import can_compile, compile_decode
from qwen2.engine.fast import f32_supported, prepare_for_serving
from qwen2.errors import Qwen2Error
from qwen2.kernels.memory import hugepage_weights
from qwen2.quant.blocks import BlockLinear
from qwen2.quant.linear import OneDNNLinear, QuantLinear, pack_linears

MODES = ("auto", "compiled", "eager")


def prepare(model, mode: str = "auto") -> str:
    """Apply the speed passes of `mode` to `model` in place; returns the path taken ("f32-kernels",
    "gguf-blocks", "compiled", "onednn" or "eager")."""
    if mode not in MODES:
        raise Qwen2Error(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "eager" or model.device.type != "cpu":
        return "eager"
    if mode == "auto" and f32_supported(model):
        prepare_for_serving(model)
        if any(isinstance(m, BlockLinear) for m in model.modules()):
            hugepage_weights(model)  # a GGUF file's own blocks: decode streams them through 2 MB pages
            return "gguf-blocks"
        return "f32-kernels"
    if mode == "compiled" or can_compile(model) is None:
        compile_decode(model)
        if model.decode_step is not None:
            return "compiled"
    prepare_for_serving(model)
    if not kernels.available() and any(isinstance(m, QuantLinear) for m in model.modules()):
        pack_linears(model)  # no qwen2 kernels: PyTorch's own packed int4 / int8 matmuls
    return "onednn" if any(isinstance(m, OneDNNLinear) for m in model.modules()) else "eager"


@torch.inference_mode()  # parameters are trainable; an engine step never records autograd history
def forward(model, packed, pool, prompt_len: int | None = None) -> torch.Tensor:
    """Logits [num_logits, vocab] of one packed engine step (qwen2.engine.paged.PackedStep):
    decode-only steps through the compiled step when the model has one, everything else eagerly.
    prompt_len: the one sequence's prompt length, for a rotary that depends on it."""
    compiled = getattr(model, "decode_step", None)
    d = packed.decode
    if compiled is not None and not packed.prefills and d is not None and d.q_index is None:
        logits = compiled.paged(packed, pool)
        if logits is not None:
            return logits
    if prompt_len is not None:
        model.rotary.begin_prompt(packed, torch.tensor([prompt_len]))
    return model(packed.input_ids, position_ids=packed.position_ids, cache=packed,
                 logits_to_keep=max(packed.num_logits, 1))[0]
