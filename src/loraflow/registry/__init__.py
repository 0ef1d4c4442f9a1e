"""The adapter registry on S3-compatible storage: immutable checksummed versions, aliases moved by
compare-and-swap, and a verified pull client for downstream services.

Modules: layout (keys and names), manifest, publish, aliases (CAS), history (alias moves), catalog
(read / promote / rollback), pull, gc. Every transfer goes through loraflow.storage. Importing this
package is cheap (boto3 loads when a function needs it), and nothing here imports torch,
transformers, peft or Prefect: loading an adapter onto a model is loraflow.adapters.
"""

from __future__ import annotations

from loraflow.registry.aliases import ANY, AliasConflictError
from loraflow.registry.catalog import (
    alias_history,
    get_alias,
    list_versions,
    read_manifest,
    rollback_alias,
    set_alias,
)
from loraflow.registry.gc import GcReport, gc_adapter
from loraflow.registry.publish import PublishedVersion, publish_adapter
from loraflow.registry.pull import pull_adapter

__all__ = [
    "ANY", "AliasConflictError", "GcReport", "PublishedVersion", "alias_history", "gc_adapter", "get_alias",
    "list_versions", "publish_adapter", "pull_adapter", "read_manifest", "rollback_alias",
    "set_alias",
]
