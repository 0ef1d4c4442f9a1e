"""A fleet: many adapters retrained together, defined in one YAML file (docs/fleet.md).

    name: reviews                # names the fleet's concurrency limit, loraflow-fleet-reviews
    max_parallel: 2              # adapters retraining at once (that limit's value)
    defaults:                    # settings shared by every adapter: the sections of a --config file
      model: {name_or_path: s3://loraflow/models/SmolLM2-135M-Instruct}
      prefect: {train_deployment: train-adapter/train-adapter}
    adapters:
      - name: reviews-en         # registry.adapter_name
        source: s3://loraflow/datasets/reviews-en/   # data.source
        settings: {lora: {r: 8}} # on top of defaults

Each adapter's spec is the documented defaults < `defaults` < its `settings` < its `name` and
`source`, validated into one full `Settings` when the file is loaded. Like a run's spec it never
reads the environment: a fleet means the same thing on every machine that loads it (the storage
location, when the file leaves it unset, is the worker's, as for any flow run: loraflow.run_spec).
Errors name the file, the adapter and the field. The library's part only: flows/fleet.py runs it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraflow.errors import ConfigError
from loraflow.settings import RegistrySettings, Settings, _merged, format_validation_error

_NAME_PATTERN = RegistrySettings.model_fields["adapter_name"].metadata[0].pattern
# Set by an adapter's own `name` and `source`: a second place to set them would be a second way.
_RESERVED = (("registry", "adapter_name", "name"), ("data", "source", "source"))
DATA_LANDED_RESOURCE = "loraflow.data."  # + source: the resource `loraflow emit data-landed SOURCE` names


class FleetAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME_PATTERN, description="The adapter's registry name (registry.adapter_name).")
    source: str = Field(min_length=1, description="Its training data (data.source): any form data.source takes.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Setting overrides on top of the fleet's defaults.")


class FleetFile(BaseModel):
    """The file as written; `Fleet` is what it resolves to."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME_PATTERN, description="The fleet's name: its concurrency limit is loraflow-fleet-NAME.")
    max_parallel: int = Field(2, ge=1, description="Adapters of this fleet retraining at once.")
    defaults: dict[str, Any] = Field(default_factory=dict, description="Settings shared by every adapter.")
    adapters: list[FleetAdapter] = Field(min_length=1)


class Fleet:
    """A loaded, validated fleet: `specs` holds one full Settings per adapter, in file order."""

    def __init__(self, definition: FleetFile, specs: dict[str, Settings], origin: str) -> None:
        self.definition = definition
        self.specs = specs
        self.origin = origin

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def max_parallel(self) -> int:
        return self.definition.max_parallel

    @property
    def limit_name(self) -> str:
        return f"loraflow-fleet-{self.name}"

    def select(self, names: list[str] | None) -> dict[str, Settings]:
        """The specs of `names` (in file order); None or empty: every adapter. An unknown name is refused."""
        if not names:
            return dict(self.specs)
        unknown = [n for n in names if n not in self.specs]
        if unknown:
            raise ConfigError(f"fleet {self.name} ({self.origin}) has no adapter {', '.join(map(repr, unknown))}; "
                              f"it has {', '.join(self.specs)}")
        return {n: s for n, s in self.specs.items() if n in set(names)}

    def sources(self) -> list[str]:
        """Each adapter's source as written in the file, once each, in file order."""
        return list(dict.fromkeys(a.source for a in self.definition.adapters))

    def data_landed_resources(self) -> list[str]:
        """The `loraflow.data.landed` event resources that concern this fleet (a deployment trigger's match)."""
        return [DATA_LANDED_RESOURCE + source for source in self.sources()]


def _adapter_label(definition: dict[str, Any], index: int) -> str:
    try:
        name = definition["adapters"][index]["name"]
        return f"adapter {name!r}" if isinstance(name, str) else f"adapter #{index + 1}"
    except (KeyError, IndexError, TypeError):
        return f"adapter #{index + 1}"


def _file_errors(err: ValidationError, data: dict[str, Any]) -> list[str]:
    """One line per error of the file's own structure, an adapter named by its name rather than its index."""
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        where = ".".join(str(p) for p in loc) or "<root>"
        if len(loc) >= 2 and loc[0] == "adapters" and isinstance(loc[1], int):
            where = _adapter_label(data, loc[1]) + (": " + ".".join(str(p) for p in loc[2:]) if loc[2:] else "")
        lines.append(f"{where}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}")
    return lines


def _reserved_keys(overrides: dict[str, Any], where: str) -> list[str]:
    return [f"{where}: {section}.{key} is set by the adapter's `{own}`"
            for section, key, own in _RESERVED if isinstance(overrides.get(section), dict) and key in overrides[section]]


def _settings_errors(err: ValidationError, where: str) -> list[str]:
    return [f"{where}: {line.strip()}" for line in format_validation_error(err).splitlines()[1:]]


def resolve(data: Any, origin: str = "<fleet>") -> Fleet:
    """Validate a fleet definition (the parsed YAML) into a Fleet. Raises ConfigError, one line per
    problem, each naming `origin`, the adapter (or `defaults`) and the field."""
    def fail(lines: list[str]) -> ConfigError:
        return ConfigError("\n".join(f"fleet {origin}: {line}" for line in lines))

    if not isinstance(data, dict):
        raise fail(["top level must be a mapping with `name`, `defaults` and `adapters`"])
    try:
        definition = FleetFile.model_validate(data)
    except ValidationError as err:
        raise fail(_file_errors(err, data)) from None
    problems = _reserved_keys(definition.defaults, "defaults")
    try:
        Settings.model_validate(definition.defaults)
    except ValidationError as err:
        problems += _settings_errors(err, "defaults")
    if problems:
        raise fail(problems)

    seen: dict[str, int] = {}
    specs: dict[str, Settings] = {}
    for index, adapter in enumerate(definition.adapters, 1):
        where = f"adapter {adapter.name!r}"
        if adapter.name in seen:
            problems.append(f"{where}: the name is used twice (adapters #{seen[adapter.name]} and #{index})")
            continue
        seen[adapter.name] = index
        reserved = _reserved_keys(adapter.settings, where)
        if reserved:
            problems += reserved
            continue
        tree = _merged(copy.deepcopy(definition.defaults), copy.deepcopy(adapter.settings))
        tree = _merged(tree, {"registry": {"adapter_name": adapter.name}, "data": {"source": adapter.source}})
        try:
            specs[adapter.name] = Settings.model_validate(tree)
        except ValidationError as err:
            problems += _settings_errors(err, where)
    if problems:
        raise fail(problems)
    return Fleet(definition, specs, origin)


def load_fleet(path: str | Path) -> Fleet:
    """Read and validate a fleet file (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"fleet file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"fleet {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    return resolve(data, str(path))
