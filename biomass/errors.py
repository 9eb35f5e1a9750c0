"""User-facing errors and the one CLI wrapper that turns them into a single line and a non-zero exit."""
from __future__ import annotations

import contextlib
import difflib
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator


class BiomassError(Exception):
    """A problem the user can fix (bad config, bad data, bad path). Printed as one line, no traceback."""


class ConfigError(BiomassError):
    pass


class DataError(BiomassError):
    pass


def close_matches(name: str, options: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, list(options), n=n, cutoff=0.5)


def suggest(name: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' or ''."""
    matches = close_matches(name, options)
    return f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a CLI entry point: user errors print one line and exit 2; `--debug` re-raises with the traceback."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        code = main([a for a in args if a != "--debug"])
    except BiomassError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within: SIGTERM (pre-emption, `kill`) ends the work as Ctrl-C does, with a KeyboardInterrupt, so a run ends
    KILLED and resumable and a sweep stops its children and its server. So does SIGINT where the process started
    with it ignored: a shell starts a script's background jobs so (`nohup ... &`), and a sweep stops its children
    with SIGINT. The previous handlers come back after; off the main thread (where Python takes no signal handlers)
    it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    heard = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else [])
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in heard}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
