"""`sigterm_interrupts`: the signals that end a run or a sweep as Ctrl-C does (a KeyboardInterrupt: the run is marked
killed and stays resumable), and the handlers put back after."""
from __future__ import annotations

import os
import signal
import time

import pytest

from biomass.errors import sigterm_interrupts


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_process_that_started_with_sigint_ignored_still_stops_on_it(sig):
    """A script's background job starts with SIGINT ignored (`nohup biomass.ablate ... &`); its sweep stops children
    with SIGINT, which they must hear."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigterm_interrupts():
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler raises as soon as the signal lands
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # put back
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
