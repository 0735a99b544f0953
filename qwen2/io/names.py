"""Checkpoint tensor names <-> model parameter names, one declarative table per checkpoint format.

A rule maps a checkpoint *module* path onto a model module path, or onto one part of a fused
projection (the part's index in its module's `splits`, see qwen2.model.decoder); the leaf (weight,
bias, or GPTQ's qweight, scales, ...) carries over unchanged. In patterns `{i}` is a layer index,
`{e}` an expert index and a leading `*` any dotted prefix. A model pattern with a placeholder that
its checkpoint pattern lacks reads a tensor stacked along dim 0 over it (GGUF's MoE experts).
Loading (qwen2.io.build) reads tables forwards; saving (qwen2.io.save, qwen2.io.gptq) backwards.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

_TOKEN = re.compile(r"\{(\w+)\}|^\*")


@dataclass(frozen=True)
class _Pattern:
    text: str

    @property
    def regex(self) -> re.Pattern:
        out, pos = [], 0
        for m in _TOKEN.finditer(self.text):
            out.append(re.escape(self.text[pos:m.start()]))
            out.append(rf"(?P<{m[1]}>\d+)" if m[1] else r"(?P<star>.+)")
            pos = m.end()
        out.append(re.escape(self.text[pos:]))
        return re.compile("".join(out))

    @property
    def fields(self) -> set[str]:
        return {m[1] or "star" for m in _TOKEN.finditer(self.text)}

    def format(self, values: dict[str, str]) -> str:
        return _TOKEN.sub(lambda m: values[m[1] or "star"], self.text)


class NameTable:
    """rules: {checkpoint module pattern: model module pattern, or (model module pattern, part)}.
    identity: module paths no rule matches are the same in the checkpoint and the model (Hugging
    Face's layout, which the model mirrors outside its fused projections). ignore: a regex of
    checkpoint tensor names that are derived state, not weights."""

    def __init__(self, rules: dict[str, str | tuple[str, int]], identity: bool = False, ignore: str | None = None):
        self.rules = []
        for ckpt, target in rules.items():
            model, part = (target, None) if isinstance(target, str) else target
            c, m = _Pattern(ckpt), _Pattern(model)
            stacked = m.fields - c.fields
            if len(stacked) > 1 or not c.fields <= m.fields:
                raise ValueError(f"name rule {ckpt!r} -> {model!r}: placeholders do not correspond")
            self.rules.append((c, c.regex, m, m.regex, part, next(iter(stacked), None)))
        self.identity = identity
        self._ignore = re.compile(ignore) if ignore else None

    def ignored(self, name: str) -> bool:
        return bool(self._ignore and self._ignore.search(name))

    def to_model(self, name: str, t: torch.Tensor) -> Iterator[tuple[str, int | None, torch.Tensor]] | None:
        """(model parameter name, part or None, tensor) for a checkpoint tensor: one triple, or one
        per slice of a stacked tensor; None if no rule maps it."""
        module, _, leaf = name.rpartition(".")
        for c, c_re, m, _, part, stacked in self.rules:
            g = c_re.fullmatch(module)
            if g is None:
                continue
            if stacked is None:
                return iter([(f"{m.format(g.groupdict())}.{leaf}", part, t)])
            return ((f"{m.format({**g.groupdict(), stacked: str(k)})}.{leaf}", part, t[k]) for k in range(t.shape[0]))
        return iter([(name, None, t)]) if self.identity and module else None

    def to_checkpoint(self, module: str, part: int | None = None) -> str | None:
        """The checkpoint module path of a model module (or of one part of a fused one); None if
        the format has no name for it."""
        for c, _, _, m_re, p, _ in self.rules:
            if p != part:
                continue
            g = m_re.fullmatch(module)
            if g is not None:
                return c.format(g.groupdict())
        if part is None and self.identity and not any(m_re.fullmatch(module) for _, _, _, m_re, _, _ in self.rules):
            return module
        return None

    def has_whole(self, module: str) -> bool:
        """Whether a checkpoint tensor maps onto the whole of this (fused) model module."""
        return any(p is None and m_re.fullmatch(module) for _, _, _, m_re, p, _ in self.rules)


# Hugging Face safetensors (Qwen2ForCausalLM / Qwen2MoeForCausalLM): the model's own names, except
# the fused projections, whose parts are the checkpoint's separate ones.
HF_NAMES = NameTable({
    "*.self_attn.q_proj": ("*.self_attn.qkv_proj", 0),
    "*.self_attn.k_proj": ("*.self_attn.qkv_proj", 1),
    "*.self_attn.v_proj": ("*.self_attn.qkv_proj", 2),
    "*.gate_proj": ("*.gate_up_proj", 0),  # MLPs, MoE experts and the shared expert
    "*.up_proj": ("*.gate_up_proj", 1),
}, identity=True, ignore=r"(^|\.)rotary_emb\.inv_freq$")
