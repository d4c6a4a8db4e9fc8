"""Pipeline configuration: a short YAML file, one frozen dataclass per stage.

Core, not application: nothing here imports a stage. Method names and parameters are checked
against the registries the caller passes (``excise.app.pipeline.registries()``).

Method-specific parameters sit beside ``method`` in the stage's mapping
(``edit: {method: dampen, alpha: 10}``) and are checked against the method's signature, so
``--set edit.alpha=5`` works and ``--set edit.alpah=5`` fails naming the valid keys. ``edit:``
may also be a list of such mappings, a chain applied in order (``--set edit.1.lr=0.001`` sets
the second edit's parameter); ``units: all`` in an edit mapping edits every parameter.

The whole config is checked when it is loaded, before any model is built or trained: every key,
every value's type (from the dataclass fields below and from the method signatures: names,
defaults, annotations), method and suite names (with "did you mean"), the attribute names, and
suites that need a retrain oracle the config does not provide. A number YAML reads as a string
(``1e-4``: YAML 1.1 wants ``1.0e-4``) is converted when the parameter is numeric.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from excise.world import check_attributes

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A configuration problem, with the bad key or value and the valid choices."""


@dataclass(frozen=True)
class OrganismConfig:
    preset: str = "small"
    seed: int = 0
    # the planted-location organism (excise.organism.Planting): null / false (the plain one),
    # true (the preset's defaults) or a mapping of Planting's fields, e.g. {fraction: 0.02}
    planted: bool | dict | None = None


@dataclass(frozen=True)
class ModelConfig:
    """A real model instead of the organism (``excise.hf.load_model``; needs request.jsonl),
    and where either runs (``device`` / ``dtype``)."""

    name: str | None = None  # one of excise.hf.MODELS, e.g. gemma3-270m
    path: str | None = None  # or a local Hugging Face model folder
    # a target that tokenizes differently after its prompt: warn | raise | ignore
    on_split: str = "warn"
    # where the model runs (the organism too): auto (a GPU when present) | cpu | cuda | cuda:N
    # | mps; null: the CPU. dtype: auto (as loaded: float32) | float32 | bfloat16 | float16
    device: str | None = None
    dtype: str | None = None
    # shard a real model with accelerate: auto | balanced | sequential | {module: device}
    device_map: str | dict | None = None
    # run on NDIF (nnsight remote=True; excise.remote): name is then the Hugging Face repo id
    # NDIF serves, path may hold its config and tokenizer. Forward passes only: a config that
    # edits is refused (every run / verify / sweep config does - see excise.remote)
    remote: bool = False
    # a TOFU-style fine-tune of the real model (excise.finetuned.FinetuneWorld's fields, e.g.
    # {people: 12, steps: 240}; {} for the defaults): the model is fine-tuned on a fictitious
    # world, request.forget_people names its people, and the retrain oracle is the same
    # fine-tune without them. null: the model as it is (needs request.jsonl)
    finetune_world: dict | None = None


@dataclass(frozen=True)
class RequestConfig:
    forget_people: int | list[int] | None = 10  # int N (people 0..N-1), a list of indices
    forget_fraction: float | None = None  # fraction of trained people (overrides forget_people)
    split_seed: int = 0  # which people a fraction picks
    attributes: list[str] | None = None  # attribute names (excise.world.ATTRIBUTES); null: all
    jsonl: str | None = None  # a request file instead of the organism's people
    # add generated same-template facts (excise.templates: the forget prompts with retain-side
    # subjects - the request's retain subjects and built-in well-known ones - answered by the
    # unedited model) to the retain facts locate and edit keep, so the edit forgets the facts,
    # not their template; the same-template metric uses other subjects. Only requests from a
    # file with subjects have any (on the organism its retain facts already are)
    same_template_retain: bool = True


@dataclass(frozen=True)
class LocateConfig:
    method: str = "fisher"
    sites: str | list[str] | None = None
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SelectConfig:
    top: int | float | None = None  # int count, float fraction, or null (the edit method decides)
    sites: str | list[str] | None = None


@dataclass(frozen=True)
class EditConfig:
    """One edit. ``units: all`` edits every parameter without an importance (the global
    reference; the methods that take it: finetune, reinit, distill). In a config, ``edit:`` is
    one such mapping, or a list of them: a chain applied in order, each edit seeing the model
    as the ones before it left it (e.g. masked NPO, then distill)."""

    method: str = "dampen"
    units: str | None = None
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VerifyConfig:
    suite: str | list[str] = "behaviour"
    oracle: bool = True
    # how many retrain oracles (training seeds: the model's, then + 1, + 2, ...) the verdict
    # judges against (probes.verify.against_oracles: the most favourable verdict); 1 = one oracle
    oracles: int = 1
    # the verify settings (probes.VerifySettings fields, checked at load), e.g. grid: quick|full
    # (the attacks' grid of learning rates x seeds) or the verdict's tolerance
    params: dict = field(default_factory=dict)
    # keep every model's attack results in the cache (EXCISE_CACHE/verify, probes.store) and
    # read them back in later runs where weights, request, settings, torch, threads and
    # excise's code all match: the oracle and the original are attacked once per request
    reuse: bool = True


@dataclass(frozen=True)
class RunConfig:
    organism: OrganismConfig = OrganismConfig()
    model: ModelConfig = ModelConfig()
    request: RequestConfig = RequestConfig()
    locate: LocateConfig = LocateConfig()
    select: SelectConfig = SelectConfig()
    edit: EditConfig | tuple[EditConfig, ...] = EditConfig()  # a tuple: a chain, in order
    verify: VerifyConfig = VerifyConfig()
    seed: int = 0
    # torch intra-op threads for the run (None: as the process is set up - OMP_NUM_THREADS when
    # set, else torch's default). CPU results depend on the thread count: same torch version,
    # same threads, same numbers. The CLI's --threads overrides it.
    threads: int | None = None

    @property
    def edits(self) -> tuple[EditConfig, ...]:
        """The edits to apply, in order (one, unless ``edit`` is a chain)."""
        return self.edit if isinstance(self.edit, tuple) else (self.edit,)

    @property
    def chained(self) -> bool:
        """Whether ``edit`` was given as a list (a chain, saved as ``edit-<i>`` files)."""
        return isinstance(self.edit, tuple)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for stage in ("locate", "verify"):
            params = d[stage].pop("params")
            d[stage].update(params)
        edits = [_edit_dict(e) for e in self.edits]
        d["edit"] = edits if self.chained else edits[0]
        return d


def _edit_dict(e: EditConfig) -> dict:
    """An edit as a config mapping: its parameters beside ``method``, except those named like
    an EditConfig field (finetune's own ``method``: ga / gd / npo), kept under ``params``."""
    fields = {f.name for f in dataclasses.fields(EditConfig)}
    d = {"method": e.method} | ({"units": e.units} if e.units is not None else {})
    d |= {k: v for k, v in e.params.items() if k not in fields}
    clash = {k: v for k, v in e.params.items() if k in fields}
    return d | ({"params": clash} if clash else {})


_TOP = ("seed", "threads")  # top-level keys that are values, not stage sections
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
    # switching a stage's method drops the file's parameters of the old one (an edit's units
    # too: ``units: all`` is the old recipe's choice, and not every method takes it)
    for item in sets:
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        section = raw.get(parts[0])
        fields = ({f.name for f in dataclasses.fields(_STAGES[parts[0]])}
                  if parts[0] in _STAGES else set()) - {"units"}
        if (len(parts) == 2 and parts[0] in _WITH_PARAMS and parts[1] == "method"
                and isinstance(section, dict)
                and section.get("method") not in (None, parse_value(value))):
            raw[parts[0]] = {k: v for k, v in section.items() if k in fields and k != "params"}
        if (len(parts) == 3 and parts[0] == "edit" and parts[2] == "method"
                and isinstance(section, list) and parts[1].isdigit()
                and int(parts[1]) < len(section) and isinstance(section[int(parts[1])], dict)
                and section[int(parts[1])].get("method") not in (None, parse_value(value))):
            chain = list(section)  # (a chain's edit: edit.1.method=...)
            chain[int(parts[1])] = {k: v for k, v in chain[int(parts[1])].items()
                                    if k in fields and k != "params"}
            raw["edit"] = chain
    for item in sets:
        set_path(raw, item, list(_STAGES) + list(_TOP), example="edit.alpha=5",
                 leaf_only=_TOP)
    return raw


def set_path(raw: dict, item: str, top: list[str], *, example: str,
             leaf_only: tuple[str, ...] = ()) -> None:
    """Apply one ``--set key.path=value`` to ``raw`` in place: ``key``'s first part must be one
    of ``top`` (or, alone, one of ``leaf_only``); the value is parsed as a YAML scalar / list and
    intermediate mappings are copied, never shared with the caller's."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. {example}")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if parts[0] not in top and not (len(parts) == 1 and parts[0] in leaf_only):
        valid = list(top) + [k for k in leaf_only if k not in top]
        raise ConfigError(unknown_key(f"--set {key}", parts[0], valid))
    node = raw
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):  # a chain of edits: edit.1.lr=... names its second edit
            node = node[_list_index(key, node, p)]
            continue
        child = node.get(p)
        if isinstance(child, list) and i + 1 < len(parts) and parts[i + 1].isdigit():
            node[p] = [dict(c) if isinstance(c, dict) else c for c in child]
        else:
            node[p] = dict(child) if isinstance(child, dict) else {}
        node = node[p]
    if isinstance(node, list):
        node[_list_index(key, node, parts[-1])] = parse_value(value)
    else:
        node[parts[-1]] = parse_value(value)


def _list_index(key: str, items: list, part: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"--set {key}: {part!r} is not an entry of a list of {len(items)} "
                          f"(0..{len(items) - 1}); e.g. edit.1.lr=0.001 sets the second edit's "
                          f"lr")
    if not isinstance(items[int(part)], dict):
        raise ConfigError(f"--set {key}: entry {part} is not a mapping")
    return int(part)


def unknown_key(what: str, bad: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(bad), valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{what}: unknown key {bad!r}{hint} (valid: {', '.join(sorted(valid))})"


def unknown_method(what: str, bad, valid) -> str:
    close = difflib.get_close_matches(str(bad), list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{what}: unknown method {bad!r}; choose one of {sorted(valid)}{hint}"


# -- value types -------------------------------------------------------------------------------
# A parameter's type comes from its annotation (a string under ``from __future__ import
# annotations``, or a type) or, without one, from its default. Kinds: int float bool str none
# list dict, and "any" for what cannot be checked here (a Tensor, a Selection, ``Any``).
_KIND_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false",
               "str": "a string", "none": "null", "list": "a list", "dict": "a mapping"}
_PLURALS = {"int": "integers", "float": "numbers", "str": "strings"}
_LISTS = ("list", "tuple", "Sequence", "Iterable", "Collection", "set", "frozenset")
_DICTS = ("dict", "Mapping")


def _split_top(text: str, sep: str) -> list[str]:
    """``text`` split on ``sep`` outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in out + [cur]]


def _kinds_of(text: str) -> list[tuple[str, str | None]]:
    """``[(kind, element kind)]`` a type annotation's text allows."""
    out: list[tuple[str, str | None]] = []
    for part in _split_top(text.replace("typing.", "").replace("collections.abc.", ""), "|"):
        m = re.fullmatch(r"(\w+)(?:\[(.*)\])?", part)
        if not m:
            out.append(("any", None))
            continue
        head, inner = m.group(1), m.group(2)
        if head == "Optional" and inner:
            out += _kinds_of(inner) + [("none", None)]
        elif head == "Union" and inner:
            out += [k for p in _split_top(inner, ",") for k in _kinds_of(p)]
        elif head in ("None", "NoneType"):
            out.append(("none", None))
        elif head in ("int", "float", "bool", "str"):
            out.append((head, None))
        elif head in _LISTS:
            elem = _split_top(inner, ",")[0] if inner else None
            out.append(("list", elem if elem in ("int", "float", "str") else None))
        elif head in _DICTS:
            out.append(("dict", None))
        else:  # Any, Tensor, Selection, a callable ...: not checked here
            out.append(("any", None))
    return out


def param_kinds(annotation, default) -> list[tuple[str, str | None]]:
    """The kinds a parameter with this annotation and default accepts."""
    if annotation is inspect.Parameter.empty or annotation is dataclasses.MISSING:
        if isinstance(default, bool):
            return [("bool", None)]
        if isinstance(default, (int, float)):  # unannotated numbers: any number
            return [("int", None), ("float", None)]
        if isinstance(default, str):
            return [("str", None)]
        return [("any", None)]
    if isinstance(annotation, str):
        return _kinds_of(annotation)
    if isinstance(annotation, type):  # int, float, a class
        return _kinds_of(annotation.__name__)
    return _kinds_of(str(annotation))  # int | None, typing.Optional[int] ...


def _number(text: str) -> int | float | None:
    """A number written as text (``"1e-4"``, ``"5"``), or None."""
    t = text.strip().replace("_", "")
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return None


def coerce(where: str, name: str, value, kinds: list[tuple[str, str | None]],
           shown: str = "", label: str | None = None) -> Any:
    """``value`` as a parameter of these kinds takes it (a number written as text becomes a
    number, a whole float an int where only an int is valid), or a ConfigError naming the value
    and what the parameter takes. The error starts ``label=value`` (default ``where: name``)."""
    ks = {k for k, _ in kinds}

    def fail(why: str = "") -> ConfigError:
        want = " or ".join(dict.fromkeys(_KIND_NAMES[k] for k, _ in kinds if k in _KIND_NAMES))
        return ConfigError(f"{label or f'{where}: {name}'}={value!r} is "
                           f"{why or 'not ' + want}{f' ({name}: {shown})' if shown else ''}")

    if "any" in ks:
        return value
    if value is None:
        if "none" in ks:
            return None
        raise fail()
    if isinstance(value, bool):
        if "bool" in ks:
            return value
        raise fail()
    if isinstance(value, (int, float)):
        if not ks & {"int", "float"}:
            raise fail()
        if isinstance(value, float) and math.isnan(value):
            raise fail("not a number (NaN)")
        if isinstance(value, int) or "float" in ks:
            return value
        if value.is_integer():  # only an int is valid: 40.0 -> 40, 2.5 refused
            return int(value)
        raise fail()
    if isinstance(value, str):
        if "str" in ks:
            return value
        num = _number(value) if ks & {"int", "float"} else None
        if num is not None:
            return coerce(where, name, num, kinds, shown, label)
        raise fail()
    if isinstance(value, (list, tuple)):
        if "list" not in ks:
            raise fail()
        elems = {e for k, e in kinds if k == "list"}
        if None in elems:
            return value
        for v in value:
            ok = (isinstance(v, str) if "str" in elems else False) or (
                not isinstance(v, bool) and (
                    isinstance(v, int) and elems & {"int", "float"}
                    or isinstance(v, float) and "float" in elems))
            if not ok:
                raise fail(f"not a list of {' or '.join(_PLURALS[e] for e in sorted(elems))} "
                           f"(found {v!r})")
        return value
    if isinstance(value, dict):
        if "dict" in ks:
            return value
        raise fail()
    raise fail()


def _shown(annotation, default) -> str:
    if annotation is inspect.Parameter.empty or annotation is dataclasses.MISSING:
        ann = ""
    elif isinstance(annotation, str):
        ann = annotation
    else:
        ann = getattr(annotation, "__name__", None) or str(annotation)
    if default is inspect.Parameter.empty or default is dataclasses.MISSING:
        return ann
    return f"{ann}, default {default!r}" if ann else f"default {default!r}"


_RESERVED = {"model", "request", "importance", "units", "self", "progress", "cache"}
# verify settings the pipeline sets itself (``suite`` and ``oracle`` are VerifyConfig fields)
_VERIFY_RESERVED = {"suite", "label"}


def check_params(where: str, fn, params: dict, reserved=_RESERVED) -> dict:
    """``params`` checked against ``fn``'s keyword parameters: an unknown name is refused with
    "did you mean", a value of the wrong type names the value and the parameter's type.
    Returns the params with text numbers converted (``"1e-4"`` -> ``0.0001``)."""
    sig = inspect.signature(fn)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return dict(params)
    valid = {n: p for n, p in sig.parameters.items()
             if n not in reserved and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    out = {}
    for k, v in params.items():
        if k not in valid:
            raise ConfigError(unknown_key(where, k, list(valid)))
        p = valid[k]
        out[k] = coerce(where, k, v, param_kinds(p.annotation, p.default),
                        _shown(p.annotation, p.default))
    return out


# checks of the stages' own fields beyond their type: (stage, field) -> check(value) -> value
def _check_on_split(v):
    if v not in ("warn", "raise", "ignore"):
        raise ConfigError(f"model.on_split={v!r}: choose one of ['warn', 'raise', 'ignore']")
    return v


def _check_attributes(v):
    if v is None:
        return None
    try:
        return list(check_attributes(v, "request.attributes"))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_top(v):
    if v is None:
        return None
    if isinstance(v, float) and not 0 < v <= 1:
        raise ConfigError(f"select.top={v!r}: a fraction must be in (0, 1] (an integer is a "
                          f"count of units)")
    if isinstance(v, int) and v < 1:
        raise ConfigError(f"select.top={v!r}: a count must be >= 1 (a float in (0, 1] is a "
                          f"fraction of the units)")
    return v


def _check_planted(v):
    """organism.planted: None / false, true, or Planting's fields (numbers written as text
    converted; unknown keys, bad fractions, overlapping groups refused)."""
    if v is None or v is False:
        return None
    if v is True:
        return True
    from excise.organism import Planting

    fields = {f.name: f for f in dataclasses.fields(Planting)}
    out = {}
    for k, x in v.items():
        if k in fields:
            f = fields[k]
            x = coerce("organism.planted", k, x, param_kinds(f.type, f.default),
                       _shown(f.type, f.default), label=f"organism.planted.{k}")
        out[k] = x
    try:
        Planting.of(out)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"organism.planted: {e}") from None
    return out


def _check_finetune_world(v):
    """model.finetune_world: None, or FinetuneWorld's fields (unknown keys, bad values
    refused, naming the valid ones)."""
    if v is None:
        return None
    from excise.finetuned import FinetuneWorld

    try:
        return FinetuneWorld.of(v).to_dict()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.{e}" if str(e).startswith("finetune_world") else
                          f"model.finetune_world: {e}") from None


_FIELD_CHECKS = {("model", "on_split"): _check_on_split,
                 ("model", "finetune_world"): _check_finetune_world,
                 ("organism", "planted"): _check_planted,
                 ("request", "attributes"): _check_attributes,
                 ("select", "top"): _check_top,
                 ("edit", "units"): lambda v: _check_units(v)}


def _check_fields(name: str, cls, values: dict) -> dict:
    """A stage's own fields (not method parameters) checked against the dataclass's types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for k, v in values.items():
        f = fields[k]
        if k == "params":
            out[k] = v
            continue
        check = _FIELD_CHECKS.get((name, k))
        if (name, k) == ("request", "attributes"):  # "pet": say which names are valid
            v = check(v)
        out[k] = coerce(name, k, v, param_kinds(f.type, f.default), _shown(f.type, f.default),
                        label=f"{name}.{k}")
        if check is not None:
            out[k] = check(out[k])
    return out


def build(raw: dict, registries: dict[str, dict] | None = None) -> RunConfig:
    """Turn a raw mapping into a RunConfig, checking every key, every value's type, method and
    suite names - all before any model is built.

    ``registries`` (from the application layer, ``excise.app.pipeline.registries()``):
    ``locate`` / ``edit``: method name -> function (names, defaults and annotations of its
    keyword parameters); ``verify``: suite name -> suite (``requires``, ``needs``, ``check``);
    ``verify_settings``: the class of the verification settings (``probes.VerifySettings``),
    whose fields are the valid ``verify.*`` parameters."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of stages ({', '.join(_STAGES)}), "
                          f"got a {type(raw).__name__}")
    registries = registries or {}
    unknown = [k for k in raw if k not in _STAGES and k not in _TOP]
    if unknown:
        raise ConfigError(unknown_key("config", unknown[0], list(_STAGES) + list(_TOP)))
    stages = {}
    for name, cls in _STAGES.items():
        if name == "edit" and isinstance(raw.get(name), list):
            stages[name] = _edit_chain(raw[name], registries.get("edit"))
            continue
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {section!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        if name in _WITH_PARAMS:
            known = {k: v for k, v in section.items() if k in fields and k != "params"}
            params = section.get("params") or {}
            if not isinstance(params, dict):
                raise ConfigError(f"{name}.params must be a mapping of parameter names to "
                                  f"values, got {params!r}")
            params = dict(params)
            params.update({k: v for k, v in section.items() if k not in fields})
            known["params"] = params
        else:
            bad = [k for k in section if k not in fields]
            if bad:
                raise ConfigError(unknown_key(f"config section {name!r}", bad[0], sorted(fields)))
            known = dict(section)
        stages[name] = cls(**_check_fields(name, cls, known))
    for name in ("locate", "edit"):
        reg = registries.get(name)
        if reg is None or isinstance(stages[name], tuple):  # (a chain is checked already)
            continue
        stages[name] = _check_method(name, stages[name], reg)
    stages["verify"] = _check_verify(stages["verify"], stages["request"], stages["model"],
                                     registries)
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return RunConfig(**stages, seed=seed, threads=check_threads(raw.get("threads")))


def check_threads(value, where: str = "threads") -> int | None:
    """A thread count: None (as the process is set up) or an integer >= 1 (text converted)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}={value!r}: the torch threads to run at must be an integer "
                          f">= 1, or null for the process's setting (OMP_NUM_THREADS, else "
                          f"torch's default of {_default_threads()})")
    return value


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


def _check_method(where: str, cfg, reg: dict):
    """A stage's (or a chained edit's) method name and parameters checked against ``reg``."""
    if cfg.method not in reg:
        raise ConfigError(unknown_method(f"{where}.method", cfg.method, reg))
    if getattr(cfg, "units", None) == "all" and not _takes_all(reg[cfg.method]):
        takes = sorted(n for n, fn in reg.items() if _takes_all(fn))
        raise ConfigError(f"{where}: method {cfg.method!r} does not take units: all (every "
                          f"parameter); the methods that do: {takes}")
    params = check_params(f"{where}.{cfg.method}", reg[cfg.method], cfg.params)
    return dataclasses.replace(cfg, params=params)


def _takes_all(fn) -> bool:
    """Whether an edit method accepts ``units="all"`` (its ``units`` annotation names str)."""
    p = inspect.signature(fn).parameters.get("units")
    return p is not None and "str" in str(p.annotation)


def _check_units(v):
    if v not in (None, "all"):
        raise ConfigError(f"edit.units={v!r}: 'all' (every parameter, no importance) or leave "
                          f"it out (the located units)")
    return v


def _edit_section(where: str, section: dict) -> EditConfig:
    """One edit mapping: ``method``, ``units``, then the method's parameters beside them (or
    under ``params``)."""
    fields = {f.name for f in dataclasses.fields(EditConfig)}
    known = {k: v for k, v in section.items() if k in fields and k != "params"}
    params = section.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.params must be a mapping of parameter names to values, got "
                          f"{params!r}")
    params = dict(params) | {k: v for k, v in section.items() if k not in fields}
    return EditConfig(**_check_fields("edit", EditConfig, known | {"params": params}))


def _edit_chain(section: list, reg: dict | None) -> tuple[EditConfig, ...]:
    """``edit:`` as a list: a chain of edits, applied in order."""
    if not section:
        raise ConfigError("edit is an empty list; give one edit mapping (edit: {method: "
                          "dampen}) or a list of them, applied in order")
    chain = []
    for i, item in enumerate(section):
        where = f"edit[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a mapping like {{method: finetune, ...}}, got "
                              f"{item!r}")
        e = _edit_section(where, item)
        chain.append(e if reg is None else _check_method(where, e, reg))
    return tuple(chain)


def _check_verify(cfg: VerifyConfig, request: RequestConfig, model: ModelConfig,
                  registries: dict) -> VerifyConfig:
    """verify.suite names (with "did you mean"), the verify.* settings (names, types and the
    suites' own checks, e.g. attack settings), and suites that need a retrain oracle the config
    does not give (``verify.oracle: false``, or a request file / real model, which have no
    organism people to leave out)."""
    suites = registries.get("verify")
    names = [cfg.suite] if isinstance(cfg.suite, str) else list(cfg.suite)
    if not names:
        raise ConfigError("verify.suite is an empty list: name a suite, e.g. behaviour, or all")
    if suites is not None:
        valid = list(suites) + ["all"]
        for s in names:
            if s not in valid:
                close = difflib.get_close_matches(str(s), valid, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"verify.suite: unknown suite {s!r}{hint} (choose from "
                                  f"{valid})")
    settings_cls = registries.get("verify_settings")
    params = cfg.params
    if settings_cls is not None:
        params = check_params("verify", settings_cls, params, _VERIFY_RESERVED)
    if suites is None:
        return dataclasses.replace(cfg, params=params)
    want = list(suites) if "all" in names else names
    todo, run = ["behaviour", *want], []
    while todo:  # the suites asked for and their prerequisites
        s = todo.pop()
        if s in suites and s not in run:
            run.append(s)
            todo.extend(getattr(suites[s], "requires", ()))
    has_oracle = cfg.oracle and not request.jsonl and (
        not (model.name or model.path) or model.finetune_world is not None)
    n = cfg.oracles
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"verify.oracles={n!r}: must be an integer >= 1 (how many retrain "
                          f"oracles, at different training seeds, the verdict judges against)")
    if n > 1 and not (has_oracle and "verdict" in run):
        raise ConfigError(f"verify.oracles={n}: several retrain oracles serve the verdict only; "
                          f"it needs verify.oracle=true, an organism or fine-tuned-world request "
                          f"and the 'verdict' suite (verify.suite={cfg.suite!r})")
    if not has_oracle:
        why = ("verify.oracle is false" if not cfg.oracle else
               "a request file (request.jsonl) names no organism people to leave out")
        need = [s for s in suites if s in run and "oracle" in getattr(suites[s], "needs", ())]
        if need:
            raise ConfigError(f"verify.suite={cfg.suite!r} runs {need}, which need the retrain "
                              f"oracle, but {why}; drop {need} from verify.suite (e.g. "
                              f"verify.suite=behaviour) or give an organism request with "
                              f"verify.oracle=true")
    if settings_cls is not None:
        try:
            settings = settings_cls(suite=tuple(names), **params)
            for s in run:
                check = getattr(suites[s], "check", None)
                if check is not None:
                    check(settings)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"verify: {e}") from None
    return dataclasses.replace(cfg, params=params)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's contents; a missing file, a folder, a file that is not UTF-8 or malformed
    YAML is a ConfigError naming the file (and the line and column)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; expected a YAML config file (e.g. "
                          f"configs/default.yaml)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at line "
                          f"{line}); expected a YAML config file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {path}{where}: "
                          f"{getattr(e, 'problem', None) or e}") from None


def load(path: str | Path | None, sets: list[str] = (), registries=None) -> RunConfig:
    """A pipeline config from YAML (default: configs/default.yaml) with ``--set`` overrides;
    ``registries`` (stage -> method name -> function, from the application layer) checks
    method names and their parameters."""
    path = Path(path) if path else DEFAULT_CONFIG
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        kind = {list: "a list", str: "a string"}.get(type(raw), f"a {type(raw).__name__}")
        raise ConfigError(f"{path} holds {kind}, not a mapping of stages; a config looks like "
                          f"'edit: {{method: dampen, alpha: 5}}' (sections: "
                          f"{', '.join(_STAGES)}, seed, threads)")
    return build(apply_sets(raw, list(sets)), registries)
