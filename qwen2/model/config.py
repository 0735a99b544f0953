"""Model configuration: one dataclass, read from a checkpoint's config.json, plus named presets.

The values always come from the checkpoint (the checkpoint wins over any default); the presets only exist
so that tests and benchmarks can build random-weight models of the released sizes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen2.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_moe")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    model_type: str = "qwen2"
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None  # {"rope_type": "yarn", "factor": ..., ...} or None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention"
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Mixture of experts (qwen2_moe)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    # Dual chunk attention (long context), e.g. {"chunk_size": 8192, "local_size": 1024}
    dual_chunk_attention_config: dict | None = None
    # First-generation Qwen's inference-time long context (qwen2.io.qwen1), its config.json keys:
    # past seq_length tokens, dynamic NTK rotary and logn-scaled queries. None / off for Qwen2.
    seq_length: int | None = None
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False
    # The checkpoint's own config.json, kept so that saving writes back what we read.
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.use_sliding_window:
            self.sliding_window = None
        if not self.layer_types:
            self.layer_types = [
                "sliding_attention"
                if self.sliding_window is not None and i >= self.max_window_layers
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise CheckpointError(
                f"config: layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError("config: num_attention_heads must be a multiple of num_key_value_heads")
        if (self.use_dynamic_ntk or self.use_logn_attn) and not self.seq_length:
            raise CheckpointError("config: use_dynamic_ntk / use_logn_attn need seq_length")

    def kv_bytes_per_token(self, dtype) -> int:
        """Bytes of keys and values one token takes in a KV cache (all layers): the one formula
        every cache size (static, paged, `qwen2 info`, needle) comes from."""
        import torch
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * elem

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.is_moe
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def attention(self) -> str:
        """Every layer's attention variant, a key of qwen2.model.decoder.ATTENTION."""
        if self.dual_chunk_attention_config:
            return "dual_chunk"
        if self.use_logn_attn:
            return "logn"
        return "sdpa"

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type", "default"))

    # ---------------------------------------------------------------- HF config.json in and out
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type {mt!r} is not supported (expected one of {', '.join(SUPPORTED_MODEL_TYPES)}; "
                "first-generation Qwen checkpoints convert with `qwen2 convert`)"
            )
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"]
        if mt == "qwen2" or not d.get("num_experts"):
            required.append("intermediate_size")
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise CheckpointError(f"{source}: missing required field(s) {', '.join(missing)}")

        # Two forms: 2024 releases (top-level rope_theta / rope_scaling / torch_dtype) and what
        # transformers 5 writes (rope_parameters holding rope_theta and rope_type, dtype).
        rope_params = dict(d.get("rope_parameters") or {})
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 1_000_000.0))
        rope_scaling = d.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_scaling.setdefault("rope_type", rope_scaling.get("type", "default"))
            if rope_scaling["rope_type"] == "default":
                rope_scaling = None

        kw: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)} - {"raw", "rope_theta", "rope_scaling", "torch_dtype"} \
            - set(_QWEN1_FIELDS)
        for k in names:
            if d.get(k) is not None:
                kw[k] = d[k]
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        kw.setdefault("intermediate_size", d.get("intermediate_size") or 0)
        kw["model_type"] = mt
        try:
            return cls(
                **kw,
                rope_theta=float(rope_theta),
                rope_scaling=rope_scaling,
                torch_dtype=d.get("torch_dtype", d.get("dtype")),
                raw=copy.deepcopy(d),
            )
        except TypeError as e:  # wrong value types in config.json
            raise CheckpointError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_hf_dict(read_config_json(path), source=str(path))

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The config.json to save: the checkpoint's own dict, updated with our values."""
        d = copy.deepcopy(self.raw) if self.raw else {}
        for f in dataclasses.fields(self):
            if f.name in ("raw", "rope_scaling", "torch_dtype", "dual_chunk_attention_config") + _QWEN1_FIELDS:
                continue
            if f.name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                          "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                          "mlp_only_layers", "router_aux_loss_coef") and not self.is_moe:
                continue
            d[f.name] = copy.deepcopy(getattr(self, f.name))
        d["architectures"] = ["Qwen2MoeForCausalLM" if self.is_moe else "Qwen2ForCausalLM"]
        d["hidden_act"] = "silu"
        if "rope_parameters" in d:  # keep the transformers-5 form if that is what we read
            d["rope_parameters"] = {"rope_theta": self.rope_theta, **(self.rope_scaling or {"rope_type": "default"})}
        else:
            d["rope_theta"] = self.rope_theta
            d["rope_scaling"] = copy.deepcopy(self.rope_scaling)
        if self.dual_chunk_attention_config is not None:
            d["dual_chunk_attention_config"] = copy.deepcopy(self.dual_chunk_attention_config)
        dt = dtype or self.torch_dtype
        if dt is not None:
            d["dtype" if "dtype" in d else "torch_dtype"] = dt
        return d


# Set by the first-generation Qwen loader only: a Qwen2 config.json neither carries nor gets them.
_QWEN1_FIELDS = ("seq_length", "use_dynamic_ntk", "use_logn_attn")


def read_config_json(path: str | Path) -> dict:
    """A checkpoint's config.json as a dict, with clear errors for a missing or broken file."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (a Qwen2 checkpoint directory holds config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


def _qwen2(vocab, hidden, layers, heads, kv, inter, tied, **kw) -> dict:
    return dict(
        model_type="qwen2", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
        tie_word_embeddings=tied, max_position_embeddings=32768, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151643,
        use_sliding_window=False, sliding_window=32768, max_window_layers=layers, **kw,
    )


# The released sizes, as their config.json dicts.
PRESETS: dict[str, dict] = {
    "Qwen2-0.5B": _qwen2(151936, 896, 24, 14, 2, 4864, True),
    "Qwen2-1.5B": _qwen2(151936, 1536, 28, 12, 2, 8960, True),
    "Qwen2-7B": _qwen2(152064, 3584, 28, 28, 4, 18944, False),
    "Qwen2-72B": _qwen2(152064, 8192, 80, 64, 8, 29568, False),
    "Qwen2-57B-A14B": dict(
        _qwen2(151936, 3584, 28, 28, 4, 18944, False),
        model_type="qwen2_moe", max_position_embeddings=131072, num_experts=64,
        num_experts_per_tok=8, moe_intermediate_size=2560, shared_expert_intermediate_size=20480,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A released size's config; `overrides` shrink it for tests (e.g. num_hidden_layers=2)."""
    key = {k.lower(): k for k in PRESETS}.get(name.lower().removesuffix("-instruct"))
    if key is None:
        raise CheckpointError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    d = dict(PRESETS[key], **overrides)
    if "num_hidden_layers" in overrides and "max_window_layers" not in overrides:
        d["max_window_layers"] = overrides["num_hidden_layers"]
    return ModelConfig.from_hf_dict(d, source=f"preset {key}")
