"""Fixtures for the data tests: review-like texts, writers for every source format, a tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

# Review-shaped texts with IMDB's <br /> markup; the real 400 reviews are used where available.
REVIEWS = [
    "This movie was a delight from start to finish.<br /><br />The acting was superb and the plot kept me guessing.",
    "I wanted to like it, but the pacing dragged and the dialogue felt wooden. Two stars at most.",
    "A quiet, moving film about family and loss.<br />The final scene stayed with me for days.",
    "Terrible. The special effects looked cheap and the story made no sense whatsoever.",
    "An underrated gem! The soundtrack alone is worth the price of admission.",
    "The director clearly loves the genre, and it shows in every frame.<br /><br />Highly recommended.",
    "I fell asleep halfway through. Nothing happens for ninety minutes and then it just ends.",
    "Funny, sharp and surprisingly warm. The cast has wonderful chemistry together.",
    "Not the worst sequel ever made, but it comes close. Skip it and rewatch the original.",
    "A bold, strange, beautiful movie that will divide audiences. I loved every minute of it.",
    "The book was better. The film cuts the best subplot and rushes the ending.",
    "Solid performances all round, though the script could have used another draft.",
]


def review_rows(n: int, seed: int = 0) -> list[dict]:
    """n review-like rows with lengths from one sentence to several paragraphs."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        parts = rng.choices(REVIEWS, k=rng.randint(1, 6))
        rows.append({"text": " ".join(parts), "label": i % 2})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows as .jsonl/.json/.csv/.parquet/.txt (txt: one text per line) by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".txt":
        path.write_text("".join(r["text"].replace("\n", " ") + "\n" for r in rows))
    elif suffix in (".csv", ".parquet"):
        import pandas as pd

        frame = pd.DataFrame(rows)
        frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path, index=False)
    else:
        raise ValueError(suffix)
    return path


def write_acl_imdb(root: Path, rows_per_label: int = 4) -> Path:
    """The original aclImdb tarball layout: one review per file, `{id}_{rating}.txt`."""
    rows = review_rows(5 * rows_per_label, seed=3)
    it = iter(rows)
    for split, labels in (("train", ("pos", "neg", "unsup")), ("test", ("pos", "neg"))):
        for label in labels:
            folder = root / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i in range(rows_per_label):
                (folder / f"{i}_{7 if label == 'pos' else 2}.txt").write_text(next(it)["text"])
    (root / "aclImdb" / "imdb.vocab").write_text("the\nmovie\n")  # extra files of the real tarball
    (root / "aclImdb" / "README").write_text("Large Movie Review Dataset v1.0\n")
    return root


@pytest.fixture(scope="session")
def gpt2_tok():
    from loraflow.demo.tiny_models import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture
def data_home(tmp_path, monkeypatch) -> Path:
    """A fresh LORAFLOW_HOME so prepared caches and s3 mirrors never leak between tests."""
    home = tmp_path / "home"
    monkeypatch.setenv("LORAFLOW_HOME", str(home))
    return home
