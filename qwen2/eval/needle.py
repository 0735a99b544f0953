"""Needle in a haystack: put a fact (the needle) at a given depth of a long filler text, ask for
it, and score exact recall; one case per (prompt length, depth), shown as a table and a heat map.

Prompt lengths are exact token counts of the whole prompt (chat template included). The needle
goes in at a sentence boundary of the filler, the last one at or before `depth` of the filler's
tokens. Long prompts are prefilled in chunks by the engine, so memory stays at the KV cache plus
one chunk's attention (never a T x T matrix).
"""
from __future__ import annotations

import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from qwen2.errors import Qwen2Error
from qwen2.engine.generate import generate
from qwen2.engine.sampling import SamplingParams

NEEDLE = "The special magic number is {answer}."
QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."

# Plain, repetitive prose: the haystack should be easy to read past, and it is cycled as needed.
FILLER = [
    "The river town woke slowly each morning, with fishermen checking their nets before sunrise.",
    "Bakers on the main street lit their ovens early, and the smell of bread drifted toward the harbour.",
    "Children walked to school along the old stone wall, counting the boats that had come in overnight.",
    "In spring the orchards on the hillside turned white with blossom, and bees worked from dawn to dusk.",
    "The library kept maps of the valley drawn by hand, some of them older than the bridge itself.",
    "Merchants argued cheerfully about the price of wool, though everyone knew the price changed little.",
    "At noon the church bell rang twelve times, and the market stalls closed for an hour of rest.",
    "Travellers often stopped at the inn by the crossroads, where the soup was thick and the fire was warm.",
    "Autumn brought storms from the sea, and the harbour master watched the sky with careful eyes.",
    "In winter the lanes grew quiet, and lamps glowed behind frosted windows long into the evening.",
    "The mill by the waterfall ground grain for three villages, its wheel turning in every season.",
    "Old stories said the valley had once been a lake, and farmers still found smooth shells in the soil.",
]


@dataclass
class NeedlePrompt:
    ids: list[int]
    needle_start: int  # index in ids of the needle's first token
    needle_len: int
    haystack_len: int  # filler tokens in the prompt
    depth: float  # actual depth: filler tokens before the needle / haystack_len


@dataclass
class NeedleCase:
    length: int
    depth: float  # requested, 0..1
    actual_depth: float
    answer: str
    response: str
    score: float
    seconds: float


def parse_lengths(spec: str) -> list[int]:
    """"4k,8k,32k" or "4096,8192" -> token counts (k = 1024)."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", part)
        if not m:
            raise Qwen2Error(f"--lengths: {part!r} is not a length (e.g. 4k, 8192)")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    return out


def parse_depths(spec: str) -> list[float]:
    """"0,25,50,75,100" (percent of the filler before the needle) -> fractions."""
    out = []
    for part in spec.split(","):
        try:
            d = float(part.rstrip("% "))
        except ValueError:
            raise Qwen2Error(f"--depths: {part!r} is not a percentage") from None
        if not 0 <= d <= 100:
            raise Qwen2Error(f"--depths: {d} is outside 0..100")
        out.append(d / 100)
    return out


def score(response: str, answer: str) -> float:
    """Exact recall: 1 when the needle's answer appears verbatim in the response."""
    return 1.0 if answer in response else 0.0


def _chat_parts(tokenizer, question: str, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack (the chat template around the user's message)."""
    if not chat:
        return [], tokenizer.encode("\n\n" + question + "\nAnswer:")
    marker = "\x00HAYSTACK\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker + "\n\n" + question}],
                                         add_generation_prompt=True)
    head, tail = text.split(marker)
    return tokenizer.encode(head, allow_special=True), tokenizer.encode(tail, allow_special=True)


def build_prompt(tokenizer, length: int, depth: float, answer: str, chat: bool = True,
                 filler: list[str] = FILLER, question: str = QUESTION) -> NeedlePrompt:
    """A prompt of exactly `length` tokens with the needle at `depth` (0..1) of the filler."""
    head, tail = _chat_parts(tokenizer, question, chat)
    needle = tokenizer.encode(" " + NEEDLE.format(answer=answer))
    budget = length - len(head) - len(tail) - len(needle)
    if budget < 0:
        raise Qwen2Error(f"length {length} is too short for the question and the needle "
                         f"({length - budget} tokens)")
    sentences = [tokenizer.encode(" " + s) for s in filler]
    hay: list[int] = []
    bounds = [0]  # token offsets where a sentence starts
    k = 0
    while len(hay) < budget:
        hay += sentences[k % len(sentences)]
        bounds.append(len(hay))
        k += 1
    hay = hay[:budget]
    at = max(b for b in bounds if b <= round(depth * budget))
    ids = head + hay[:at] + needle + hay[at:] + tail
    return NeedlePrompt(ids, len(head) + at, len(needle), budget, at / budget if budget else 0.0)


def greedy(model, ids: list[int], max_new_tokens: int, stop_ids, chunk_size: int = 4096) -> list[int]:
    """Greedy continuation of one prompt on the engine, prefilled chunk_size tokens a step."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop_token_ids=sorted(stop_ids))
    out = generate(model, [ids], params, chunk_size=chunk_size)[0].token_ids
    return [t for t in out if t not in stop_ids]


def auto_chunk(length: int) -> int:
    """Prefill chunk for a prompt: the attention mask of one chunk is chunk x length (bool, then
    float inside SDPA), so keep it near 2**27 entries: 4096 tokens at 32K, 1024 at 128K."""
    return max(256, min(4096, 2 ** 27 // max(length, 1)))


def run(model, tokenizer, lengths: list[int], depths: list[float], max_new_tokens: int = 16,
        chunk_size: int | None = None, chat: bool = True, seed: int = 0, log=None) -> list[NeedleCase]:
    """Every (length, depth) case, each with its own random 7-digit answer. chunk_size None: auto_chunk."""
    rng = random.Random(seed)
    stop = set(getattr(tokenizer, "stop_token_ids", None) or []) | {
        i for i in (getattr(tokenizer, "eos_token_id", None),) if i is not None}
    cases = []
    for length in lengths:
        for depth in depths:
            answer = str(rng.randrange(1_000_000, 10_000_000))
            p = build_prompt(tokenizer, length, depth, answer, chat=chat)
            t0 = time.perf_counter()
            ids = greedy(model, p.ids, max_new_tokens, stop, chunk_size or auto_chunk(length))
            response = tokenizer.decode(ids,
                                        skip_special_tokens=True)
            case = NeedleCase(length, depth, p.depth, answer, response, score(response, answer),
                              time.perf_counter() - t0)
            cases.append(case)
            if log:
                log(f"length {length:>6}  depth {depth:>4.0%}  score {case.score:.0f}  "
                    f"({case.seconds:.1f}s)  answer {answer}  reply {response.strip()[:40]!r}")
    return cases


def table(cases: list[NeedleCase]) -> str:
    """Mean score per (length, depth) as a text table: lengths down, depths across."""
    lengths = sorted({c.length for c in cases})
    depths = sorted({c.depth for c in cases})
    grid = _grid(cases)
    lines = ["length \\ depth " + "".join(f"{d:>7.0%}" for d in depths) + "     mean"]
    for n in lengths:
        row = [grid[n, d] for d in depths]
        lines.append(f"{n:>14} " + "".join(f"{v:>7.2f}" for v in row) + f"  {sum(row) / len(row):>7.2f}")
    return "\n".join(lines)


def _grid(cases):
    sums: dict[tuple[int, float], list[float]] = {}
    for c in cases:
        sums.setdefault((c.length, c.depth), []).append(c.score)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _color(v: float) -> tuple[int, int, int]:
    """0 -> red, 0.5 -> yellow, 1 -> green."""
    red, yellow, green = (215, 48, 39), (254, 224, 139), (26, 152, 80)
    a, b, t = (red, yellow, v * 2) if v <= 0.5 else (yellow, green, v * 2 - 1)
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def heatmap(cases: list[NeedleCase], path, title: str = "Needle in a haystack") -> Path:
    """PNG heat map: prompt length (rows) x needle depth (columns), colour = mean score."""
    from PIL import Image, ImageDraw, ImageFont
    lengths = sorted({c.length for c in cases})
    depths = sorted({c.depth for c in cases})
    grid = _grid(cases)
    cw, ch, left, top = 56, 32, 90, 56
    img = Image.new("RGB", (left + cw * len(depths) + 20, top + ch * len(lengths) + 40), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((10, 8), title, fill="black", font=font)
    draw.text((left, 28), "needle depth", fill="black", font=font)
    for j, d in enumerate(depths):
        draw.text((left + j * cw + 14, top - 14), f"{d:.0%}", fill="black", font=font)
    for i, n in enumerate(lengths):
        label = f"{n // 1024}K" if n % 1024 == 0 else str(n)
        draw.text((10, top + i * ch + 10), label, fill="black", font=font)
        for j, d in enumerate(depths):
            v = grid[n, d]
            box = (left + j * cw, top + i * ch, left + (j + 1) * cw - 2, top + (i + 1) * ch - 2)
            draw.rectangle(box, fill=_color(v))
            draw.text((box[0] + 16, box[1] + 10), f"{v:.2f}", fill="black", font=font)
    draw.text((10, top + ch * len(lengths) + 12), "prompt tokens (rows); colour: exact recall 0 (red) .. 1 (green)",
              fill="black", font=font)
    path = Path(path)
    img.save(path)
    return path


def to_json(cases: list[NeedleCase]) -> list[dict]:
    return [asdict(c) for c in cases]


def log_stderr(msg: str):
    print(msg, file=sys.stderr, flush=True)
