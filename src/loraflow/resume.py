"""Which local checkpoint a run may continue from, and which it must not.

transformers' `get_last_checkpoint` takes the highest `checkpoint-N` in the folder, whatever run
wrote it and whether or not it was finished. loraflow marks a checkpoint complete only after
Trainer has written all of it (`on_save`), with the identity of the run that wrote it: the data
fingerprint, every setting that changes what training computes (loraflow.settings.result_fields:
the same rule as the change check, less the schedule, since resuming with a longer one is how a
run is extended), the sha256 of the base model's weight files, the precision the run resolved
to and the number of processes. Resume takes the newest complete checkpoint, skips incomplete
ones with a log line, and refuses (one line naming what differs) a checkpoint of another run;
`fresh` removes old checkpoints instead, saying so.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.errors import ConfigError
from loraflow.log import get_logger

if TYPE_CHECKING:
    from loraflow.settings import Settings

log = get_logger("train")

RUN_MARKER = "loraflow-run.json"
# What Trainer writes into a checkpoint that resuming never reads: a full pickle of the
# TrainingArguments. Never uploaded (loraflow.checkpoints), so never required here either.
UNUSED_ON_RESUME = frozenset({"training_args.bin"})
_CHECKPOINT = re.compile(r"checkpoint-([0-9]+)")


def run_identity(settings: Settings, data_fingerprint: str, *, base_weights: dict[str, str],
                 precision: str, world_size: int) -> dict[str, Any]:
    """What a checkpoint must agree on to be continued. `base_weights`: {file: sha256} of the base
    model; `precision`: what the run resolved to (e.g. "bf16/bfloat16"), not what it asked for."""
    from loraflow.settings import result_fields

    return {
        "data.fingerprint": data_fingerprint,
        **result_fields(settings, leave_out=("inert", "schedule", "resolved")),
        **{f"base_model.weights[{name}]": digest for name, digest in sorted(base_weights.items())},
        "precision": precision,
        "world_size": world_size,
    }


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """`checkpoint-N` folders of `out`, newest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name))]
    return sorted(found, reverse=True)


def mark_complete(checkpoint: Path, identity: dict[str, Any]) -> None:
    """The marker holds the run's identity and the size of every file Trainer wrote, so a file cut
    short afterwards (a full disk, a copy interrupted) is seen before Trainer tries to load it."""
    files = {p.relative_to(checkpoint).as_posix(): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and not p.name.startswith((".", RUN_MARKER)) and p.name not in UNUSED_ON_RESUME}
    tmp = checkpoint / f".{RUN_MARKER}.part"
    tmp.write_text(json.dumps({"identity": identity, "files": files}, indent=1, sort_keys=True))
    tmp.replace(checkpoint / RUN_MARKER)


def unloadable(checkpoint: Path, files: dict[str, int]) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None. Cheap and without unpickling anything:
    every file the marker lists at its size, torch's zip-format files (optimizer.pt, scheduler.pt,
    rng_state.pth) through their CRC check, and the safetensors header."""
    import zipfile

    for name, size in sorted(files.items()):
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size:,} bytes, {size:,} when it was saved"
        if zipfile.is_zipfile(path):
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                return f"{name} is unreadable ({exc})"
            if bad is not None:
                return f"{name} is corrupt ({bad} fails its CRC check)"
        elif name.endswith((".pt", ".pth", ".bin")):
            return f"{name} is not a torch zip archive"
        elif name.endswith(".safetensors"):
            try:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt"):
                    pass
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                return f"{name} is unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return None


def choose_checkpoint(out: Path, identity: dict[str, Any]) -> Path | None:
    """The newest complete checkpoint of this run in `out` that loads, or None. ConfigError when the
    newest complete one belongs to a run with other data or settings; one whose files were damaged
    after saving is skipped, saying which file and why."""
    for step, path in checkpoints(out):
        marker = path / RUN_MARKER
        if not marker.is_file():
            log.warning("skipping %s: incomplete (the process died while saving it)", path)
            continue
        try:
            stored = json.loads(marker.read_text())
            recorded, files = stored["identity"], stored["files"]
        except (ValueError, KeyError, TypeError):
            log.warning("skipping %s: unreadable %s (or written by an older loraflow)", path, RUN_MARKER)
            continue
        differs = [f"{k} {_short(recorded.get(k))} -> {_short(v)}" for k, v in identity.items() if recorded.get(k) != v]
        differs += [f"{k} {_short(v)} -> absent" for k, v in recorded.items() if k not in identity]
        if differs:
            raise ConfigError(f"--resume: {path} belongs to another run ({'; '.join(differs[:4])}); "
                              "resume with the settings it was made with, or pass --fresh to start over")
        damaged = unloadable(path, files)
        if damaged:
            log.warning("skipping %s: %s; trying the one before it", path, damaged)
            continue
        return path
    return None


def _short(value: Any) -> str:
    # A sha256 reads as its first 12 characters; anything else as its repr.
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value[:12] + "…"
    return repr(value)


def clear_checkpoints(out: Path) -> None:
    """A fresh run must not leave an older run's checkpoints where a later --resume would find them."""
    old = checkpoints(out)
    if old:
        log.info("starting fresh in %s: removing %d checkpoint(s) of an earlier run (%s)", out, len(old),
                 ", ".join(p.name for _, p in old[:5]))
        for _, path in old:
            shutil.rmtree(path, ignore_errors=True)


def marker_callback(identity: dict[str, Any]):
    """A TrainerCallback marking each checkpoint complete once Trainer has written all of it; it
    must come before callbacks that act on a finished checkpoint (the storage upload)."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if path.is_dir():
                    mark_complete(path, identity)
            return control

    return MarkComplete()
