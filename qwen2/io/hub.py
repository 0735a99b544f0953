"""Where a checkpoint is: a local path, or a Hugging Face hub id resolved through huggingface_hub
(the local cache first)."""
from __future__ import annotations

import os
from pathlib import Path

from qwen2.errors import Qwen2Error


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint path, or a hub id resolved through huggingface_hub (cache first)."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        return p
    s = str(path_or_id)
    if s.startswith((".", "/", "~")) or s.count("/") != 1 or s.endswith((".gguf", ".json")):
        raise Qwen2Error(f"{s}: no such file or directory")
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "*.txt", "*.tiktoken", "*.py", "*.model"]
    try:
        return Path(snapshot_download(s, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(s, allow_patterns=patterns))
    except Exception as e:
        raise Qwen2Error(
            f"{s}: not in the local Hugging Face cache and the hub cannot be reached "
            f"({type(e).__name__}). Download it on a connected machine (huggingface-cli download {s}) "
            "and pass the local directory, e.g. --model /path/to/Qwen2-0.5B-Instruct") from None
