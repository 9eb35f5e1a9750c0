"""Experiment configs: YAML files with an optional `base:`, deep-merged, dotted CLI overrides, one typed schema.

Rules (README "Configs"):
- an experiment names `base: other.yaml` and holds only what it changes; mappings merge key by key, lists and
  scalars replace; a component node (`{name: ..., **kwargs}`) whose `name` changes is replaced whole, since its
  old arguments belong to the old component;
- `a.b.c=value` on the command line, value parsed as YAML;
- path-typed keys in a file resolve relative to that file, on the command line relative to the working directory;
  `data.train_csv`, `data.test_csv` and `data.crops` are file names inside `data.root`;
- the merged result is validated against the schema below before anything runs; every component node is checked
  against its registry and its builder's keyword arguments, which also fill in the defaults.
"""
from __future__ import annotations

import copy
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, create_model

from biomass.constants import IMAGENET_MEAN, IMAGENET_STD
from biomass.errors import ConfigError, suggest
from biomass.registry import BACKBONES, HEADS, LOSSES, POOLINGS, SCHEDULERS, SPLITTERS, Registry


class RegistryRef:
    """Marks a config field as a component node of one registry."""

    def __init__(self, registry: Registry):
        self.registry = registry


def Component(registry: Registry) -> Any:  # noqa: N802 - reads like a type in the schema
    return Annotated[dict[str, Any], RegistryRef(registry)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DemoData(Section):
    """Generate the synthetic demo dataset into `data.root` when that (config-file) root does not exist."""

    n_train: PositiveInt
    n_test: PositiveInt
    seed: int = 0
    width: PositiveInt = 2000
    height: PositiveInt = 1000


class DataConfig(Section):
    root: Path
    train_csv: str = "train.csv"
    test_csv: str = "test.csv"
    crops: str | None = None  # CSV inside root: image_path,x0,y0,x1,y1 (pixel boxes of the original image)
    check_images: Literal["decode", "header"] = "decode"
    num_workers: int = Field(2, ge=0)
    cache_dir: Path | None = None  # decoded-image cache: crop + resize once, memory-mapped uint8 (see BENCHMARKS)
    demo: DemoData | None = None


class ImageConfig(Section):
    size: tuple[PositiveInt, PositiveInt]  # (height, width) fed to the backbone
    crop: bool = False  # apply data.crops boxes before resizing
    layout: Literal["whole", "halves"] = "whole"  # halves: left and right halves as two views (dual-image input)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class AugmentConfig(Section):
    """albumentations transforms by class name, applied to the resized uint8 image: `{name: HorizontalFlip, p: .5}`.

    Resizing and normalisation are not listed: the loader always resizes to `image.size` first, and normalises with
    `image.mean/std` on the device (see docs/BENCHMARKS.md for why the order is sound).
    """

    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []


class FoldsConfig(Section):
    splitter: Component(SPLITTERS)
    train_folds: list[int] | None = None  # train only these folds (None: all)


class ModelConfig(Section):
    backbone: Component(BACKBONES)
    pooling: Component(POOLINGS)
    head: Component(HEADS)
    views_merge: Literal["concat", "mean"] = "concat"  # image.layout=halves: join the two views' features


class TargetConfig(Section):
    transform: Literal["standard", "log1p"] = "standard"  # log1p: log(1+y) then standardise
    activation: Literal["none", "scaled_sigmoid"] = "none"  # scaled_sigmoid: bounded by the training range


class OptimConfig(Section):
    lr: PositiveFloat
    weight_decay: float = Field(ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    fused: bool | None = None  # None: fused AdamW where the device supports it


class TrainConfig(Section):
    epochs: PositiveInt
    batch_size: PositiveInt  # global: split across processes
    eval_batch_size: PositiveInt | None = None  # None: 2 x batch_size
    drop_last: bool = True
    patience: PositiveInt | None = None  # early stopping, in epochs without improvement
    select_by: Literal["val_score", "val_loss"] = "val_score"  # val_score: weighted R2 (main), mean R2 (aux)
    grad_clip: PositiveFloat | None = None
    grad_accum: PositiveInt = 1


class StageConfig(Section):
    image: ImageConfig
    augment: AugmentConfig
    folds: FoldsConfig
    model: ModelConfig
    loss: Component(LOSSES)
    targets: TargetConfig = TargetConfig()
    optim: OptimConfig
    scheduler: Component(SCHEDULERS)
    train: TrainConfig
    init_from: Literal["main/fold0", "main/same_fold"] | None = None  # aux stage: start from a main checkpoint


class InferConfig(Section):
    tta: list[Literal["none", "hflip", "vflip", "hvflip"]] = ["none", "hflip", "vflip"]
    fold_weights: Literal["uniform", "cv"] | list[float] = "uniform"
    mass_balance: bool = False
    batch_size: PositiveInt = 8


class TrackingConfig(Section):
    mlflow: bool = True
    experiment: str | None = None  # MLflow experiment name; None: the config's `name`


class RuntimeConfig(Section):
    tf32: bool = True
    compile: bool = False


class ExperimentConfig(Section):
    name: str
    seed: int = 0
    data: DataConfig
    main: StageConfig
    aux: StageConfig | None = None
    infer: InferConfig = InferConfig()
    tracking: TrackingConfig = TrackingConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def dump(self) -> dict[str, Any]:
        """Plain YAML-able dict (paths as strings, tuples as lists)."""
        return _plain(self.model_dump(mode="json"))


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


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[leaf] = value
    return out


class Experiment(typing.NamedTuple):
    config: ExperimentConfig
    path: Path | None
    overrides: tuple[str, ...]

    def from_cli(self, key: str) -> bool:
        return any(o.split("=", 1)[0] == key for o in self.overrides)


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    from biomass.registry import load_components

    load_components()  # component nodes' path arguments resolve through their builders' type hints
    raw = load_experiment_dict(Path(path))
    raw = deep_merge(raw, resolve_paths(parse_overrides(list(overrides)), ExperimentConfig, Path.cwd(), raw))
    return Experiment(validate(raw), Path(path).resolve(), tuple(overrides))


def validate(raw: dict[str, Any]) -> ExperimentConfig:
    from biomass.registry import load_components

    load_components()
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, ExperimentConfig)) from None
    _check_components(cfg, ())
    _check_augmentations(cfg)
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
    if isinstance(value, str) and value:
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
    hints = typing.get_type_hints(builder)
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
    return {"name": name, **_plain(checked.model_dump(mode="json"))}


def _check_components(model: BaseModel, prefix: tuple[str, ...]) -> None:
    for key, field in type(model).model_fields.items():
        value = getattr(model, key)
        registry = _registry_of(field)
        if registry is not None:
            setattr(model, key, validate_component(registry, value, ".".join((*prefix, key))))
        elif isinstance(value, BaseModel):
            _check_components(value, (*prefix, key))


def _check_augmentations(cfg: ExperimentConfig) -> None:
    from biomass.data.images import build_augment  # albumentations is heavy: import only when validating

    for stage_name in ("main", "aux"):
        stage = getattr(cfg, stage_name)
        if stage is None:
            continue
        for split in ("train", "val"):
            build_augment(getattr(stage.augment, split), key=f"{stage_name}.augment.{split}")


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


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


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
