"""Minimal Prometheus text exposition (format 0.0.4): no extra dependency for a handful of series."""
from __future__ import annotations

import bisect
import threading


class Histogram:
    def __init__(self, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)):
        self.buckets = list(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, v: float):
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, v)] += 1
            self.sum += v
            self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


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
