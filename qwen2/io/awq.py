"""AutoAWQ's GEMM checkpoint layout (the official Qwen2-*-Instruct-AWQ releases), read onto
`qwen2.quant.linear.QuantLinear` (asymmetric int4: the int4 kernels take a zero point per group).

Per linear layer, named like the HF weight it replaces (fused projections of the model are saved
as their parts, as in the GPTQ layout):
    <name>.qweight  int32 [in, out / 8]         8 values along `out` per int32
    <name>.qzeros   int32 [n_groups, out / 8]   zero points, packed the same way
    <name>.scales   float16 [n_groups, out]
    <name>.bias     as in the float checkpoint
Inside each int32, nibble k (bits 4k..4k+3) holds column AWQ_ORDER[k] of its 8 (AutoAWQ's
packing for its GEMM kernel), and w = (q - z) * s with one (s, z) per `group_size` inputs.
config.json: "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
"zero_point": true, "version": "gemm"}. Embeddings, norms and the lm_head are float.
"""
from __future__ import annotations

import torch

from qwen2.errors import CheckpointError
from qwen2.io.gptq import load_packed

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_awq(p: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] in AutoAWQ's nibble order -> uint8 [R, C] in column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    v = ((p.to(torch.int64)[..., None] & 0xFFFFFFFF) >> shifts) & 15  # [R, C/8, 8]: nibble k
    cols = torch.empty_like(v)
    cols[..., list(AWQ_ORDER)] = v  # nibble k is column AWQ_ORDER[k]
    return cols.reshape(p.shape[0], -1).to(torch.uint8)


def from_awq(t: dict[str, torch.Tensor], group_size: int, name: str):
    """The three AWQ tensors -> (q uint8 [out, in], scales float32 [n_groups, out], zeros uint8
    [n_groups, out])."""
    try:
        q = unpack_awq(t["qweight"]).T.contiguous()
        zeros = unpack_awq(t["qzeros"])
        scales = t["scales"].float()
    except KeyError as e:
        raise CheckpointError(f"{name}: missing AWQ tensor {e}") from None
    out_f, in_f = q.shape
    n_groups = in_f // group_size if group_size > 0 else 1
    if in_f % max(group_size, 1) or tuple(scales.shape) != (n_groups, out_f) or tuple(zeros.shape) != (n_groups, out_f):
        raise CheckpointError(f"{name}: AWQ tensors qweight {list(t['qweight'].shape)}, qzeros "
                              f"{list(t['qzeros'].shape)}, scales {list(scales.shape)} do not fit group size {group_size}")
    return q, scales, zeros


def load_awq(config, tensors, dtype, device="cpu", source="checkpoint", release=None, float_head=False):
    """Build a model from an AWQ (GEMM) tensor stream; release, float_head: as load_packed's."""
    qc = config.raw.get("quantization_config") or {}
    bits, gs = int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", 128)))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or qc.get("zero_point", True) is False:
        raise CheckpointError(f"{source}: AWQ bits={bits} version={version!r} zero_point={qc.get('zero_point', True)} "
                              "is not supported (4-bit GEMM with zero points, as the official releases)")
    if qc.get("modules_to_not_convert"):
        raise CheckpointError(f"{source}: AWQ modules_to_not_convert is not supported")
    model = load_packed(config, tensors, dtype, device, source, release, ("qweight", "qzeros", "scales"),
                        lambda t, name: from_awq(t, gs, name), bits, gs if gs > 0 else -1, lm_head=False,
                        float_head=float_head)
    model.quant["sym"] = False
    return model
