"""LoRA adapters in PEFT's format, both ways: `adapter_config.json` + `adapter_model.safetensors` with
keys `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (A [r, in]) and `...lora_B.weight`
(B [out, r]), what `peft.PeftModel.from_pretrained` loads onto transformers' Qwen2 (and what PEFT
saves, which we load). `with_adapter` runs an adapter over a model's weights without touching them
(several adapters served over one base). The model side is qwen2.model.lora: one (A, B) per checkpoint projection,
fused projections included.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qwen2.errors import Qwen2Error
from qwen2.model.lora import TARGETS, add_lora, lora_modules, peft_name, shared_copy

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."


def lora_settings(model) -> dict:
    """r, lora_alpha, lora_dropout and target_modules of the adapters on `model` (one setting for all)."""
    mods = [m for _, m in lora_modules(model)]
    if not mods:
        raise Qwen2Error("the model has no LoRA adapter")
    m = mods[0]
    targets = sorted({p for x in mods for p in x.lora_A.keys()}, key=TARGETS.index)
    drop = m.dropout_p
    return {"r": m.r, "lora_alpha": m.alpha, "lora_dropout": drop, "target_modules": targets}


def adapter_state(model) -> dict[str, torch.Tensor]:
    """PEFT key -> tensor (float32, contiguous copies)."""
    out = {}
    for name, m in lora_modules(model):
        for part in m.lora_A.keys():
            key = _PREFIX + peft_name(name, part)
            out[f"{key}.lora_A.weight"] = _full(m.lora_A[part]).detach().float().contiguous().clone()
            out[f"{key}.lora_B.weight"] = _full(m.lora_B[part]).detach().float().contiguous().clone()
    return out


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter sharded by FSDP2 (a DTensor) gathered whole; a plain tensor as it is."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def save_adapter(model, out_dir, base_model: str | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
           "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
           "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
           "rank_pattern": {}, "alpha_pattern": {}, **lora_settings(model)}
    save_file(adapter_state(model), str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(cfg, indent=2))
    return out


def read_adapter_config(path) -> dict:
    path = Path(path)
    f = path / CONFIG
    if not f.is_file():
        raise Qwen2Error(f"{path}: not a LoRA adapter directory (no {CONFIG})")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise Qwen2Error(f"{f}: not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise Qwen2Error(f"{f}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key, ok in (("use_dora", False), ("bias", "none"), ("modules_to_save", None), ("fan_in_fan_out", False)):
        if cfg.get(key, ok) not in (ok, [] if ok is None else ok):
            raise Qwen2Error(f"{f}: {key}={cfg[key]!r} is not supported (only {ok!r})")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        if cfg.get(key):
            raise Qwen2Error(f"{f}: {key} is not supported (one rank and alpha for every layer)")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        raise Qwen2Error(f"{f}: target_modules as a regex is not supported; list module names")
    bad = sorted(set(targets or []) - set(TARGETS))
    if bad:
        raise Qwen2Error(f"{f}: target module(s) {bad} are not supported (choose from {', '.join(TARGETS)})")
    return cfg


def load_adapter(model, path):
    """In place: add the adapter in `path` (ours or PEFT's) to `model`, enabled. Every tensor in the
    file must land on an adapter and every adapter must be in the file."""
    path = Path(path)
    cfg = read_adapter_config(path)
    wf = path / WEIGHTS
    if not wf.is_file():
        raise Qwen2Error(f"{path}: no {WEIGHTS} (pickled adapter_model.bin files are not loaded)")
    try:
        state = load_file(str(wf))
    except Exception as e:  # safetensors raises its own types for truncated or bad files
        raise Qwen2Error(f"{wf}: cannot read ({e})") from None
    try:
        add_lora(model, r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=0.0,
                 targets=cfg["target_modules"], use_rslora=bool(cfg.get("use_rslora")))
    except ValueError as e:
        raise Qwen2Error(f"{path}: {e}") from None
    # PEFT files may name the adapter inside the key (lora_A.default.weight) when saved by hand
    state = {k.replace(".default.weight", ".weight"): v for k, v in state.items()}
    seen = set()
    for name, m in lora_modules(model):
        for part in m.lora_A.keys():
            key = _PREFIX + peft_name(name, part)
            for ab, params in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
                k = f"{key}.{ab}.weight"
                if k not in state:
                    raise Qwen2Error(f"{wf}: missing tensor {k}")
                t = state[k]
                if t.shape != params[part].shape:
                    raise Qwen2Error(f"{wf}: {k} has shape {list(t.shape)}, the model needs {list(params[part].shape)}")
                with torch.no_grad():
                    params[part].copy_(t)
                seen.add(k)
    extra = sorted(set(state) - seen)
    if extra:
        raise Qwen2Error(f"{wf}: tensor {extra[0]} matches no module of this model"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return model


def with_adapter(model, path):
    """A model running the adapter in `path` over `model`'s own weight tensors (not copied, not
    merged): `qwen2.model.lora.shared_copy` with LoRA on the targeted projections, which may be
    float, quantized, GGUF blocks or already packed for serving. `model` is left as it was. The
    result has no compiled decode step (it decodes eagerly)."""
    was = [(p, p.requires_grad) for p in model.parameters()]
    view = shared_copy(model)
    try:
        load_adapter(view, path)
    finally:
        for p, g in was:  # add_lora froze the shared parameters
            p.requires_grad_(g)
    return view
