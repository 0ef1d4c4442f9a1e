"""What makes a directory a working LoRA adapter, checked before it is published or staged: a
config a server can read, and a safetensors weights file (not a renamed pickle) whose tensors are
all finite. A NaN or inf in a LoRA matrix turns every logit it touches into NaN; the service's
canary would catch it, but only after the version was published and `latest` had moved to it.

Reads the safetensors format directly (8-byte header length, JSON header, raw little-endian data)
with numpy on a memory map: no torch, every float dtype (bf16 and fp8 included, which numpy
cannot represent, are checked through their exponent bits): 2 s for a 670 MB adapter on 2 cores.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from loraflow.errors import ConfigError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_MAX_HEADER = 100 * 1024 * 1024  # as the safetensors library
_CHUNK = 1 << 24

# dtype -> (numpy dtype of the raw words, mask): a float is NaN or inf exactly when the masked bits
# are all ones: the exponent bits, or for E4M3 (no inf) exponent and mantissa, its only NaN.
_FLOATS = {
    "F64": ("<u8", 0x7FF0000000000000),
    "F32": ("<u4", 0x7F800000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F8_E5M2": ("u1", 0x7C),
    "F8_E4M3": ("u1", 0x7F),
}
_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E5M2": 1, "F8_E4M3": 1, "I64": 8, "I32": 4, "I16": 2,
          "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header (tensor name -> dtype, shape, data_offsets) and where the data starts."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 2 <= size <= _MAX_HEADER:
                raise ValueError("no safetensors header")
            header = json.loads(fh.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + size


def check_weights(path: str | Path) -> None:
    """Refuse, in one line naming the tensor, a safetensors file that is malformed (a header that
    does not describe the data) or holds a NaN or inf in any floating-point tensor."""
    import numpy as np

    path = Path(path)
    header, start = read_header(path)
    length = path.stat().st_size - start
    if not header:
        raise ConfigError(f"{path}: holds no tensors")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(length,)) if length else None
    for name in sorted(header):
        info = header[name]
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for dim in shape:
                count *= int(dim)
            valid = (dtype in _SIZES and type(begin) is int and type(end) is int and 0 <= begin <= end <= length
                     and end - begin == count * _SIZES[dtype])
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise ConfigError(f"{path}: not a valid safetensors file (tensor {name!r} does not match its data)")
        if dtype not in _FLOATS or begin == end:
            continue
        word, mask = _FLOATS[dtype]
        words = data[begin:end].view(np.dtype(word))
        mask = np.array(mask, dtype=words.dtype)
        count_bad = 0
        for at in range(0, words.size, _CHUNK):  # bounded temporaries for a large tensor
            count_bad += int(np.count_nonzero((words[at:at + _CHUNK] & mask) == mask))
        if count_bad:
            raise ConfigError(f"{path}: tensor {name} holds {count_bad} non-finite value(s) (NaN or inf) "
                              f"of {words.size}; not a working adapter, refusing it")


def check_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable adapter config ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    for key in ("base_model_name_or_path", "r"):
        if not config.get(key):
            # vLLM's LoRA resolver and LoRAX read both; an adapter without them cannot be served.
            raise ConfigError(f"{path}: adapter config lacks {key!r}")
    return config


def check_adapter_dir(adapter_dir: str | Path) -> dict:
    """Everything a PEFT adapter directory needs before it leaves this machine (publish, and the
    training flow's staging): a readable config naming its base model and rank, and finite
    safetensors weights. Returns the adapter config."""
    adapter_dir = Path(adapter_dir)
    for name in (CONFIG, WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise ConfigError(f"{adapter_dir}: no {name}; not a PEFT adapter directory")
    config = check_config(adapter_dir / CONFIG)
    check_weights(adapter_dir / WEIGHTS)
    return config
