"""One small Registry type and one instance per kind of component.

A builder is a plain function (or class) registered under a short snake_case name; its keyword arguments, with type
hints and defaults, are the config node's schema: `{name: gem, p: 3.0}` calls `POOLINGS.build("gem", p=3.0, ...)`.
The registry imports no component: `biomass.components` imports every registering module (timm's layout), and
`python -m biomass.components` prints them all.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from biomass.errors import ConfigError, close_matches


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self._builders:
                raise ValueError(f"{self.kind} {key!r} is registered twice ({self._builders[key]!r} and {fn!r})")
            self._builders[key] = fn
            return fn

        return add

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._builders:
            near = close_matches(name, self._builders)
            hint = f" Did you mean {', '.join(repr(m) for m in near)}?" if near else ""
            raise ConfigError(f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(self.names())}")
        return self._builders[name]

    def build(self, name: str, *context: Any, **kwargs: Any) -> Any:
        """Call the builder: runtime context positionally (sizes, dims), config values as keywords."""
        return self.get(name)(*context, **kwargs)

    def build_node(self, node: dict[str, Any], *context: Any, **extra: Any) -> Any:
        """Build a validated config node `{name: ..., **kwargs}`: runtime context positionally, `extra` keywords
        (runtime objects that are not config, e.g. a head's target space) merged over the node's arguments."""
        kwargs = {k: v for k, v in node.items() if k != "name"}
        return self.get(node["name"])(*context, **kwargs, **extra)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """The builder's configurable keyword arguments (those a config node may set)."""
        sig = inspect.signature(self.get(name))
        return {
            k: p for k, p in sig.parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and not k.startswith("_")
        }

    def describe(self, name: str) -> str:
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""


BACKBONES = Registry("backbone")
POOLINGS = Registry("pooling")
HEADS = Registry("head")
LOSSES = Registry("loss")
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")
SPLITTERS = Registry("fold splitter")
FUSIONS = Registry("fusion")
POSTS = Registry("post-processing")

ALL: dict[str, Registry] = {r.kind: r for r in (BACKBONES, POOLINGS, FUSIONS, HEADS, LOSSES, OPTIMIZERS, SCHEDULERS,
                                                SPLITTERS, POSTS)}
