"""`python -m biomass.components`: every registered component with its arguments and defaults."""
from __future__ import annotations

import inspect

import biomass.components  # noqa: F401  (fills the registries)
from biomass.errors import run_cli
from biomass.registry import ALL


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="biomass components")
    for col in ("kind", "name", "arguments (defaults)", "what it is"):
        table.add_column(col, no_wrap=col in ("kind", "name"))  # names in full, even on a narrow terminal or pipe
    for kind, reg in ALL.items():
        for name in reg.names():
            params = ", ".join(
                k if p.default is inspect.Parameter.empty else f"{k}={p.default!r}"
                for k, p in reg.parameters(name).items()
            )
            table.add_row(kind, name, params, reg.describe(name))
    console = Console()
    console.print(table)
    from biomass.config.schema import WINNERS_KNOBS
    from biomass.data.augment import TRANSFORMS

    knobs = Table(title="knobs for the winning solutions' ideas (docs/COMPONENTS.md)")
    for col in ("key", "what it does", "from"):
        knobs.add_column(col, no_wrap=col == "key")
    for row in WINNERS_KNOBS:
        knobs.add_row(*row)
    for name, cls in TRANSFORMS.items():
        knobs.add_row(f"augment: {name}", (inspect.getdoc(cls) or "").splitlines()[0], "albumentations transform")
    console.print(knobs)
    return 0


if __name__ == "__main__":
    run_cli(main)
