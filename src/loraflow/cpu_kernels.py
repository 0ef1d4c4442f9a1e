"""cpu_kernels.cpp, built once per machine with torch's C++ extension builder, and the same
functions in torch operations.

The kernels fuse training-mode dropout into the passes that use it (see the C++ file for why).
They are compiled for the processor they run on (-march=native), so the build's name carries a
digest of the source and of the CPU's feature flags: a home directory shared by machines of other
CPUs never loads a build that is not theirs. The build (~40 s, once; torch caches it under
~/.cache/torch_extensions) needs a C++ compiler and ninja. Where it cannot be built, `kernels()`
is None, `status()` says why in one line, and loraflow.dropout computes the same masks with the
torch functions below: the same numbers, bit for bit (tests/test_dropout.py), only slower.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + _cpu_flags().encode()).hexdigest()[:12]
    return f"loraflow_cpu_kernels_{digest}"


def kernels():
    """The built extension module, or None where it cannot be built (then `status()` says why)."""
    with _lock:
        if "module" not in _state:
            _state["module"], _state["error"] = _build()
        return _state["module"]


def status() -> str:
    """One line: fused CPU dropout kernels built, or why the torch fallback is in use."""
    if kernels() is not None:
        return "fused cpu dropout kernels (loraflow/cpu_kernels.cpp)"
    return f"cpu dropout in torch operations (the fused kernels could not be built: {_state['error']})"


def _build():
    import shutil

    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:
            import ninja  # the PyPI package: a declared dependency, its binary in its venv's bin/

            # torch's builder runs `ninja` from PATH; a venv's python started by its full path has
            # no venv bin/ there, and a venv that shares another's packages (a .pth line) has the
            # binary in that venv's bin/ (site-packages is <venv>/lib/pythonX.Y/site-packages).
            for where in (ninja.BIN_DIR, str(Path(ninja.__file__).resolve().parents[4] / "bin")):
                if where and Path(where, "ninja").is_file():
                    os.environ["PATH"] = where + os.pathsep + os.environ.get("PATH", "")
                    break
        module = cpp_extension.load(
            build_name(), [str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math"], verbose=False)
        return module, None
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch fallback, say why
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return None, f"{type(exc).__name__}: {first}"


# The same functions in torch operations: int64 arithmetic wraps modulo 2^64 as the C++ uint64_t
# does; a logical right shift is an arithmetic one with the sign bits masked off.
_GOLDEN, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z, n: int):
    return (z >> n) & ((1 << (64 - n)) - 1)


def keep(seed: int, index, kept: int):
    """bool tensor: element `index` (int64 tensor) kept under (seed, kept), as the kernels decide:
    its 32-bit word, the low (even index) or high (odd) half of mix(seed, index // 2), below `kept`."""
    z = ((index >> 1) + 1) * _signed(_GOLDEN) + _signed(seed % (1 << 64))
    z = (z ^ _shr(z, 30)) * _signed(_M1)
    z = (z ^ _shr(z, 27)) * _signed(_M2)
    z = z ^ _shr(z, 31)
    import torch

    return torch.where((index & 1) == 1, _shr(z, 32), z & 0xFFFFFFFF) < kept
