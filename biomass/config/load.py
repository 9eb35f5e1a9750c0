"""Experiment configs: YAML files with an optional `base:`, deep-merged, dotted CLI overrides, one typed schema.

Rules (README "Configs"):
- an experiment names `base: other.yaml` and holds only what it changes; mappings merge key by key, lists and
  scalars replace; a component node (`{name: ..., **kwargs}`) whose `name` changes is replaced whole, since its
  old arguments belong to the old component;
- `a.b.c=value` on the command line, value parsed as YAML;
- path-typed keys in a file resolve relative to that file, on the command line relative to the working directory;
  `data.train_csv`, `data.test_csv` and `data.crops` are file names inside `data.root`;
- the merged result is validated against the schema (`config.schema`) before anything runs; every component node is checked
  against its registry and its builder's keyword arguments, which also fill in the defaults.
"""
from __future__ import annotations

import copy
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from biomass.config.rules import check_rules
from biomass.config.schema import ExperimentConfig, RegistryRef, plain
from biomass.errors import ConfigError, suggest
from biomass.registry import Registry
from biomass.stages import configured


# --------------------------------------------------------------------------------------------------------- loading
def load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in change.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and not _renamed_component(old, value):
            out[key] = deep_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _renamed_component(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return "name" in old and "name" in new and old["name"] != new["name"]


def load_experiment_dict(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged raw dict of an experiment file and its `base:` chain, paths resolved."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself")
    raw = load_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return resolve_paths(raw, ExperimentConfig, path.parent)
    if not isinstance(base, str):
        raise ConfigError(f"{path}: `base` must be a file name, got {base!r}")
    below = load_experiment_dict(path.parent / base, (*_seen, path))
    return deep_merge(below, resolve_paths(raw, ExperimentConfig, path.parent, below))


def nest_dotted(changes: dict[str, Any], where: str = "override") -> dict[str, Any]:
    """`{'main.loss.name': 'mse', 'seed': 1}` -> nested mappings; a dotted key that clashes with another is an error."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{where}: {key!r} is not a dotted config key (key.sub=value)")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {key!r} conflicts with another change of {part!r}")
        if isinstance(node.get(leaf), dict) and isinstance(value, dict):
            node[leaf] = deep_merge(node[leaf], value)
        else:
            node[leaf] = value
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=[1, 2]"]` -> nested mappings, values parsed as YAML."""
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            changes[key] = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            changes[key] = text
    return nest_dotted(changes)


class Experiment(typing.NamedTuple):
    config: ExperimentConfig
    path: Path | None
    overrides: tuple[str, ...]

    def from_cli(self, key: str) -> bool:
        return any(o.split("=", 1)[0] == key for o in self.overrides)


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    import biomass.components  # noqa: F401  (component nodes' path arguments resolve through their builders' hints)

    raw = load_experiment_dict(Path(path))
    raw = deep_merge(raw, resolve_paths(parse_overrides(list(overrides)), ExperimentConfig, Path.cwd(), raw))
    return Experiment(validate(raw), Path(path).resolve(), tuple(overrides))


def validate(raw: dict[str, Any]) -> ExperimentConfig:
    import biomass.components  # noqa: F401

    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, ExperimentConfig)) from None
    _check_components(cfg, ())
    _check_augmentations(cfg)
    check_rules(cfg)
    return cfg


# ------------------------------------------------------------------------------------------------ path resolution
def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional/Union/Annotated."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return [t for a in typing.get_args(annotation) for t in _unwrap(a)]
    return [annotation]


def _registry_of(field: Any) -> Registry | None:
    for meta in field.metadata:
        if isinstance(meta, RegistryRef):
            return meta.registry
    return None


def _resolve(value: Any, base: Path) -> Any:
    from biomass.weights import PACKAGED_PREFIX

    if isinstance(value, str) and value and not value.startswith(PACKAGED_PREFIX):
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())
    return value


def resolve_paths(raw: dict[str, Any], model: type[BaseModel], base: Path,
                  below: dict[str, Any] | None = None) -> dict[str, Any]:
    """Make every Path-typed value in `raw` absolute, relative to `base` (the file's folder, or the CWD).

    `below` is the config `raw` will be merged onto: it names the component of a node that changes only arguments.
    """
    below = below if isinstance(below, dict) else {}
    out = dict(raw)
    for key, value in raw.items():
        field = model.model_fields.get(key)
        if field is None or value is None:
            continue
        types = _unwrap(field.annotation)
        registry = _registry_of(field)
        under = below.get(key)
        name = value.get("name", under.get("name") if isinstance(under, dict) else None) \
            if isinstance(value, dict) else None
        if registry is not None and isinstance(name, str) and name in registry:
            hints = typing.get_type_hints(registry.get(name))
            out[key] = {
                k: _resolve(v, base) if Path in _unwrap(hints.get(k, Any)) else v for k, v in value.items()
            }
        elif Path in types:
            out[key] = _resolve(value, base)
        elif isinstance(value, dict):
            sub = next((t for t in types if isinstance(t, type) and issubclass(t, BaseModel)), None)
            if sub is not None:
                out[key] = resolve_paths(value, sub, base, under)
    return out


# ------------------------------------------------------------------------------------------------------ components
def component_model(registry: Registry, name: str) -> type[BaseModel]:
    """A pydantic model of a builder's keyword arguments (types from its hints, defaults from its signature)."""
    builder = registry.get(name)
    hints = typing.get_type_hints(builder, include_extras=True)  # keeps Annotated ranges (biomass.post)
    fields: dict[str, Any] = {}
    for key, param in registry.parameters(name).items():
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[key] = (hints.get(key, Any), default)
    return create_model(f"{registry.kind}:{name}", __config__=ConfigDict(extra="forbid"), **fields)


def validate_component(registry: Registry, node: Any, key: str) -> dict[str, Any]:
    if not isinstance(node, dict) or not isinstance(node.get("name"), str):
        raise ConfigError(f"config key {key!r}: expected a mapping with a `name` ({registry.kind} name)")
    name = node["name"]
    try:
        registry.get(name)
    except ConfigError as err:
        raise ConfigError(f"config key '{key}.name': {err}") from None
    model = component_model(registry, name)
    kwargs = {k: v for k, v in node.items() if k != "name"}
    try:
        checked = model.model_validate(kwargs)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, prefix=key, what=f"{registry.kind} {name!r}")) from None
    return {"name": name, **plain(checked.model_dump(mode="json"))}


def _check_components(model: BaseModel, prefix: tuple[str, ...]) -> None:
    for key, field in type(model).model_fields.items():
        value = getattr(model, key)
        registry = _registry_of(field)
        if registry is not None:
            setattr(model, key, validate_component(registry, value, ".".join((*prefix, key))))
        elif typing.get_origin(field.annotation) is list and isinstance(value, list):  # a list of component nodes
            (item,) = typing.get_args(field.annotation) or (None,)
            inner = next((m.registry for m in getattr(item, "__metadata__", ()) if isinstance(m, RegistryRef)), None)
            if inner is not None:
                setattr(model, key, [validate_component(inner, v, f"{'.'.join((*prefix, key))}[{i}]")
                                     for i, v in enumerate(value)])
        elif isinstance(value, BaseModel):
            _check_components(value, (*prefix, key))


def _check_augmentations(cfg: ExperimentConfig) -> None:
    from biomass.data.images import build_augment  # albumentations is heavy: import only when validating

    for stage in configured(cfg):
        stage_cfg = stage.config(cfg)
        for split in ("train", "val"):
            specs, key = getattr(stage_cfg.augment, split), f"{stage.name}.augment.{split}"
            build_augment(specs, key=key)
            _check_augment_shapes(specs, stage_cfg, key)


def _check_augment_shapes(specs: list[dict[str, Any]], stage: Any, key: str) -> None:
    """Each transform, forced to apply (p=1), on a blank image of the stage's input shape: it must run and keep the
    shape, since the images of a batch are stacked (RandomRotate90 on a non-square input, say `halves`, would turn
    some of them and crash the first training step)."""
    import numpy as np

    from biomass.data.images import build_augment

    h, w = stage.image.size
    width = 2 * w if stage.image.layout == "halves" else w
    blank = np.zeros((h, width, 3), np.uint8)
    for i, spec in enumerate(specs):
        name = spec.get("name")
        try:
            out = build_augment([{**spec, "p": 1.0}], key=f"{key}[{i}]")(image=blank)["image"]
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - the transform's own complaint about this input
            raise ConfigError(f"config key '{key}[{i}]': {name} fails on the stage's {h}x{width} input "
                              f"({' '.join(str(err).split())[:200]})") from None
        if out.shape != blank.shape:
            raise ConfigError(f"config key '{key}[{i}]': {name} turns the stage's {h}x{width} input (image.size "
                              f"{[h, w]}, layout {stage.image.layout}) into {out.shape[0]}x{out.shape[1]}; the "
                              "images of a batch must keep one shape: drop it or make the input square")


# ---------------------------------------------------------------------------------------------------------- errors
def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the schema section at `loc`."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = next((t for t in _unwrap(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)),
                       None)
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _first_leaf(value: Any) -> tuple[str, ...]:
    """For an unknown key given as a nested override (`some.unknown=1`), name the key as the user typed it."""
    if isinstance(value, dict) and len(value) == 1:
        (k, v), = value.items()
        return (str(k), *_first_leaf(v))
    return ()


def format_validation_error(err: ValidationError, model: type[BaseModel], prefix: str = "",
                            what: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        parts = [prefix] if prefix else []
        if e["type"] == "extra_forbidden":
            parent, leaf = loc[:-1], str(loc[-1])
            full = ".".join([*parts, *map(str, loc), *_first_leaf(e.get("input"))])
            hint = suggest(leaf, _fields_at(model, parent))
            scope = f" for {what}" if what else ""
            lines.append(f"unknown config key {full!r}{scope}{hint}")
        elif e["type"] == "missing":
            lines.append(f"config key {'.'.join([*parts, *map(str, loc)])!r} is required but missing")
        else:
            shown = e.get("input")
            lines.append(f"config key {'.'.join([*parts, *map(str, loc)])!r}: {e['msg']} (got {shown!r})")
    return "\n".join(lines)


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.dump(), sort_keys=False, default_flow_style=None, width=120)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{'a': {'b': 1}}` -> `{'a.b': 1}` (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out
