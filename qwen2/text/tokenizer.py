"""Byte-level BPE tokenizer for the Qwen family, in every form it ships.

    tok = load_tokenizer("Qwen/Qwen2-0.5B-Instruct")   # dir, hub id, qwen.tiktoken or .gguf
    ids = tok.encode("Hello world")                     # [9707, 1879]
    text = tok.decode(ids)
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])

One vocabulary (151,643 byte tokens) is shipped three ways: `qwen.tiktoken` (first generation),
`vocab.json` + `merges.txt`, and `tokenizer.json` (Qwen1.5/Qwen2, with NFC normalization).
Encoding is: split out added tokens -> NFC (HF forms only) -> Qwen regex -> BPE. The BPE core
is tiktoken's for the family's own vocabulary (its rank order equals the merge order, so rank
BPE and merge BPE agree; tested against transformers) and HF `tokenizers` for any other merges.
"""
from __future__ import annotations

import base64
import codecs
import hashlib
import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

from qwen2.errors import Qwen2Error

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# First-generation Qwen: 3 named specials then <|extra_0|>..<|extra_204|>, from id 151643.
QWEN1_SPECIALS = [ENDOFTEXT, IM_START, IM_END] + [f"<|extra_{i}|>" for i in range(205)]
QWEN_N_REGULAR = 151643
# sha256 of the family's merges ("a b" lines joined by "\n"). For these merges tiktoken's rank
# BPE is proven equal to merge-order BPE (tests/test_tokenizer.py re-derives them from
# qwen.tiktoken), so the faster core may serve them; any other merges get HF tokenizers.
TIKTOKEN_SAFE_MERGES = {"bbeef245f0b03a9613753068e5799c2496290005594c68f09eed68feedbe6d1f"}

_SURROGATE = re.compile("[\ud800-\udfff]")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by vocab.json and GGUF."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _unicode_to_latin1() -> dict[int, int]:
    return {ord(c): b for b, c in bytes_to_unicode().items()}


def token_bytes(s: str) -> bytes | None:
    """Bytes of a vocab.json-form token string, or None if it is not in the byte alphabet."""
    try:
        return s.translate(_unicode_to_latin1()).encode("latin-1")
    except UnicodeEncodeError:
        return None


def token_str(b: bytes) -> str:
    m = bytes_to_unicode()
    return "".join(m[x] for x in b)


def write_hf_tokenizer(out, vocab: dict[str, int], merges: list[str], added: list[dict],
                       config: dict, extra_files: dict[str, str] | None = None) -> list[Path]:
    """Write a Qwen byte-level BPE as Hugging Face tokenizer files: tokenizer.json, vocab.json,
    merges.txt and tokenizer_config.json (`config`: its token names, chat template, ...; the
    added tokens' decoder is derived from `added`, dicts with id, content and their flags).
    extra_files: more name -> text to write beside them. Returns the paths written."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    config = {"add_prefix_space": False,
              "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
              "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer", "unk_token": None, **config}
    files = {
        "tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False, indent=2),
        "tokenizer_config.json": json.dumps(dict(sorted(config.items())), ensure_ascii=False, indent=2),
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        **(extra_files or {}),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return [out / name for name in files]


def merges_fingerprint(merges: list[tuple[str, str]]) -> str:
    return hashlib.sha256("\n".join(f"{a} {b}" for a, b in merges).encode()).hexdigest()


def load_tiktoken_ranks(path) -> dict[bytes, int]:
    ranks = {}
    try:
        for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
            if line:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
    except (ValueError, TypeError) as e:
        raise Qwen2Error(f"{path}: line {n} is not 'base64 rank' ({e})") from None
    return ranks


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list equivalent to rank BPE: for each token (in rank order), the pair that
    rank BPE over its own bytes joins last (the same derivation transformers uses)."""
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = [tok[i:i + 1] for i in range(len(tok))]
        while len(parts) > 2:
            best, best_i = None, None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, best_i = r, i
            if best is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) != 2:
            raise Qwen2Error(f"token {tok!r} (rank {rank}) cannot be built by merging lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


# ---------------------------------------------------------------------------------------------
# BPE cores: str (already split from added tokens and normalized) -> ids. Neither matches specials.

class _TiktokenCore:
    # tiktoken's Rust encoder alone: tiktoken.Encoding also keeps the 151k-entry ranks dict in Python
    # (~9 MiB), only for pickling; __reduce__ rebuilds it from the encoder instead.
    def __init__(self, ranks: dict[bytes, int], pattern: str):
        from tiktoken import _tiktoken
        self.core, self.pattern = _tiktoken.CoreBPE(ranks, {}, pattern), pattern

    def __reduce__(self):
        ranks = {b: self.core.encode_single_token(b) for b in self.core.token_byte_values()}
        return _TiktokenCore, (ranks, self.pattern)

    def encode(self, text: str) -> list[int]:
        return self.core.encode_ordinary(text)  # (Tokenizer rejects lone surrogates before this)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if len(texts) < 2:
            return [self.encode(t) for t in texts]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2) as ex:  # the encoder lets go of the GIL
            return list(ex.map(self.encode, texts))


class _HFCore:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str):
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]


# ---------------------------------------------------------------------------------------------

class Tokenizer:
    """Encode/decode plus the chat format. Build with `load_tokenizer`, `from_tiktoken` or
    `from_vocab_merges`.

    Added tokens come in two kinds, as in transformers: special ones (`<|im_start|>`, ...) are
    matched in text only with `allow_special=True`; non-special ones (Qwen2.5's `<tool_call>`)
    are ordinary vocabulary and always matched.
    """

    def __init__(self, core, id_to_bytes: list[bytes | None], added_tokens: list[dict], *,
                 normalize_nfc: bool, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 stop_token_ids: list[int] | None = None, first_generation: bool = False):
        self._core = core
        self._bytes = list(id_to_bytes)
        self.normalize_nfc = normalize_nfc
        self.first_generation = first_generation
        self.special_tokens: dict[str, int] = {}
        self.added_tokens: dict[str, int] = {}     # every added token, special or not
        for t in added_tokens:
            i, content = int(t["id"]), t["content"]
            if not isinstance(content, str) or not content:
                raise Qwen2Error(f"added token {i}: content must be a non-empty string")
            if i >= len(self._bytes):
                self._bytes.extend([None] * (i + 1 - len(self._bytes)))
            self._bytes[i] = content.encode("utf-8")
            self.added_tokens[content] = i
            if t.get("special", True):
                self.special_tokens[content] = i
        self._special_ids = frozenset(self.special_tokens.values())
        self._added_ids = frozenset(self.added_tokens.values())
        self._skip_bytes = [b"" if i in self._special_ids else b for i, b in enumerate(self._bytes)]
        plain_added = [t for t in self.added_tokens if t not in self.special_tokens]
        self._split_plain = _alternation(plain_added)
        self._split_all = _alternation(list(self.added_tokens))
        self._str_to_id: dict[str, int] | None = None
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        for name in ("bos_token", "eos_token", "pad_token"):
            tok = getattr(self, name)
            if tok is not None and self.token_to_id(tok) is None:
                raise Qwen2Error(f"{name} {tok!r} is not in the vocabulary")
        if stop_token_ids is None:
            names = [IM_END, ENDOFTEXT] + ([IM_START] if first_generation else [])
            stop_token_ids = [self.added_tokens[n] for n in names if n in self.added_tokens]
            if self.eos_token_id is not None and self.eos_token_id not in stop_token_ids:
                stop_token_ids.append(self.eos_token_id)
        self.stop_token_ids: list[int] = list(dict.fromkeys(int(i) for i in stop_token_ids))

    # ---- constructors ------------------------------------------------------------------------

    @classmethod
    def from_tiktoken(cls, path, *, normalize_nfc: bool = False, **kw) -> "Tokenizer":
        """First-generation Qwen: `qwen.tiktoken` plus its 208 special tokens (ids from 151643)."""
        ranks = load_tiktoken_ranks(path)
        n = max(ranks.values()) + 1
        if len(ranks) != n:
            raise Qwen2Error(f"{path}: ranks are not 0..{len(ranks) - 1}")
        id_to_bytes = [b""] * n
        for b, r in ranks.items():
            id_to_bytes[r] = b
        added = [{"id": n + k, "content": s, "special": True} for k, s in enumerate(QWEN1_SPECIALS)]
        kw.setdefault("eos_token", ENDOFTEXT)
        kw.setdefault("pad_token", ENDOFTEXT)
        kw.setdefault("first_generation", True)
        return cls(_TiktokenCore(ranks, QWEN_PATTERN), id_to_bytes, added, normalize_nfc=normalize_nfc, **kw)

    @classmethod
    def from_vocab_merges(cls, vocab: dict[str, int], merges, added_tokens: list[dict] | None = None, *,
                          chat_template: str | None = None, bos_token: str | None = None,
                          eos_token: str | None = None, pad_token: str | None = None,
                          normalize_nfc: bool = True, pattern: str = QWEN_PATTERN,
                          stop_token_ids: list[int] | None = None) -> "Tokenizer":
        """From vocab.json / GGUF-form strings (GPT-2 byte-to-unicode) and merges ("a b" or pairs)."""
        added_tokens = list(added_tokens or [])
        added_ids = {int(t["id"]) for t in added_tokens}
        pairs = []
        for m in merges:
            pair = tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            if len(pair) != 2:
                raise Qwen2Error(f"bad merge {m!r}: expected two tokens")
            pairs.append(pair)
        n = max([*vocab.values(), *added_ids], default=-1) + 1
        id_to_bytes: list[bytes | None] = [None] * n
        for s, i in vocab.items():
            if i in added_ids:
                continue
            b = token_bytes(s)
            if b is None:
                raise Qwen2Error(f"vocab token {s!r} (id {i}) is not in byte-level (GPT-2) form")
            id_to_bytes[i] = b
        core = None
        if pattern == QWEN_PATTERN and _tiktoken_safe(vocab, pairs):
            ranks = {id_to_bytes[i]: i for i in range(256 + len(pairs))}
            core = _TiktokenCore(ranks, pattern)
        else:
            core = _HFCore({s: i for s, i in vocab.items() if i not in added_ids}, pairs, pattern)
        return cls(core, id_to_bytes, added_tokens, normalize_nfc=normalize_nfc, chat_template=chat_template,
                   bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                   stop_token_ids=stop_token_ids)

    # ---- vocabulary --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    def __len__(self) -> int:
        return len(self._bytes)

    def token_to_id(self, token: str) -> int | None:
        """Id of an added token's text, or of a regular token in vocab.json (byte-to-unicode) form."""
        if token in self.added_tokens:
            return self.added_tokens[token]
        if self._str_to_id is None:
            self._str_to_id = {self.id_to_token(i): i for i, b in enumerate(self._bytes)
                               if b is not None and i not in self._added_ids}
        return self._str_to_id.get(token)

    def id_to_token(self, i: int) -> str:
        """vocab.json form of a regular token ('Ġworld'), or an added token's text."""
        b = self._lookup(i)
        if i in self._added_ids:
            return b.decode("utf-8")
        return token_str(b)  # not kept for every id: 151k strings are ~20 MB resident

    def id_to_bytes(self, i: int) -> bytes:
        return self._lookup(i)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    # ---- encode ------------------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token text stays plain text unless `allow_special`."""
        return self._encode(_check_text(text), self._split_all if allow_special else self._split_plain)

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of str; use encode() for one string")
        texts = [_check_text(t) for t in texts]
        split = self._split_all if allow_special else self._split_plain
        if split is None:
            return self._core.encode_batch([self._normalize(t) for t in texts])
        # one core batch over every text piece of every input, then reassemble
        plans, pieces = [], []
        for t in texts:
            plan = []
            for k, piece in enumerate(split.split(t)):
                if k % 2:
                    plan.append((True, self.added_tokens[piece]))
                elif piece:
                    plan.append((False, len(pieces)))
                    pieces.append(self._normalize(piece))
            plans.append(plan)
        encoded = self._core.encode_batch(pieces)
        out = []
        for plan in plans:
            ids = []
            for is_token, v in plan:
                if is_token:
                    ids.append(v)
                else:
                    ids += encoded[v]
            out.append(ids)
        return out

    def encode_plain(self, text: str) -> list[int]:
        """Ids of `text` with no added token matched at all (not even non-special ones)."""
        return self._encode(_check_text(text), None)

    def _normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self.normalize_nfc else text

    def _encode(self, text: str, split) -> list[int]:
        if split is None:
            return self._core.encode(self._normalize(text)) if text else []
        ids = []
        # re.split with one group alternates text, token, text, ...; added tokens are matched on
        # the raw text and each piece between them is normalized on its own, as HF does.
        for k, piece in enumerate(split.split(text)):
            if k % 2:
                ids.append(self.added_tokens[piece])
            elif piece:
                ids += self._core.encode(self._normalize(piece))
        return ids

    # ---- decode ------------------------------------------------------------------------------

    def _lookup(self, i) -> bytes:
        try:
            b = self._bytes[i] if i >= 0 else None
        except (IndexError, TypeError):
            b = None
        if b is None:
            if not isinstance(i, int) or isinstance(i, bool):
                raise TypeError(f"token ids must be int, got {type(i).__name__}")
            raise ValueError(f"token id {i} is out of range (vocabulary has {len(self._bytes)} ids)")
        return b

    def decode_bytes(self, ids, skip_special_tokens: bool = False) -> bytes:
        ids = _as_id_list(ids)
        table = self._skip_bytes if skip_special_tokens else self._bytes
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            for i in ids:   # slow path only to name the offending id
                self._lookup(i)
            raise

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (a character cut off mid-way) becomes U+FFFD, as in HF."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat --------------------------------------------------------------------------------

    @property
    def supports_tools(self) -> bool:
        from qwen2.text.chat_template import template_uses
        return template_uses(self.chat_template_or_default, "tools")

    @property
    def chat_template_or_default(self) -> str:
        from qwen2.text.chat_template import DEFAULT_CHAT_TEMPLATE
        return self.chat_template or DEFAULT_CHAT_TEMPLATE

    def _template_vars(self) -> dict:
        return {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                  ("pad_token", self.pad_token)) if v is not None}

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools=None,
                            **template_kwargs) -> str:
        """The conversation as text, rendered by the checkpoint's template (transformers semantics)."""
        from qwen2.text.chat_template import render
        return render(self.chat_template_or_default, messages, add_generation_prompt=add_generation_prompt,
                      tools=tools, **{**self._template_vars(), **template_kwargs})

    def encode_chat(self, messages, add_generation_prompt: bool = True, tools=None, **template_kwargs) -> list[int]:
        """Ids of the rendered conversation. Special ids come only from the template's markup:
        control-token text inside messages/tools is encoded as plain text (no prompt injection)."""
        from qwen2.text.chat_template import encode_chat
        return encode_chat(self, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           **{**self._template_vars(), **template_kwargs})

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, special={len(self.special_tokens)}, "
                f"nfc={self.normalize_nfc}, core={type(self._core).__name__.strip('_')})")


class StreamDecoder:
    """Feed ids one at a time; get back only complete UTF-8 text. A character split across
    byte tokens is held until its last byte arrives; the deltas concatenate to `decode(ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id], self.skip_special_tokens))

    def flush(self) -> str:
        """Whatever is still held (an unfinished character comes out as U+FFFD); then reset."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


# ---------------------------------------------------------------------------------------------

def _alternation(tokens: list[str]):
    if not tokens:
        return None
    # longest first: Python's alternation is leftmost-first, HF's added-token matcher is longest
    return re.compile("(" + "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) + ")")


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    m = _SURROGATE.search(text)
    if m:
        raise ValueError(f"text has a lone surrogate U+{ord(m.group()):04X} at index {m.start()}; "
                         "it is not valid Unicode and cannot be encoded as UTF-8")
    return text


def _as_id_list(ids) -> list:
    if hasattr(ids, "tolist"):       # torch / numpy
        ids = ids.tolist()
    if isinstance(ids, int):
        ids = [ids]
    if isinstance(ids, (str, bytes)):
        raise TypeError("decode expects a list of int token ids")
    return ids if isinstance(ids, list) else list(ids)


def _tiktoken_safe(vocab: dict[str, int], pairs: list[tuple[str, str]]) -> bool:
    """True when rank BPE (tiktoken) provably gives the same ids as these merges: bytes are ids
    0..255, merge k makes id 256+k, and the merges are a known tiktoken-derived list."""
    if len(pairs) > len(vocab):
        return False
    for k, (a, b) in enumerate(pairs):
        if vocab.get(a + b) != 256 + k:
            return False
    singles = {s: i for s, i in vocab.items() if i < 256}
    if sorted(singles.values()) != list(range(256)) or any(len(s) != 1 for s in singles):
        return False
    return merges_fingerprint(pairs) in TIKTOKEN_SAFE_MERGES


# ---------------------------------------------------------------------------------------------
# Loading

def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Qwen2Error(f"{path}: cannot read JSON ({type(e).__name__}: {e})") from None


def _token_content(v):
    return v.get("content") if isinstance(v, dict) else v


def _added_from_config(cfg: dict) -> list[dict]:
    out = []
    for i, t in (cfg.get("added_tokens_decoder") or {}).items():
        out.append({"id": int(i), "content": t["content"], "special": bool(t.get("special", False))})
    return out


def _chat_template_from(d: Path, cfg: dict) -> str | None:
    # transformers >= 4.43 saves it as chat_template.jinja, which takes priority
    f = d / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    t = cfg.get("chat_template")
    if isinstance(t, list):     # named templates: [{"name": "default", "template": ...}, ...]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t


def _stop_ids_from(d: Path) -> list[int] | None:
    f = d / "generation_config.json"
    if not f.is_file():
        return None
    eos = _read_json(f).get("eos_token_id")
    if eos is None:
        return None
    return [eos] if isinstance(eos, int) else list(eos)


def load_tokenizer_dir(d: Path) -> Tokenizer:
    cfg_path = d / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    specials = {k: _token_content(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
    kw = dict(chat_template=_chat_template_from(d, cfg), stop_token_ids=_stop_ids_from(d))
    if (d / "tokenizer.json").is_file():
        tj = _read_json(d / "tokenizer.json")
        model = tj.get("model") or {}
        if model.get("type") != "BPE":
            raise Qwen2Error(f"{d / 'tokenizer.json'}: model type {model.get('type')!r} is not byte-level BPE")
        added = [{"id": t["id"], "content": t["content"], "special": bool(t.get("special"))}
                 for t in tj.get("added_tokens") or []]
        # tokenizer_config's added_tokens_decoder may mark more tokens (it wins, as in transformers)
        by_id = {t["id"]: t for t in added}
        by_id.update({t["id"]: t for t in _added_from_config(cfg)})
        nfc = "NFC" in json.dumps(tj.get("normalizer"))
        pattern = _split_pattern(tj.get("pre_tokenizer"), d / "tokenizer.json")
        if not cfg_path.is_file():
            specials = dict(bos_token=None, eos_token=ENDOFTEXT if ENDOFTEXT in {t["content"] for t in added} else None,
                            pad_token=None)
        return Tokenizer.from_vocab_merges(model["vocab"], model["merges"], list(by_id.values()),
                                           normalize_nfc=nfc, pattern=pattern, **specials, **kw)
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        vocab = _read_json(d / "vocab.json")
        lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [ln for ln in lines if ln and not ln.startswith("#version")]
        added = _added_from_config(cfg)
        if not added:   # Qwen2Tokenizer's defaults when tokenizer_config.json is absent
            n = max(vocab.values()) + 1
            added = [{"id": n, "content": ENDOFTEXT, "special": True}]
            specials = dict(bos_token=None, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT)
        return Tokenizer.from_vocab_merges(vocab, merges, added, normalize_nfc=True, **specials, **kw)
    if (d / "qwen.tiktoken").is_file():
        # the first-generation checkpoints say nothing about eos in tokenizer_config: <|endoftext|>
        return Tokenizer.from_tiktoken(d / "qwen.tiktoken", **kw)
    raise Qwen2Error(f"{d}: no tokenizer found (expected tokenizer.json, vocab.json + merges.txt, "
                     "qwen.tiktoken or a .gguf file)")


def _split_pattern(pre, where) -> str:
    """The regex of the Split pre-tokenizer (Qwen2 form: Sequence[Split(regex), ByteLevel])."""
    items = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    for p in items:
        if isinstance(p, dict) and p.get("type") == "Split":
            pat = p.get("pattern") or {}
            if "Regex" in pat:
                return pat["Regex"]
    raise Qwen2Error(f"{where}: unsupported pre-tokenizer (expected a Split regex + ByteLevel, as Qwen2 ships)")
