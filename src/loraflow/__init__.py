"""loraflow: scheduled LoRA retraining of causal LMs with adapters published to object storage.

The library is plain functions (no Prefect inside); `tasks/` and `flows/` wrap it.
Heavy modules (torch, transformers, boto3) are imported lazily so `import loraflow` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_settings", "pull_adapter", "load_adapter", "follow"]


def __getattr__(name: str):
    if name == "load_settings":
        from loraflow.settings import load_settings

        return load_settings
    if name == "pull_adapter":
        from loraflow.registry.pull import pull_adapter

        return pull_adapter
    if name == "load_adapter":
        from loraflow.adapters import load_adapter

        return load_adapter
    if name == "follow":
        from loraflow.follow import follow

        return follow
    raise AttributeError(name)
