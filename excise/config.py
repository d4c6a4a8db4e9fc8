"""Pipeline configuration: a short YAML file, one frozen dataclass per stage.

Core, not application: nothing here imports a stage. Method names and parameters are checked
against the registries the caller passes (``excise.app.pipeline.registries()``).

Method-specific parameters sit beside ``method`` in the stage's mapping
(``edit: {method: dampen, alpha: 10}``) and are checked against the method's signature, so
``--set edit.alpha=5`` works and ``--set edit.alpah=5`` fails naming the valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A configuration problem, with the bad key or value and the valid choices."""


@dataclass(frozen=True)
class OrganismConfig:
    preset: str = "small"
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """A real model instead of the organism (``excise.hf.load_model``); needs request.jsonl."""

    name: str | None = None  # one of excise.hf.MODELS, e.g. gemma3-270m
    path: str | None = None  # or a local Hugging Face model folder
    # a target that tokenizes differently after its prompt: warn | raise | ignore
    on_split: str = "warn"


@dataclass(frozen=True)
class RequestConfig:
    forget_people: Any = 10  # int N (people 0..N-1), a list of indices, or null
    forget_fraction: float | None = None  # fraction of trained people (overrides forget_people)
    split_seed: int = 0  # which people a fraction picks
    attributes: list | None = None
    jsonl: str | None = None  # a request file instead of the organism's people


@dataclass(frozen=True)
class LocateConfig:
    method: str = "fisher"
    sites: Any = None
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SelectConfig:
    top: Any = None  # int count, float fraction, or null (the edit method decides)
    sites: Any = None


@dataclass(frozen=True)
class EditConfig:
    method: str = "dampen"
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VerifyConfig:
    suite: Any = "behaviour"
    oracle: bool = True
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    organism: OrganismConfig = OrganismConfig()
    model: ModelConfig = ModelConfig()
    request: RequestConfig = RequestConfig()
    locate: LocateConfig = LocateConfig()
    select: SelectConfig = SelectConfig()
    edit: EditConfig = EditConfig()
    verify: VerifyConfig = VerifyConfig()
    seed: int = 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for stage in ("locate", "edit", "verify"):
            params = d[stage].pop("params")
            d[stage].update(params)
        return d


_STAGES = {"organism": OrganismConfig, "model": ModelConfig, "request": RequestConfig,
           "locate": LocateConfig, "select": SelectConfig, "edit": EditConfig,
           "verify": VerifyConfig}
_WITH_PARAMS = ("locate", "edit", "verify")


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_sets(raw: dict, sets: list[str]) -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars/lists)."""
    raw = dict(raw)
    for item in sets:  # switching a stage's method drops the file's parameters of the old one
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        section = raw.get(parts[0])
        if (len(parts) == 2 and parts[0] in _WITH_PARAMS and parts[1] == "method"
                and isinstance(section, dict)
                and section.get("method") not in (None, parse_value(value))):
            fields = {f.name for f in dataclasses.fields(_STAGES[parts[0]])}
            raw[parts[0]] = {k: v for k, v in section.items() if k in fields and k != "params"}
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. edit.alpha=5")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] not in _STAGES and not (len(parts) == 1 and parts[0] == "seed"):
            raise ConfigError(unknown_key(f"--set {key}", parts[0], list(_STAGES) + ["seed"]))
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        node[parts[-1]] = parse_value(value)
    return raw


def unknown_key(what: str, bad: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(bad, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{what}: unknown key {bad!r}{hint} (valid: {', '.join(sorted(valid))})"


def build(raw: dict, registries: dict[str, dict] | None = None) -> RunConfig:
    """Turn a raw mapping into a RunConfig, checking every key and method name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of stages, got {type(raw).__name__}")
    registries = registries or {}
    unknown = [k for k in raw if k not in _STAGES and k != "seed"]
    if unknown:
        raise ConfigError(unknown_key("config", unknown[0], list(_STAGES) + ["seed"]))
    stages = {}
    for name, cls in _STAGES.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {section!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        if name in _WITH_PARAMS:
            known = {k: v for k, v in section.items() if k in fields and k != "params"}
            params = dict(section.get("params") or {})
            params.update({k: v for k, v in section.items() if k not in fields})
            known["params"] = params
        else:
            bad = [k for k in section if k not in fields]
            if bad:
                raise ConfigError(unknown_key(f"config section {name!r}", bad[0], sorted(fields)))
            known = dict(section)
        stages[name] = cls(**known)
    for name in ("locate", "edit"):
        reg = registries.get(name)
        if reg is None:
            continue
        method = stages[name].method
        if method not in reg:
            raise ConfigError(f"{name}.method: unknown method {method!r}; choose one of "
                              f"{sorted(reg)}")
        check_params(f"{name}.{method}", reg[method], stages[name].params)
    seed = raw.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return RunConfig(**stages, seed=seed)


_RESERVED = {"model", "request", "importance", "units", "self", "progress", "cache"}


def check_params(where: str, fn, params: dict) -> None:
    sig = inspect.signature(fn)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    valid = [n for n, p in sig.parameters.items()
             if n not in _RESERVED and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for k in params:
        if k not in valid:
            raise ConfigError(unknown_key(where, k, valid))


def read_yaml(path: str | Path) -> Any:
    """A YAML file's contents; a missing file or malformed YAML is a ConfigError naming the
    file (and the line and column)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {path}{where}: "
                          f"{getattr(e, 'problem', None) or e}") from None


def load(path: str | Path | None, sets: list[str] = (), registries=None) -> RunConfig:
    """A pipeline config from YAML (default: configs/default.yaml) with ``--set`` overrides;
    ``registries`` (stage -> method name -> function, from the application layer) checks
    method names and their parameters."""
    raw = read_yaml(Path(path) if path else DEFAULT_CONFIG)
    return build(apply_sets(raw, list(sets)), registries)
