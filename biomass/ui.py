"""The console: rich progress bars and the resolved-config tree; silent where nobody watches (not a terminal, CI)."""
from __future__ import annotations

import datetime as dt
import os
import sys
import time
from typing import Any


def progress_enabled() -> bool:
    return sys.stdout.isatty() and not os.environ.get("CI")


def elapsed(start: float) -> str:
    return str(dt.timedelta(seconds=round(time.time() - start)))


class Progress:
    """rich progress bars for stage/fold, epoch and batch; silent when not a terminal or under CI."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), transient=False)

    def __enter__(self):
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)

    def task(self, description: str, total: int):
        if not self.enabled:
            return None
        return self.bar.add_task(description, total=total)

    def advance(self, task) -> None:
        if self.enabled and task is not None:
            self.bar.advance(task)

    def reset(self, task, description: str, total: int) -> None:
        if self.enabled and task is not None:
            self.bar.reset(task, total=total, description=description)


def print_config_tree(console, cfg) -> None:
    from rich.tree import Tree

    def add(node, value: Any) -> None:
        for k, v in value.items():
            if isinstance(v, dict):
                add(node.add(f"[bold]{k}"), v)
            else:
                node.add(f"{k}: {v}")

    tree = Tree(f"[bold]{cfg.name}")
    add(tree, cfg.dump())
    console.print(tree)
