"""Counters the engine keeps about itself. Plain numbers: the server turns them into metrics
when scraped, so the engine depends on no metrics library."""
from __future__ import annotations

import bisect
import threading


class Histogram:
    """Counts of observations per bucket (upper bounds, as Prometheus' `le`), their sum and count."""

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

    def snapshot(self) -> tuple[list[tuple[float, int]], float]:
        """([(upper bound, observations <= it), ..., (inf, count)], sum), all from one moment:
        read under the lock so the buckets, count and sum of one scrape agree."""
        with self._lock:
            counts, total = list(self.counts), self.sum
        out, acc = [], 0
        for bound, c in zip(self.buckets + [float("inf")], counts):
            acc += c
            out.append((float(bound), acc))
        return out, total
