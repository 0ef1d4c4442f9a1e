"""Turning `data.source` into cleaned train/eval text splits.

A source is a hub dataset id, a local file or folder (parquet, jsonl/json, csv, txt, or the
original aclImdb layout), or an `s3://` prefix/object holding any of those (mirrored into the
cache, then read as local). Files are read with the `datasets` packaged builders, so users get
the same parsing they get from `load_dataset("json", ...)`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from loraflow.errors import DataError, StorageError
from loraflow.log import get_logger, log_once
from loraflow.paths import cache_dir
from loraflow.storage.client import is_s3_uri, parse_s3_uri

if TYPE_CHECKING:
    import datasets

    from loraflow.settings import DataSettings, StorageSettings

log = get_logger("data")

# suffix -> datasets packaged builder. `.txt` is one document per line (the "text" builder's
# default), except in the aclImdb layout where each file is one review.
BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".txt": "text",
}
# What a local folder may also hold without being data (READMEs, licences, metadata).
_IGNORED_NAMES = {"readme", "readme.md", "license", "licence", "license.txt", ".gitattributes",
                  "dataset_info.json", "dataset_infos.json", "loraflow-assets.json"}

TEXT = "text"  # the column name load_records returns, whatever data.text_column was

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_text(text: str | None, clean_html: bool) -> str:
    """IMDB's markup is `<br /><br />` between paragraphs: a newline keeps the paragraph break."""
    if text is None:
        return ""
    if clean_html:
        text = _BR.sub("\n", text)
    return text.strip()


# ---------------------------------------------------------------------------------------------
# Resolving where the data is
# ---------------------------------------------------------------------------------------------

def _looks_like_path(source: str) -> bool:
    return (source.startswith(("/", "./", "../", "~")) or Path(source).suffix.lower() in BUILDERS
            or "\\" in source)


def mirror_s3_source(storage: StorageSettings, uri: str) -> Path:
    """Mirror an `s3://bucket/prefix` (or one object) into the cache and return the local path,
    through the storage layer: an object replaced in the bucket is fetched again (by ETag, even at
    the same size) and one deleted or renamed there is removed here, so a stale copy never feeds
    the fingerprint or training."""
    from loraflow.storage.transfer import mirror_uri

    bucket, key = parse_s3_uri(uri)
    ident = hashlib.sha256(f"{storage.endpoint_url or 'aws'}|{bucket}|{key}".encode()).hexdigest()[:16]
    try:
        return mirror_uri(storage, uri, cache_dir("datasets", "s3", ident), "data").path
    except StorageError as exc:
        raise DataError(f"data.source {uri}: {exc}") from None


def _find_acl_imdb_root(folder: Path) -> Path | None:
    """The folder itself or an `aclImdb/` child, if it has `train/pos` or `train/neg` of .txt files."""
    for root in (folder, folder / "aclImdb"):
        if any((root / "train" / label).is_dir() for label in ("pos", "neg")):
            return root
    return None


def _data_files_in(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        rel_parts = path.relative_to(folder).parts
        if not path.is_file() or any(part.startswith((".", "_")) for part in rel_parts):
            continue  # hidden files, .cache folders, _SUCCESS markers
        if path.name.lower() in _IGNORED_NAMES:
            continue
        files.append(path)
    return files


def _builder_for(files: list[Path], where: str) -> str:
    unsupported = [f for f in files if f.suffix.lower() not in BUILDERS]
    if unsupported:
        raise DataError(f"{where}: unsupported file type {unsupported[0].suffix or '(none)'!r} "
                        f"({unsupported[0]}); supported: {', '.join(sorted(BUILDERS))}")
    builders = {BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise DataError(f"{where}: mixes file types ({', '.join(sorted({f.suffix for f in files}))}); "
                        "keep one format per dataset")
    return builders.pop()


def _split_files(folder: Path, files: list[Path]) -> dict[str, list[str]]:
    """Split names from file names (`train.jsonl`, `test-00000-of-00001.parquet`, `data/valid.csv`)
    with the same patterns `load_dataset(folder)` uses; files naming no split are all `train`."""
    from datasets.data_files import get_data_patterns, resolve_pattern

    wanted = {str(f) for f in files}
    try:
        patterns = get_data_patterns(str(folder))
    except Exception:  # datasets raises EmptyDatasetError when nothing matches
        patterns = {}
    splits: dict[str, list[str]] = {}
    for split, split_patterns in patterns.items():
        matched: list[str] = []
        for pattern in split_patterns:
            try:
                matched += [p for p in resolve_pattern(pattern, str(folder)) if p in wanted]
            except FileNotFoundError:
                continue
        if matched:
            splits[str(split)] = sorted(set(matched))
    if not splits:
        splits = {"train": sorted(wanted)}
    return splits


def _load_builder(builder: str, data_files: dict[str, list[str]], where: str, **options) -> datasets.DatasetDict:
    import datasets

    try:
        loaded = datasets.load_dataset(builder, data_files=data_files, **options)
    except DataError:
        raise
    except Exception as exc:  # parse errors surface as DatasetGenerationError wrapping the cause
        cause = exc.__cause__ or exc
        files = [f for fs in data_files.values() for f in fs]
        named = files[0] if len(files) == 1 else f"{where} ({len(files)} files)"
        # datasets reports a split with zero rows (a header-only csv, an empty jsonl) this way.
        if isinstance(exc, ValueError) and "corresponds to no data" in str(exc) \
                or type(exc).__name__ == "EmptyDatasetError" or isinstance(cause, StopIteration):
            raise DataError(f"{named}: the dataset is empty (no rows)") from None
        raise DataError(f"cannot read {named} as {builder}: {type(cause).__name__}: {cause}") from None
    return loaded


def _load_acl_imdb(root: Path) -> datasets.DatasetDict:
    """aclImdb's `{train,test}/{pos,neg}/*.txt` (+ `train/unsup`), one review per file, with the
    splits and labels the hub's `imdb` dataset has (train, test, unsupervised; neg=0, pos=1, unsup=-1)."""
    import datasets

    layout = {"train": [("neg", 0), ("pos", 1)], "test": [("neg", 0), ("pos", 1)], "unsupervised": [("unsup", -1)]}
    split_dir = {"train": "train", "test": "test", "unsupervised": "train"}
    result = {}
    for split, parts in layout.items():
        pieces = []
        for label_dir, label in parts:
            folder = root / split_dir[split] / label_dir
            files = sorted(str(p) for p in folder.glob("*.txt")) if folder.is_dir() else []
            if not files:
                continue
            # One review per file, whatever newlines it holds.
            part = _load_builder("text", {"train": files}, str(folder), sample_by="document")["train"]
            pieces.append(part.add_column("label", [label] * len(part)))
        if pieces:
            result[split] = datasets.concatenate_datasets(pieces)
    return datasets.DatasetDict(result)


def _load_saved(path: Path) -> datasets.DatasetDict:
    """A folder written by `Dataset(Dict).save_to_disk` (Arrow files, no pickles)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"cannot read {path} as a saved dataset: {type(exc).__name__}: {exc}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _load_local(path: Path) -> datasets.DatasetDict:
    if path.is_file():
        builder = _builder_for([path], str(path))
        return _load_builder(builder, {"train": [str(path)]}, str(path))
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _load_saved(path)
    imdb_root = _find_acl_imdb_root(path)
    if imdb_root is not None:
        return _load_acl_imdb(imdb_root)
    files = _data_files_in(path)
    if not files:
        raise DataError(f"data.source {path}: folder holds no data files "
                        f"(supported: {', '.join(sorted(BUILDERS))})")
    builder = _builder_for(files, str(path))
    return _load_builder(builder, _split_files(path, files), str(path))


def _load_hub(data: DataSettings) -> datasets.DatasetDict:
    import datasets

    # `data.revision` pins a hub commit/tag when the settings have it (older settings do not).
    revision = getattr(data, "revision", None)
    try:
        loaded = datasets.load_dataset(data.source, data.config_name, revision=revision)
    except Exception as exc:  # offline, unknown id, gated repo ...: one line naming the source
        what = f"{data.source}" + (f" (config {data.config_name})" if data.config_name else "")
        raise DataError(f"data.source: cannot load hub dataset {what}: {type(exc).__name__}: {exc}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def load_source(data: DataSettings, storage: StorageSettings) -> tuple[datasets.DatasetDict, str]:
    """The raw splits of `data.source` and a description of where they came from."""
    source = data.source
    if is_s3_uri(source):
        local = mirror_s3_source(storage, source)
        return _load_local(local), source
    path = Path(source).expanduser()
    if path.exists():
        return _load_local(path), str(path)
    if _looks_like_path(source):
        raise DataError(f"data.source: no such file or folder: {source}")
    return _load_hub(data), f"hub:{source}"


# ---------------------------------------------------------------------------------------------
# Splits, cleaning, sampling
# ---------------------------------------------------------------------------------------------

def _check_decodes(column: datasets.Dataset, where: str, data: DataSettings) -> None:
    """Reading values decodes them: a file that is not UTF-8 fails here, named, not in a traceback."""
    try:
        for start in range(0, len(column), 10_000):
            column[start:start + 10_000]
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: column {data.text_column!r} is not UTF-8 text ({exc.reason} at byte "
                        f"{exc.start}); re-encode the file as UTF-8") from None


def _text_only(ds: datasets.Dataset, data: DataSettings, where: str) -> datasets.Dataset:
    if len(ds) == 0:
        raise DataError(f"{where}: the dataset is empty (no rows)")
    if data.text_column not in ds.column_names:
        raise DataError(f"{where}: no text column {data.text_column!r} (data.text_column); "
                        f"columns are: {', '.join(ds.column_names)}")
    column = ds.select_columns([data.text_column])
    if data.text_column != TEXT:
        column = column.rename_column(data.text_column, TEXT)
    clean = data.clean_html
    before = len(column)
    _check_decodes(column, where, data)
    sample = [v for v in column[:100][TEXT] if v is not None]
    kinds = {type(v).__name__ for v in sample if not isinstance(v, str)}
    if kinds and not any(isinstance(v, str) for v in sample):
        raise DataError(f"{where}: column {data.text_column!r} (data.text_column) holds {', '.join(sorted(kinds))} "
                        "values, not text")
    column = column.map(lambda batch: {TEXT: [clean_text(t if isinstance(t, str) else None, clean)
                                             for t in batch[TEXT]]},
                        batched=True, keep_in_memory=True, desc=None)
    column = column.filter(lambda batch: [bool(t) for t in batch[TEXT]], batched=True, keep_in_memory=True)
    if len(column) == 0:
        raise DataError(f"{where}: every value of column {data.text_column!r} is empty")
    if len(column) < before:
        log_once(log, logging.INFO, "%s: dropped %d empty texts of %d", where, before - len(column), before)
    return column


def _limit(ds: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    # A seeded shuffle before taking N: hub splits are often sorted (IMDB: all neg, then all pos).
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit)).flatten_indices(keep_in_memory=True)


def _eval_split_name(data: DataSettings, splits: list[str], train_name: str, where: str) -> str | None:
    """`data.eval_split` when the source has it; else the source's own held-out split
    (validation, then test) rather than carving one out of train; else None (hold out)."""
    if not data.eval_split:
        return None
    if data.eval_split in splits and data.eval_split != train_name:
        return data.eval_split
    for name in ("validation", "test"):
        if name in splits and name != train_name:
            log_once(log, logging.INFO, "%s has no split %r: using its %r split for eval", where, data.eval_split,
                     name)
            return name
    return None


def load_records(data: DataSettings, storage: StorageSettings, *, seed: int = 42) -> datasets.DatasetDict:
    """Cleaned `train`/`eval` splits with one column `text` (renamed from `data.text_column`).

    The eval split is `data.eval_split` when the source has it; otherwise `data.eval_size` of the
    train split is held out with a split seeded by `seed` (the training seed)."""
    import datasets

    raw, where = load_source(data, storage)
    splits = list(raw.keys())
    if not splits:
        raise DataError(f"{where}: the dataset is empty (no splits)")
    train_name = data.train_split
    if train_name not in raw:
        if len(splits) == 1:
            train_name = splits[0]
        else:
            raise DataError(f"{where}: no split {data.train_split!r} (data.train_split); splits are: {', '.join(splits)}")
    train = _text_only(raw[train_name], data, f"{where} [{train_name}]")
    eval_name = _eval_split_name(data, list(raw.keys()), train_name, where)
    if eval_name is not None:
        eval_ds = _text_only(raw[eval_name], data, f"{where} [{eval_name}]")
        log_once(log, logging.INFO, "eval split: %r from %s", eval_name, where)
    else:
        if len(train) < 2:
            raise DataError(f"{where}: {len(train)} document(s) cannot be split into train and eval; "
                            "add data or provide an eval split (data.eval_split)")
        if data.eval_split:
            log_once(log, logging.INFO, "%s has no split %r: holding out %.1f%% of %r (seed %d)",
                     where, data.eval_split, 100 * data.eval_size, train_name, seed)
        parts = train.train_test_split(test_size=data.eval_size, seed=seed, shuffle=True, keep_in_memory=True)
        train, eval_ds = parts["train"], parts["test"]
    train = _limit(train, data.max_train_samples, seed)
    eval_ds = _limit(eval_ds, data.max_eval_samples, seed)
    return datasets.DatasetDict({"train": train, "eval": eval_ds})


__all__ = ["load_records", "load_source", "clean_text", "mirror_s3_source", "BUILDERS", "TEXT"]
