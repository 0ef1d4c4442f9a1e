"""Whole directories to and from object storage: the one transfer path of loraflow.

One manifest format, `manifest.json`, written last under a prefix:

    {"files": [{"name": "rel/path", "size": N, "sha256": "<hex>"}, ...], ...fields of its owner}

Registry versions add their metadata, checkpoints their step, base-model uploads nothing. A prefix
without its manifest is an unfinished upload: `download_dir` refuses it.

One allow-list of file types, by kind of directory (`ALLOWED_SUFFIXES`). Nothing pickled crosses
the wire in either direction, except a Trainer checkpoint's optimizer/scheduler/RNG state, which
transformers reads back with `torch.load(weights_only=True)` (see loraflow.checkpoints).

Three ways down, all verified and placed atomically:
- `download_dir`: what a manifest lists, into a temporary sibling, every sha256 checked, then
  renamed into place (registry pulls, checkpoints, staged adapters);
- `mirror_prefix`: an exact local copy of a prefix anyone may have written (a base model or a
  dataset synced with `aws s3 sync`), kept fresh by ETag: an object replaced in place, even with
  the same size, is downloaded again; one removed from the bucket is removed locally. Where the
  prefix has a loraflow manifest, every file is also checked against its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loraflow.errors import ConfigError, IntegrityError, StorageError
from loraflow.hashing import sha256_file
from loraflow.log import get_logger
from loraflow.storage.client import parse_s3_uri
from loraflow.storage.store import PART_SIZE, Store

log = get_logger("storage")

MANIFEST = "manifest.json"
Kind = Literal["adapter", "checkpoint", "model", "data", "logs"]

# Which files each kind of directory may hold, up and down.
ALLOWED_SUFFIXES: dict[str, tuple[str, ...]] = {
    # PEFT adapter (adapter_config.json, adapter_model.safetensors), model card, metrics.json,
    # the settings snapshot (loraflow.yaml), the loss curve the card shows, tokenizer files.
    "adapter": (".safetensors", ".json", ".md", ".yaml", ".png", ".txt", ".jinja"),
    # What Trainer saves for a PEFT model, minus training_args.bin (never read back, a full pickle).
    "checkpoint": (".safetensors", ".json", ".md", ".pt", ".pth"),
    # A transformers model directory: safetensors weights, configs, tokenizer files. No .py (remote
    # code would run with trust_remote_code), no .bin/.pt (torch would unpickle them).
    "model": (".safetensors", ".json", ".txt", ".model", ".jinja", ".tiktoken", ".md"),
    # The data formats loraflow.data reads (and Arrow `save_to_disk` folders), plus READMEs.
    "data": (".parquet", ".jsonl", ".json", ".csv", ".txt", ".arrow", ".md"),
    # A training run's loss history and curve, staged beside its adapter for the flow's artifacts.
    "logs": (".jsonl", ".png"),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")
# Used with fullmatch only (`$` matches before a final newline). Printable ASCII: no control
# characters, and no look-alike Unicode names beside the real ones.
_SEGMENT = re.compile(r"[A-Za-z0-9_][\x20-\x2e\x30-\x5b\x5d-\x7e]{0,254}", re.ASCII)
_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_MIRROR_STATE = ".loraflow-mirror.json"
_READ_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


def check_relpath(name: str, kind: Kind) -> str:
    """A file's path inside a directory of `kind`: relative, POSIX, no '.', '..' or hidden
    segments, an allowed suffix. Every name read from storage passes here before it touches a
    local path."""
    allowed = ALLOWED_SUFFIXES[kind]
    if not isinstance(name, str) or not name or name.startswith("/") or \
            not all(_SEGMENT.fullmatch(part) for part in name.split("/")) or ".." in name.split("/"):
        raise ConfigError(f"{name!r}: not a plain relative file name")
    if name.endswith(allowed):
        return name
    if name.endswith(PICKLE_SUFFIXES):
        raise ConfigError(f"{name}: pickled files are refused in {kind} directories; save weights as "
                          "safetensors (save_pretrained(..., safe_serialization=True))")
    raise ConfigError(f"{name}: not allowed in {kind} directories (allowed: {', '.join(allowed)})")


def local_files(directory: str | os.PathLike, kind: Kind, *, recursive: bool = False,
                exclude: frozenset[str] = frozenset()) -> dict[str, Path]:
    """The files of `directory` that go up, by relative name. Hidden names and an old
    manifest.json are skipped (a pulled directory carries one; the upload writes a new one);
    subdirectories are skipped unless `recursive`, and so are the names in `exclude`. Symlinks and special files are refused: a link
    to a file outside the directory would publish that file."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"directory not found: {root}")
    out: dict[str, Path] = {}

    def walk(folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            rel = path.relative_to(root).as_posix()
            if path.name.startswith(".") or rel == MANIFEST or rel in exclude:
                continue
            if path.is_symlink():
                raise ConfigError(f"{path}: is a symlink; refusing to upload what it points to")
            if path.is_dir():
                if recursive:
                    walk(path)
                continue
            if not path.is_file():
                raise ConfigError(f"{path}: not a regular file")
            try:
                check_relpath(rel, kind)
            except ConfigError as exc:
                raise ConfigError(f"{root}: {exc}") from None
            out[rel] = path

    walk(root)
    return out


# ------------------------------------------------------------------------------------------------
# Up


@dataclass(frozen=True)
class _Digest:
    entry: FileEntry
    md5: str | None  # whole-file hex for single-part uploads (their ETag on most servers), else None


def _digest(name: str, path: Path) -> _Digest:
    # md5 runs at a quarter of sha256's speed here and only a single-part ETag can be checked
    # against it without knowing the server's multipart ETag scheme, so large files skip it.
    with_md5 = path.stat().st_size < PART_SIZE
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            sha.update(chunk)
            if with_md5:
                md5.update(chunk)
            size += len(chunk)
    return _Digest(FileEntry(name, size, sha.hexdigest()), md5.hexdigest() if with_md5 else None)


def upload_files(store: Store, files: dict[str, Path], key_prefix: str, kind: Kind) -> list[FileEntry]:
    """Upload `files` (relative name -> local path) under `key_prefix`, in parallel, hashing each
    file beside its upload (hashlib releases the GIL, so a large file is read once for its checksum
    while the network is busy), then check what the server holds. Returns the entries, by name."""
    for name in files:
        check_relpath(name, kind)
    key_prefix = _as_prefix(key_prefix)
    try:
        return _upload_files(store, files, key_prefix)
    except OSError as exc:  # reading a local file (one removed or unreadable meanwhile)
        raise StorageError(f"upload to s3://{store.bucket}/{key_prefix}: {exc.strerror or exc}"
                           f"{f' ({exc.filename})' if exc.filename else ''}") from None


def _upload_files(store: Store, files: dict[str, Path], key_prefix: str) -> list[FileEntry]:
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="lf-hash") as hashers, \
            ThreadPoolExecutor(max_workers=4, thread_name_prefix="lf-upload") as uploaders:
        digests: dict[str, Future] = {n: hashers.submit(_digest, n, p) for n, p in files.items()}
        uploads = [uploaders.submit(store.upload_file, p, key_prefix + n) for n, p in files.items()]
        for future in uploads:
            future.result()
        done = {n: f.result() for n, f in digests.items()}
    verify_uploads(store, key_prefix, done)
    return [done[n].entry for n in sorted(done)]


def verify_uploads(store: Store, key_prefix: str, expected: dict[str, _Digest]) -> None:
    """One listing checks every file's size; small files also by content through the ETag, the md5
    the server computed (a server whose ETag is not an md5, e.g. SSE-KMS, gets the object read back
    and hashed). Large files are checked by size only: hashing them a second way costs more than
    their upload on a fast link, and every download verifies their sha256 anyway."""
    listed = {obj["Key"][len(key_prefix):]: obj for obj in store.list(key_prefix)}
    for name, digest in expected.items():
        uri = f"s3://{store.bucket}/{key_prefix}{name}"
        obj = listed.get(name)
        if obj is None or obj["Size"] != digest.entry.size:
            got = "nothing" if obj is None else f"{obj['Size']} bytes"
            raise IntegrityError(f"{uri}: upload did not verify (server has {got}, sent {digest.entry.size} bytes)")
        if digest.md5 is None or obj.get("ETag", "").strip('"') == digest.md5:
            continue
        with tempfile.TemporaryDirectory(prefix="loraflow-verify-") as scratch:
            copy = Path(scratch) / "object"
            store.download_file(key_prefix + name, copy)
            if sha256_file(copy) != digest.entry.sha256:
                raise IntegrityError(f"{uri}: upload did not verify (the stored object's sha256 differs)")


def write_manifest(store: Store, key_prefix: str, entries: list[FileEntry], **fields: Any) -> dict:
    """Write `manifest.json` under `key_prefix`: the last object of an upload, which makes it exist."""
    manifest = {**fields, "files": [e.to_dict() for e in entries]}
    store.put_json(_as_prefix(key_prefix) + MANIFEST, manifest)
    return manifest


def upload_dir(store: Store, directory: str | os.PathLike, key_prefix: str, kind: Kind, *,
               recursive: bool = False, **fields: Any) -> dict:
    """Upload a directory's files, then its manifest (with `fields`). Returns the manifest."""
    entries = upload_files(store, local_files(directory, kind, recursive=recursive), key_prefix, kind)
    return write_manifest(store, key_prefix, entries, **fields)


# ------------------------------------------------------------------------------------------------
# Down


def validate_manifest(manifest: Any, kind: Kind, where: str) -> dict:
    """What a reader checks before trusting any file a manifest lists."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise IntegrityError(f"{where}: manifest has no file list")
    seen = set()
    for entry in manifest["files"]:
        if not isinstance(entry, dict) or not {"name", "size", "sha256"} <= entry.keys():
            raise IntegrityError(f"{where}: manifest file entry without name/size/sha256")
        try:
            check_relpath(entry["name"], kind)
        except ConfigError as exc:
            raise IntegrityError(f"{where}: refusing manifest entry: {exc}") from None
        if not _SHA256.fullmatch(str(entry["sha256"])) or type(entry["size"]) is not int or entry["size"] < 0:
            raise IntegrityError(f"{where}: manifest entry {entry['name']} has a bad size or sha256")
        if entry["name"] in seen:
            raise IntegrityError(f"{where}: manifest lists {entry['name']} twice")
        seen.add(entry["name"])
    return manifest


def read_manifest(store: Store, key_prefix: str, kind: Kind) -> dict | None:
    """The validated manifest under `key_prefix`, or None when there is none (unfinished upload)."""
    key = _as_prefix(key_prefix) + MANIFEST
    got = store.get_json(key)
    if got is None:
        return None
    return validate_manifest(got[0], kind, f"s3://{store.bucket}/{key}")


def entries_of(manifest: dict) -> list[FileEntry]:
    return [FileEntry(e["name"], e["size"], e["sha256"]) for e in manifest["files"]]


def _fetch_verified(store: Store, key: str, entry: FileEntry, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    store.download_file(key, target)
    size = target.stat().st_size
    if size != entry.size or sha256_file(target) != entry.sha256:
        target.unlink(missing_ok=True)
        raise IntegrityError(f"s3://{store.bucket}/{key}: content does not match the manifest "
                             f"({size} bytes, expected {entry.size}, sha256 differs); refusing it")


def download_dir(store: Store, key_prefix: str, dest: str | os.PathLike, kind: Kind, *,
                 manifest: dict | None = None) -> dict:
    """Download what the manifest under `key_prefix` lists into `dest` (replacing it), verifying
    every size and sha256 in a temporary sibling first, so `dest` only ever holds a complete,
    verified copy, with the manifest beside the files. Returns the manifest."""
    key_prefix = _as_prefix(key_prefix)
    where = f"s3://{store.bucket}/{key_prefix}"
    if manifest is None:
        manifest = read_manifest(store, key_prefix, kind)
        if manifest is None:
            raise StorageError(f"{where}: no {MANIFEST} (the upload never completed)")
    else:
        manifest = validate_manifest(manifest, kind, where)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        entries = entries_of(manifest)
        # Large files are themselves fetched in parallel ranges; the small ones go beside them.
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="lf-download") as pool:
            for future in [pool.submit(_fetch_verified, store, key_prefix + e.name, e, tmp / e.name)
                           for e in entries]:
                future.result()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _stamp(tmp)
        place_atomically(tmp, dest)
    except OSError as exc:  # the local side: a full disk, a folder made read-only meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"download {where} to {dest}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# A verified directory records which files it held and the sha256 of its manifest when it was
# placed. Every later use re-hashes each file against that manifest: a stat-based stamp (size,
# mtime) is kept by an in-place edit followed by `os.utime`, so only the content can say the copy
# is still what was verified. Measured cost (2 cores, warm page cache, SHA-NI): 0.85 s for a
# 670 MB adapter, less than loading it onto a model; a LoRA adapter is usually a few MB (ms).
_VERIFIED = ".loraflow-verified.json"
STALE_PART_S = 3600


def _file_sizes(directory: Path) -> dict[str, int] | None:
    """Every entry under `directory` but the stamp, by relative name; None when one is a symlink or
    not a regular file (a verified copy holds neither)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if rel == _VERIFIED or (path.is_dir() and not path.is_symlink()):
            continue
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            return None
        out[rel] = st.st_size
    return out


def _stamp(directory: Path) -> None:
    stamp = {"files": _file_sizes(directory), "manifest_sha256": sha256_file(directory / MANIFEST)}
    (directory / _VERIFIED).write_text(json.dumps(stamp, sort_keys=True))


def verified_copy(directory: str | os.PathLike) -> dict | None:
    """The manifest of a directory `download_dir` placed, if it still holds exactly the files it was
    verified with, each with the sha256 its manifest records (re-hashed now, see above); None when
    it is missing, incomplete, has extra or replaced files, or any content changed."""
    directory = Path(directory)
    try:
        stamp = json.loads((directory / _VERIFIED).read_text())
        if not isinstance(stamp, dict) or stamp.get("files") != _file_sizes(directory):
            return None  # cheap first: a file added, removed, resized or replaced by a link
        if sha256_file(directory / MANIFEST) != stamp.get("manifest_sha256"):
            return None
        manifest = json.loads((directory / MANIFEST).read_text())
        entries = {e.name: e for e in entries_of(manifest)}
        if set(entries) | {MANIFEST} != set(stamp["files"]):
            return None
        for name, entry in entries.items():
            if stamp["files"][name] != entry.size or sha256_file(directory / name) != entry.sha256:
                return None
        return manifest
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _remove_stale_parts(dest: Path) -> None:
    """Temporary siblings of `dest` left by a process that was killed mid-download (an exception
    removes its own): gone once they are older than any download could still be running."""
    cutoff = time.time() - STALE_PART_S
    for part in dest.parent.glob(f".{dest.name}.*.part"):
        try:
            if part.is_dir() and part.stat().st_mtime < cutoff:
                shutil.rmtree(part, ignore_errors=True)
        except OSError:
            pass


def place_atomically(tmp: Path, dest: Path) -> None:
    """Rename the finished `tmp` directory to `dest`. An existing `dest` is first renamed aside
    (then removed), so a reader sees the old complete directory or the new one, never a mix."""
    if dest.exists():
        trash = dest.with_name(f".{dest.name}.old-{os.getpid()}-{os.urandom(3).hex()}")
        os.rename(dest, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, dest)


@dataclass(frozen=True)
class Mirror:
    path: Path                 # the local copy: the directory, or its one file for a single object
    files: list[FileEntry]     # what it holds now, with sha256s
    downloaded: int            # files fetched by this sync (0: it was fresh)


def mirror_uri(storage, uri: str, dest: str | os.PathLike, kind: Kind) -> Mirror:
    """`mirror_prefix` for an `s3://bucket/prefix` (or `s3://bucket/one-object.csv`) URI."""
    bucket, key = parse_s3_uri(uri)
    return mirror_prefix(Store(storage, bucket), key, dest, kind)


def mirror_prefix(store: Store, key: str, dest: str | os.PathLike, kind: Kind) -> Mirror:
    """Make the directory `dest` an exact copy of the objects under `key` (a prefix; or one object,
    kept as `dest/<its name>`), refetching
    every object whose ETag or size differs from the last sync, and removing local files whose
    object is gone. Files the allow-list refuses are skipped (never downloaded) with one warning,
    so a hub mirror holding both model.safetensors and pytorch_model.bin yields the safetensors.
    Where the prefix has a loraflow manifest, only its files are mirrored, each sha256-verified."""
    dest = Path(dest)
    where = f"s3://{store.bucket}/{key}"
    single = bool(key) and not key.endswith("/") and store.head(key) is not None
    prefix = key if single or not key else _as_prefix(key)
    listed: dict[str, dict] = {}
    skipped: list[str] = []
    for obj in store.list(prefix):
        rel = Path(obj["Key"]).name if single else obj["Key"][len(prefix):]
        if single and obj["Key"] != key or not rel or rel.endswith("/"):
            continue
        try:
            check_relpath(rel, kind)
        except ConfigError:
            skipped.append(rel)
            continue
        listed[rel] = obj
    if skipped:
        log.warning("%s: skipping %d file(s) not allowed in a %s mirror: %s", where, len(skipped), kind,
                    ", ".join(sorted(skipped)[:5]) + (" ..." if len(skipped) > 5 else ""))
    manifest = None
    if not single and MANIFEST in listed:
        manifest = read_manifest(store, prefix, kind)
        expected = {e.name: e for e in entries_of(manifest)} if manifest else {}
        listed = {rel: obj for rel, obj in listed.items() if rel in expected}
    else:
        expected = {}
    if not listed:
        raise StorageError(f"{where}: no {kind} files there")

    root = dest
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / _MIRROR_STATE
    try:
        state: dict[str, dict] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    except ValueError:
        state = {}

    def fresh(rel: str, obj: dict) -> bool:
        seen, local = state.get(rel), root / rel
        return (seen is not None and seen.get("etag") == obj.get("ETag") and seen.get("size") == obj["Size"]
                and local.is_file() and local.stat().st_size == obj["Size"]
                and (rel not in expected or seen.get("sha256") == expected[rel].sha256))

    def fetch(rel: str, obj: dict) -> dict:
        target = root / rel
        part = target.with_name(f".{target.name}.part")
        if rel in expected:
            _fetch_verified(store, obj["Key"], expected[rel], part)
            digest = expected[rel].sha256
        else:
            part.parent.mkdir(parents=True, exist_ok=True)
            store.download_file(obj["Key"], part)
            digest = sha256_file(part)
        os.replace(part, target)
        return {"etag": obj.get("ETag"), "size": obj["Size"], "sha256": digest}

    stale = {rel: obj for rel, obj in listed.items() if not fresh(rel, obj)}
    if stale:  # the first mirror of a base model can be gigabytes: say so before the wait
        log.info("downloading %d file(s), %.0f MB, from %s", len(stale),
                 sum(o["Size"] for o in stale.values()) / 1e6, where)
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="lf-mirror") as pool:
        fetched = {rel: pool.submit(fetch, rel, obj) for rel, obj in stale.items()}
        new_state = {rel: (fetched[rel].result() if rel in fetched else state[rel]) for rel in listed}
    for local in sorted(root.rglob("*"), reverse=True):
        rel = local.relative_to(root).as_posix()
        if local.is_file() and rel != _MIRROR_STATE and rel not in listed:
            local.unlink()  # gone from the bucket: must not keep feeding a model or a dataset
        elif local.is_dir() and not any(local.iterdir()):
            local.rmdir()
    tmp_state = state_path.with_name(state_path.name + ".part")
    tmp_state.write_text(json.dumps(new_state, indent=1, sort_keys=True))
    os.replace(tmp_state, state_path)
    if stale:
        log.info("mirrored %s -> %s (%d of %d files fetched)", where, dest, len(stale), len(listed))
    files = [FileEntry(rel, new_state[rel]["size"], new_state[rel]["sha256"]) for rel in sorted(listed)]
    return Mirror(root / next(iter(listed)) if single else root, files, len(stale))


def _as_prefix(key: str) -> str:
    return key if not key or key.endswith("/") else key + "/"
