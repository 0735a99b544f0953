"""Sampling parameters and the per-step logits pipeline, shared by every engine.

Stateless on purpose: each decode step passes the rows it is running (params, prompt and output
ids), so a continuous-batching engine can call it with a batch that changes every step.

    logits = process_logits(logits, params, output_ids, prompt_ids)   # penalties, temperature, top-k/p, min-p
    tokens, lp = sample(logits, params, generators)                   # greedy rows: argmax

Order and semantics follow `transformers` (repetition penalty, then temperature, top-k, top-p,
min-p); presence/frequency penalties follow OpenAI (on generated tokens only, subtracted).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from qwen2.errors import Qwen2Error


GREEDY_BELOW = 1e-5  # temperatures below this sample greedily


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    min_p: float = 0.0                # 0 = off
    repetition_penalty: float = 1.0   # transformers: over prompt + output, divide positive / multiply negative
    presence_penalty: float = 0.0     # OpenAI: over output, logit -= presence * (count > 0)
    frequency_penalty: float = 0.0    # OpenAI: over output, logit -= frequency * count
    stop: list[str] = field(default_factory=list)          # stop strings (not part of the text)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop ids, beside the model's eos ids
    seed: int | None = None
    logprobs: bool = False            # log-probability of each generated token
    top_logprobs: int = 0             # plus the N most likely alternatives per position
    ignore_eos: bool = False          # keep going past eos ids (stop_token_ids still stop)
    # Log-probabilities of the prompt's own tokens (scoring, lm-eval's loglikelihood): None = off,
    # N >= 0 = each prompt token's logprob plus the N most likely tokens at its position, from the
    # model's raw distribution. With it max_new_tokens may be 0: the prompt is scored, nothing drawn.
    prompt_logprobs: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        self.validate()

    def validate(self):
        def bad(name, why):
            raise Qwen2Error(f"{name}={getattr(self, name)!r}: {why}")

        def number(name, integer=False):
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or (not integer and not math.isfinite(v)):
                bad(name, "must be an integer" if integer else "must be a finite number")
            return v

        if self.prompt_logprobs is not None and number("prompt_logprobs", True) < 0:
            bad("prompt_logprobs", "must be >= 0 (None = off)")
        if number("max_new_tokens", True) < (0 if self.prompt_logprobs is not None else 1):
            bad("max_new_tokens", "must be at least 1 (0 only with prompt_logprobs)")
        if number("temperature") < 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if number("top_k", True) < 0:
            bad("top_k", "must be >= 0 (0 = off)")
        if not 0 < number("top_p") <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= number("min_p") <= 1:
            bad("min_p", "must be in [0, 1]")
        if number("repetition_penalty") <= 0:
            bad("repetition_penalty", "must be > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                bad(name, "must be in [-2, 2]")
        if number("top_logprobs", True) < 0:
            bad("top_logprobs", "must be >= 0")
        if self.seed is not None:
            number("seed", True)
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        # A temperature this small is greedy in all but name, and dividing by it overflows the
        # logits to inf (NaN probabilities), as vLLM also treats it.
        return self.temperature < GREEDY_BELOW

    def replace(self, **overrides) -> "SamplingParams":
        """A copy with some fields changed (None values are ignored); unknown names are an error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise Qwen2Error(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_generation_config(cls, path_or_dict=None, **overrides) -> "SamplingParams":
        """Defaults from a checkpoint's generation_config.json (a dir, the file, or its dict),
        read as transformers does: do_sample false -> greedy; sampling without top_k -> top_k 50."""
        gc = read_generation_config(path_or_dict)
        kw: dict = {}
        if gc.get("do_sample"):
            kw["temperature"] = float(gc["temperature"]) if gc.get("temperature") is not None else 1.0
            kw["top_k"] = int(gc["top_k"]) if gc.get("top_k") is not None else 50
            if gc.get("top_p") is not None:
                kw["top_p"] = float(gc["top_p"])
            if gc.get("min_p") is not None:
                kw["min_p"] = float(gc["min_p"])
        else:
            kw["temperature"] = 0.0
        if gc.get("repetition_penalty") is not None:
            kw["repetition_penalty"] = float(gc["repetition_penalty"])
        if gc.get("max_new_tokens"):
            kw["max_new_tokens"] = int(gc["max_new_tokens"])
        return cls(**kw).replace(**overrides)


def read_generation_config(path_or_dict=None) -> dict:
    """generation_config.json as a dict ({} when absent). Accepts a checkpoint dir or the file."""
    if path_or_dict is None:
        return {}
    if isinstance(path_or_dict, dict):
        return path_or_dict
    p = Path(path_or_dict)
    if p.is_dir():
        p = p / "generation_config.json"
    if not p.exists():
        return {}
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Qwen2Error(f"{p}: bad generation config ({e})") from None
    if not isinstance(d, dict):
        raise Qwen2Error(f"{p}: bad generation config (not a JSON object)")
    return d


# --------------------------------------------------------------------------- per-step pipeline
def _id_matrix(rows: list[list[int]], fill: int, device) -> torch.Tensor:
    """Ragged id lists -> [B, L] LongTensor padded with `fill`."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out.to(device)


def process_logits(logits: torch.Tensor, params: list[SamplingParams], output_ids: list[list[int]],
                   prompt_ids: list[list[int]] | None = None) -> torch.Tensor:
    """logits [B, V] float32 -> processed logits [B, V] (removed tokens = -inf). Greedy rows get
    the penalties only: temperature and truncation cannot change their argmax."""
    b, v = logits.shape
    dev = logits.device
    logits = logits.float()  # every step below is out of place: the caller's tensor is untouched
    prompt_ids = prompt_ids or [[] for _ in range(b)]

    rep = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in rep):
        # transformers RepetitionPenaltyLogitsProcessor: every token seen in prompt or output.
        ids = _id_matrix([list(pi) + list(oi) for pi, oi in zip(prompt_ids, output_ids)], v, dev)
        seen = torch.zeros(b, v + 1, dtype=torch.bool, device=dev).scatter_(1, ids, True)[:, :v]
        r = torch.tensor(rep, dtype=logits.dtype, device=dev)[:, None]
        logits = torch.where(seen, torch.where(logits < 0, logits * r, logits / r), logits)

    pres = [p.presence_penalty for p in params]
    freq = [p.frequency_penalty for p in params]
    if any(pres) or any(freq):
        ids = _id_matrix(output_ids, v, dev)
        counts = torch.zeros(b, v + 1, dtype=logits.dtype, device=dev)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
        counts = counts[:, :v]
        logits = (logits - torch.tensor(freq, dtype=logits.dtype, device=dev)[:, None] * counts
                  - torch.tensor(pres, dtype=logits.dtype, device=dev)[:, None] * (counts > 0))

    temps = [1.0 if p.greedy else p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        logits = logits / torch.tensor(temps, dtype=logits.dtype, device=dev)[:, None]

    sampled = [not p.greedy for p in params]
    if any(s and (p.top_k > 0 or p.top_p < 1) for s, p in zip(sampled, params)):
        logits = _top_k_top_p(logits, params, sampled)
    if any(s and p.min_p > 0 for s, p in zip(sampled, params)):
        # transformers' MinP keeps p >= min_p * p_max after top-k/top-p; the ratio does not depend
        # on the normalization, so it is a threshold on the logits: z >= z_max + log(min_p).
        lmp = torch.tensor([math.log(p.min_p) if s and p.min_p > 0 else float("-inf")
                            for s, p in zip(sampled, params)], dtype=logits.dtype, device=dev)[:, None]
        logits = logits.masked_fill(logits < logits.max(dim=-1, keepdim=True).values + lmp, float("-inf"))
    return logits


NUCLEUS_WINDOW = 1024  # top-p looks at this many best tokens first; a full sort only if they fall short


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams], sampled: list[bool]) -> torch.Tensor:
    """transformers' TopK then TopP, on the best candidates only: one small topk per step instead
    of a vocabulary-wide sort (top-p without top-k widens to a full sort only when the window's
    mass falls short of top_p)."""
    b, v = logits.shape
    dev = logits.device
    # a top_k at or past the vocabulary keeps everything (it is off)
    ks = [min(p.top_k, v) if s and p.top_k > 0 else v for s, p in zip(sampled, params)]
    top_p = [p.top_p if s else 1.0 for s, p in zip(sampled, params)]
    if all(k == v for k in ks) and all(tp >= 1 for tp in top_p):
        return logits
    nucleus_only = [k == v and tp < 1 for k, tp in zip(ks, top_p)]
    window = max([k for k in ks if k < v] + ([NUCLEUS_WINDOW] if any(nucleus_only) else []))
    window = min(window, v)
    vals, idx = logits.topk(window, dim=-1)  # sorted, descending
    full_lse = None
    if window < v and any(nucleus_only):
        # The window's share of the full distribution must reach top_p, or the nucleus may reach past it.
        full_lse = torch.logsumexp(logits, -1, keepdim=True)
        mass = (torch.logsumexp(vals, -1, keepdim=True) - full_lse).exp()[:, 0].tolist()
        if any(n and m < tp for n, m, tp in zip(nucleus_only, mass, top_p)):
            window = v
            vals, idx = logits.sort(dim=-1, descending=True)
    rank = torch.arange(window, device=dev)[None]
    keep = rank < torch.tensor(ks, device=dev)[:, None]
    vals = vals.masked_fill(~keep, float("-inf"))
    tp = torch.tensor(top_p, dtype=logits.dtype, device=dev)[:, None]
    if (tp < 1).any():
        # Probabilities over the top-k candidates, or over the whole vocabulary for rows without top-k.
        lse = torch.logsumexp(vals, -1, keepdim=True)
        if full_lse is not None and window < v:
            lse = torch.where(torch.tensor(nucleus_only, device=dev)[:, None], full_lse, lse)
        probs = (vals - lse).exp()
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
        vals = vals.masked_fill((before >= tp) & (rank > 0), float("-inf"))
    out = torch.full_like(logits, float("-inf")).scatter_(1, idx, vals)
    # Rows that truncate nothing (greedy, or no top-k/top-p) keep their logits.
    rows = torch.tensor([k < v or p < 1 for k, p in zip(ks, top_p)], device=dev)[:, None]
    return torch.where(rows, out, logits)


class Logprobs(NamedTuple):
    """Per row: log-probability of the chosen token, and the top-N alternatives (N = the largest
    top_logprobs in the batch; rows wanting fewer slice them)."""
    token: torch.Tensor        # [B] float32
    top_ids: torch.Tensor      # [B, N] long
    top_values: torch.Tensor   # [B, N] float32


def prompt_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw logits [T, V] of T prompt positions and the token that followed each [T] ->
    (its logprob [T], the k best ids [T, k], their logprobs [T, k]). Log-softmax through one
    logsumexp, never a second [T, V] tensor (a prompt chunk's logits are already large); the
    token's and the best tokens' values come out of the same subtraction, so a token that is the
    most likely one has exactly the top value (lm-eval's is_greedy compares them with ==)."""
    lse = torch.logsumexp(logits, -1, keepdim=True)
    token = (logits.gather(1, targets[:, None]) - lse)[:, 0]
    if not k:
        return token, targets[:, None][:, :0], logits[:, :0]
    values, ids = logits.topk(k, dim=-1)
    return token, ids, values - lse


def make_generator(seed: int | None, device="cpu") -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None] | None = None) -> tuple[torch.Tensor, Logprobs | None]:
    """Pick one token per row from processed logits [B, V]. Greedy rows take the argmax; the
    others draw from softmax(logits) with their own generator (None = torch's global RNG), so a
    seeded request gives the same tokens whatever else shares its batch.
    Logprobs are those of the distribution the token was picked from (after penalties,
    temperature and truncation)."""
    b = logits.shape[0]
    generators = generators or [None] * b
    tokens = logits.argmax(dim=-1)
    if not all(p.greedy for p in params):
        probs = torch.softmax(logits, dim=-1)
        picked = []
        for i, p in enumerate(params):
            if p.greedy:
                picked.append(tokens[i:i + 1])
            else:
                # Truncated rows draw among their few candidates (a full-vocabulary draw is slow).
                cand = torch.isfinite(logits[i]).nonzero()[:, 0]
                if len(cand) < logits.shape[1]:
                    j = torch.multinomial(probs[i, cand], 1, generator=generators[i])
                    picked.append(cand[j])
                else:
                    picked.append(torch.multinomial(probs[i], 1, generator=generators[i]))
        tokens = torch.cat(picked)
    lp = None
    if any(p.logprobs or p.top_logprobs for p in params):
        logp = torch.log_softmax(logits, dim=-1)
        n = max(p.top_logprobs for p in params)
        top_values, top_ids = logp.topk(n, dim=-1) if n else (logp[:, :0], tokens[:, None][:, :0])
        lp = Logprobs(logp.gather(1, tokens[:, None])[:, 0], top_ids, top_values)
    return tokens, lp
