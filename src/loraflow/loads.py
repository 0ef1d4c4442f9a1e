"""What this process loaded, counted by kind (base_model, tokenizer, config, dataset): a run loads
each once (loraflow.recipe), and tests hold it to that by reading these counts."""

from __future__ import annotations

import collections
import threading

_counts: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()


def count(kind: str) -> None:
    with _lock:
        _counts[kind] += 1


def snapshot() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def since(before: dict[str, int]) -> dict[str, int]:
    """Loads since `before` (a `snapshot()`), by kind; kinds with none left out."""
    now = snapshot()
    return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}
