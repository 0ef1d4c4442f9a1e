"""Subprocess side of the registry fault tests (settings come from LORAFLOW_*/AWS_* variables).

    python registry_worker.py publish ADAPTER_DIR NAME COUNT   -> prints one version per line
    python registry_worker.py swap NAME ALIAS V1,V2,... START  -> CAS-moves ALIAS to each Vi in turn
                                                                   (expected = what it read), prints
                                                                   "ok PREV NEW" or "conflict"
START (epoch seconds) is a barrier so that both processes begin together, after their imports.
"""

from __future__ import annotations

import sys
import time

from loraflow.registry import AliasConflictError, get_alias, publish_adapter, set_alias
from loraflow.settings import load_settings


def main(argv: list[str]) -> int:
    settings = load_settings()
    if argv[0] == "publish":
        adapter_dir, name, count = argv[1], argv[2], int(argv[3])
        for _ in range(count):
            print(publish_adapter(settings, adapter_dir, name=name, aliases=["latest"]).version, flush=True)
    elif argv[0] == "swap":
        name, alias, targets = argv[1], argv[2], argv[3].split(",")
        get_alias(settings, name, alias)  # warm up the client before the barrier
        time.sleep(max(0.0, float(argv[4]) - time.time()))
        for target in targets:
            current = get_alias(settings, name, alias)
            try:
                set_alias(settings, name, alias, target, expected_version=current)
                print(f"ok {current} {target}", flush=True)
            except AliasConflictError:
                print("conflict", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
