"""Ablation files: read one, resolve every variant to a validated config, refuse changes outside its knobs.

An ablation file (ablations/*.yaml) names a base experiment, the config prefixes its variants may change (`knobs`)
and the variants, each a mapping of dotted config keys to values:

    name: losses
    claim: pure MSE, quantile, log and direct-R2 losses did not beat weighted SmoothL1
    base: ../experiments/gold.yaml     # relative to this file; --base replaces it
    knobs: [main.loss]
    claim_direction: not_better        # optional: not_better (default) | better | worse | none, or one per variant
    margin: 0.0                        # optional: practical-equivalence margin on Δ weighted R²
    variants:
      mse: {main.loss: {name: mse}}

Every variant is merged onto the base with the config's own rules (biomass.config.load: a component whose `name`
changes is replaced whole), validated, and compared with the base key by key. The unchanged base runs as
`baseline`.

`claim_direction` says what the claim predicts for Δ = variant − baseline (biomass.ablate.stats.verdict judges it
from the bootstrap CI): `not_better` (the graveyard: the variant does not beat the baseline), `better` or `worse`,
or `none` (the variant is shown for its numbers and judges no claim); one value for every variant, or a mapping
variant -> value.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biomass.config.load import (deep_merge, flatten, load_experiment_dict, load_yaml, nest_dotted, parse_overrides,
                                 resolve_paths, validate)
from biomass.ablate.stats import CLAIMS
from biomass.config.schema import ExperimentConfig
from biomass.errors import ConfigError, suggest

BASELINE = "baseline"
ABLATION_KEYS = ("name", "claim", "claim_direction", "margin", "base", "knobs", "variants")
DEFAULT_DIRECTION = "not_better"  # the graveyard's claim: the variant does not beat the baseline
ORACLE = "cv/weighted_r2"
DEPLOYABLE = "cv/weighted_r2_deployable"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # safe in a folder name and an MLflow metric name


class _Absent:
    """A key one side of a comparison does not have."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


# ------------------------------------------------------------------------------------------------------ resolution
@dataclass
class Variant:
    name: str
    config: ExperimentConfig
    changes: dict[str, tuple[Any, Any]]  # flattened key -> (base value, variant value); ABSENT where missing


@dataclass
class Ablation:
    path: Path
    name: str
    claim: str | None
    base: Path
    knobs: list[str]
    overrides: list[str]
    variants: list[Variant]  # the baseline first
    directions: dict[str, str] = field(default_factory=dict)  # variant -> claim direction (not the baseline)
    margin: float = 0.0

    def direction(self, variant: str) -> str:
        return self.directions.get(variant, DEFAULT_DIRECTION)

    @property
    def baseline(self) -> Variant:
        return self.variants[0]


def in_knobs(key: str, knobs: list[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in knobs)


def config_changes(base: dict[str, Any], other: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The flattened keys whose values differ between two dumped configs (a key only one side has included)."""
    a, b = flatten(base), flatten(other)
    return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, ABSENT) != b.get(k, ABSENT)}


def load_ablation(path: str | Path, base: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
                  ) -> Ablation:
    """Read an ablation file and resolve every variant to a validated config; refuse changes outside the knobs.

    `base` (relative to the working directory) replaces the file's own `base:`; `overrides` (`key=value`, paths
    relative to the working directory) apply to the baseline and every variant, under the variants' own changes.
    """
    path = Path(path)
    raw = load_yaml(path)
    where = str(path)
    for key in raw:
        if key not in ABLATION_KEYS:
            raise ConfigError(f"{where}: unknown ablation key {key!r}{suggest(str(key), ABLATION_KEYS)}; "
                              f"an ablation has {', '.join(ABLATION_KEYS)}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: `name` must be letters, digits, '_', '-' or '.', got {name!r}")
    claim = raw.get("claim")
    if claim is not None and not isinstance(claim, str):
        raise ConfigError(f"{where}: `claim` must be text, got {claim!r}")
    margin = raw.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ConfigError(f"{where}: `margin` must be a number in [0, 1) (a Δ of weighted R²), got {margin!r}")
    knobs = raw.get("knobs")
    if isinstance(knobs, str):
        knobs = [knobs]
    if not isinstance(knobs, list) or not knobs or not all(
            isinstance(k, str) and k and all(k.split(".")) for k in knobs):
        raise ConfigError(f"{where}: `knobs` must be a non-empty list of dotted config keys, got {knobs!r}")
    variants = raw.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{where}: `variants` must be a non-empty mapping of variant names to changes")
    if base is not None:
        base_path = Path(base).resolve()
    else:
        if not isinstance(raw.get("base"), str):
            raise ConfigError(f"{where}: `base` (the experiment the variants change) is missing; add it or pass --base")
        base_path = (path.parent / raw["base"]).resolve()

    base_raw = load_experiment_dict(base_path)
    # parent and children share one MLflow experiment, named after the ablation (an override may still rename it)
    base_raw = deep_merge(base_raw, {"tracking": {"experiment": name}})
    base_raw = deep_merge(base_raw, resolve_paths(parse_overrides(list(overrides)), ExperimentConfig, Path.cwd(),
                                                  base_raw))
    try:
        base_cfg = validate(base_raw)
    except ConfigError as err:
        raise ConfigError(f"{where}: the base {base_path}: {err}") from None
    base_dump = base_cfg.dump()
    resolved = [Variant(BASELINE, base_cfg, {})]
    for vname, vchanges in variants.items():
        if not isinstance(vname, str) or not _NAME.match(vname):
            raise ConfigError(f"{where}: variant name {vname!r} must be letters, digits, '_', '-' or '.'")
        if vname == BASELINE:
            raise ConfigError(f"{where}: {BASELINE!r} is the unchanged base and runs anyway; rename that variant")
        if not isinstance(vchanges, dict) or not vchanges:
            raise ConfigError(f"{path}: variant {vname!r} must be a non-empty mapping of config keys to values, "
                              f"got {vchanges!r}")
        nested = resolve_paths(nest_dotted(vchanges, f"{path}: variant {vname!r}"), ExperimentConfig,
                               path.parent.resolve(), base_raw)
        try:
            cfg = validate(deep_merge(base_raw, nested))
        except ConfigError as err:
            raise ConfigError(f"{where}: variant {vname!r}: {err}") from None
        changes = config_changes(base_dump, cfg.dump())
        outside = [k for k in changes if not in_knobs(k, knobs)]
        if outside:
            shown = ", ".join(f"{k!r} ({_show(changes[k][0])} -> {_show(changes[k][1])})" for k in outside[:3])
            more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
            raise ConfigError(f"{where}: variant {vname!r} changes {shown}{more} outside its knobs "
                              f"({', '.join(knobs)}); declare the key as a knob or drop the change")
        resolved.append(Variant(vname, cfg, changes))

    known = set(flatten(base_dump)).union(*(flatten(v.config.dump()) for v in resolved))
    for knob in knobs:
        if not any(in_knobs(k, [knob]) for k in known):
            leaves = sorted({k.rsplit(".", 1)[0] for k in known} | known)
            raise ConfigError(f"{where}: knob {knob!r} matches no config key{suggest(knob, leaves)}")
    directions = _directions(raw.get("claim_direction", DEFAULT_DIRECTION), [v.name for v in resolved[1:]], where)
    return Ablation(path.resolve(), name, claim, base_path, list(knobs), list(overrides), resolved, directions,
                    float(margin))


def _directions(value: Any, variants: list[str], where: str) -> dict[str, str]:
    """`claim_direction`: one direction for every variant, or a mapping variant -> direction (others: the default)."""
    def check(d: Any, what: str) -> str:
        if d not in CLAIMS:
            raise ConfigError(f"{where}: {what} must be one of {', '.join(CLAIMS)}, got {d!r}"
                              f"{suggest(str(d), CLAIMS)}")
        return d

    if isinstance(value, dict):
        for key in value:
            if key not in variants:
                raise ConfigError(f"{where}: claim_direction names {key!r}, which is not a variant"
                                  f"{suggest(str(key), variants)}")
        return {v: check(value.get(v, DEFAULT_DIRECTION), f"claim_direction of {v!r}") for v in variants}
    direction = check(value, "`claim_direction`")
    return {v: direction for v in variants}


# ------------------------------------------------------------------------------------------------------- display
def _show(value: Any) -> str:
    if value is ABSENT:
        return "(absent)"
    if isinstance(value, dict):
        return "{...}" if value else "{}"
    return json.dumps(value) if isinstance(value, (str, list, bool)) or value is None else str(value)


def shown_changes(changes: dict[str, tuple[Any, Any]]) -> list[tuple[str, str, str]]:
    """Changes as (key, before, after) text, a whole section added or removed shown once (`aux: {...} -> null`)."""
    out = []
    for key, (before, after) in changes.items():
        parts = key.split(".")
        if any(".".join(parts[:i]) in changes for i in range(1, len(parts))):
            continue  # inside a section that is replaced as a whole, already shown
        below = [k for k in changes if k.startswith(key + ".")]
        out.append((key, "{...}" if before is ABSENT and below else _show(before),
                    "{...}" if after is ABSENT and below else _show(after)))
    return out


def describe(ablation: Ablation, seeds: int = 1) -> str:
    lines = [f"ablation {ablation.name} ({ablation.path}): base {ablation.base}; knobs {', '.join(ablation.knobs)}"]
    if ablation.claim:
        lines.append(f"  claim: {ablation.claim}")
    directions = sorted(set(ablation.directions.values()))
    if directions:
        each = (directions[0] if len(directions) == 1 else
                ", ".join(f"{v} {d}" for v, d in ablation.directions.items()))
        lines.append(f"  claim direction (Δ = variant − baseline): {each}"
                     + (f", margin {ablation.margin:g}" if ablation.margin else ""))
    if ablation.overrides:
        lines.append(f"  every run: {' '.join(ablation.overrides)}")
    lines.append(f"  {BASELINE}: the base, unchanged")
    for v in ablation.variants[1:]:
        lines.append(f"  {v.name}:")
        if not v.changes:
            lines.append("    (no change: identical to the baseline)")
        for key, before, after in shown_changes(v.changes):
            lines.append(f"    {key}: {before} -> {after}")
    n = len(ablation.variants)
    per_seed = f"{n - 1} variant{'s' if n > 2 else ''} + {BASELINE}"
    lines.append(f"  {n * seeds} runs ({per_seed}{f', x {seeds} seeds' if seeds > 1 else ''})")
    return "\n".join(lines)
