"""Training data in the JSONL formats TRL users already have, one record a line:

- {"messages": [{"role", "content"}, ...]}: rendered with the checkpoint's own chat template; the
  loss is on the assistant turns only (each turn's text and its end-of-turn marker);
- {"prompt": ..., "completion": ...}: the loss is on the completion (+ eos); both strings, or both
  message lists (a conversational prompt, the assistant reply as completion);
- {"text": ...}: plain language modelling on the text (+ eos);
- {"prompt", "chosen", "rejected"} (DPO): strings, or a message-list prompt with one-message lists.

A malformed record is an error naming the file and line. Examples longer than max_len are cut at
the end and counted (`truncated`); none is dropped. Packing concatenates examples (eos-separated)
and cuts the stream into rows of max_len: as TRL's "wrapped" packing, a token may attend to the
examples before it in its row (the model takes no block-diagonal mask).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen2.errors import Qwen2Error
from qwen2.model.decoder import IGNORE_INDEX


@dataclass
class SFTData:
    examples: list[tuple[list[int], list[int]]]  # (ids, labels); IGNORE_INDEX = not scored
    truncated: int = 0
    records: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(i) for i, _ in self.examples)


@dataclass
class DPOData:
    pairs: list[tuple[list[int], list[int], list[int]]]  # (prompt, chosen, rejected) ids
    truncated: int = 0
    records: int = 0


@dataclass
class _Where:
    path: str
    line: int

    def error(self, msg: str) -> Qwen2Error:
        return Qwen2Error(f"{self.path}:{self.line}: {msg}")


def read_jsonl(path) -> list[tuple[_Where, dict]]:
    p = Path(path)
    if not p.is_file():
        raise Qwen2Error(f"{path}: no such data file")
    out = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = _Where(str(path), n)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise where.error(f"not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise where.error(f"a record is a JSON object, not {type(rec).__name__}")
            out.append((where, rec))
    if not out:
        raise Qwen2Error(f"{path}: no records")
    return out


def _messages(where: _Where, msgs, key: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise where.error(f'"{key}" must be a non-empty list of {{"role", "content"}} objects')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise where.error(f'"{key}"[{i}] must be an object with string "role" and "content"')
    return msgs


def _string(where: _Where, rec: dict, key: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        raise where.error(f'"{key}" must be a string, not {type(v).__name__}')
    return v


def chat_example(tok, messages: list[dict], scored_from: int, where: _Where) -> tuple[list[int], list[int]]:
    """Ids of the conversation and labels on the assistant turns at index >= scored_from. Each
    turn's span is found by rendering the conversation up to it (with the generation prompt) and
    through it: the template must render a conversation's prefix as a prefix of its ids."""
    ids = tok.encode_chat(messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < scored_from:
            continue
        start = len(tok.encode_chat(messages[:i], add_generation_prompt=True)) if i else 0
        upto = tok.encode_chat(messages[:i + 1], add_generation_prompt=False)
        if upto != ids[:len(upto)] or start > len(upto):
            raise where.error("the chat template does not render this conversation's turns as prefixes of it; "
                              "use the prompt/completion format")
        labels[start:len(upto)] = ids[start:len(upto)]
    if all(x == IGNORE_INDEX for x in labels):
        raise where.error("no assistant turn to learn from")
    return ids, labels


def sft_example(tok, rec: dict, where: _Where) -> tuple[list[int], list[int]]:
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if "messages" in rec:
        return chat_example(tok, _messages(where, rec["messages"], "messages"), 0, where)
    if "prompt" in rec and "completion" in rec:
        p, c = rec["prompt"], rec["completion"]
        if isinstance(p, list) or isinstance(c, list):
            p, c = _messages(where, p, "prompt"), _messages(where, c, "completion")
            return chat_example(tok, p + c, len(p), where)
        prompt = tok.encode(_string(where, rec, "prompt"))
        completion = tok.encode(_string(where, rec, "completion")) + eos
        return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    if "text" in rec:
        ids = tok.encode(_string(where, rec, "text")) + eos
        return ids, list(ids)
    raise where.error(f'unknown record format (keys {sorted(rec)}); expected "messages", '
                      '"prompt" + "completion" or "text"')


def load_sft(path, tok, max_len: int, packing: bool = False) -> SFTData:
    data = SFTData([], records=0)
    for where, rec in read_jsonl(path):
        ids, labels = sft_example(tok, rec, where)
        data.records += 1
        if len(ids) > max_len and not packing:
            data.truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        data.examples.append((ids, labels))
    if packing:
        data.examples = pack(data.examples, max_len)
    return data


def pack(examples, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate every example and cut the stream into rows of max_len (the last may be shorter)."""
    ids = [t for i, _ in examples for t in i]
    labels = [t for _, lab in examples for t in lab]
    return [(ids[i:i + max_len], labels[i:i + max_len]) for i in range(0, len(ids), max_len)]


def dpo_pair(tok, rec: dict, where: _Where):
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for k in ("prompt", "chosen", "rejected"):
        if k not in rec:
            raise where.error(f'a DPO record needs "prompt", "chosen" and "rejected" (missing "{k}")')
    if isinstance(rec["prompt"], list):
        prompt = _messages(where, rec["prompt"], "prompt")
        p_ids = tok.encode_chat(prompt, add_generation_prompt=True)
        out = []
        for k in ("chosen", "rejected"):
            full = tok.encode_chat(prompt + _messages(where, rec[k], k), add_generation_prompt=False)
            if full[:len(p_ids)] != p_ids:
                raise where.error("the chat template does not render the prompt as a prefix of the conversation")
            out.append(full[len(p_ids):])
        return p_ids, out[0], out[1]
    return (tok.encode(_string(where, rec, "prompt")), tok.encode(_string(where, rec, "chosen")) + eos,
            tok.encode(_string(where, rec, "rejected")) + eos)


def load_dpo(path, tok, max_len: int) -> DPOData:
    """A pair longer than max_len keeps the end of its prompt and the start of each response."""
    data = DPOData([])
    for where, rec in read_jsonl(path):
        p, c, r = dpo_pair(tok, rec, where)
        data.records += 1
        longest = len(p) + max(len(c), len(r))
        if longest > max_len:
            data.truncated += 1
            keep = max(max_len // 2, max_len - max(len(c), len(r)))
            p = p[-keep:] if len(p) > keep else p
            c, r = c[:max_len - len(p)], r[:max_len - len(p)]
        data.pairs.append((p, c, r))
    return data


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded ids, attention mask and labels [B, T] (padding never scored)."""
    t = max(len(i) for i, _ in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for b, (i, lab) in enumerate(rows):
        ids[b, :len(i)] = torch.tensor(i)
        labels[b, :len(lab)] = torch.tensor(lab)
        mask[b, :len(i)] = 1
    return ids, mask, labels


def dpo_rows(pairs) -> list[tuple[list[int], list[int]]]:
    """Chosen rows then rejected rows, as (ids, labels) scoring the response only."""
    rows = []
    for k in (1, 2):
        for pr in pairs:
            p, resp = pr[0], pr[k]
            rows.append((p + resp, [IGNORE_INDEX] * len(p) + resp))
    return rows


@dataclass
class Order:
    """Shuffled example order per epoch, reproducible from (seed, epoch): a resumed run continues
    the same sequence of batches."""
    n: int
    batch_size: int
    seed: int
    _cache: dict = field(default_factory=dict)

    def batches_per_epoch(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def batch(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.batches_per_epoch())
        if epoch not in self._cache:
            idx = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
            self._cache = {epoch: idx}
        return self._cache[epoch][i * self.batch_size:(i + 1) * self.batch_size]
