"""Minimal Prometheus text exposition (format 0.0.4): no extra dependency for a handful of series."""
from __future__ import annotations

from qwen2.engine.stats import Histogram


def render(families: list[tuple[str, str, str, object]]) -> str:
    """families: (name, type, help, value) where value is a number, a {label-string: number} dict
    or a Histogram."""
    lines = []
    for name, kind, help_, value in families:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        if isinstance(value, Histogram):
            lines += value.lines(name)
        elif isinstance(value, dict):
            lines += [f"{name}{{{labels}}} {v}" for labels, v in sorted(value.items())]
        else:
            lines.append(f"{name} {value}")
    return "\n".join(lines) + "\n"
