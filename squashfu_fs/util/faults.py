"""Fault injection for the crash-safety tests (docs/crash-safety.md, "Fault-injection checkpoints").

``SQUASHFU_FAULT=NAME`` makes the process SIGKILL its whole process group
when it reaches checkpoint NAME, exactly like a power cut or kill -9 at that
step. Unset (always, outside the tests) a checkpoint costs one dict lookup.
With ``SQUASHFU_FAULT_ACTION=stop`` the process stops itself (SIGSTOP) there
instead, so a test can change the world under it and let it go on (SIGCONT).
With ``SQUASHFU_FAULT_ACTION=hold`` only the thread that reached it waits:
it creates ``$SQUASHFU_FAULT_HOLD/reached`` and goes on once
``$SQUASHFU_FAULT_HOLD/release`` exists (a request of the mount daemon held
inside its disk I/O while the others are served).
"""

from __future__ import annotations

import os
import signal
import time

ENV_VAR = "SQUASHFU_FAULT"
HOLD_POLL = 0.01


def checkpoint(name: str) -> None:
    """Die here, with everything this process started, if the tests asked for it."""
    if os.environ.get(ENV_VAR) != name:
        return
    time.sleep(float(os.environ.get("SQUASHFU_FAULT_DELAY", "0")))
    action = os.environ.get("SQUASHFU_FAULT_ACTION")
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if action == "hold":
        _hold(os.environ["SQUASHFU_FAULT_HOLD"])
        return
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _hold(directory: str) -> None:
    """Block this thread only, until the test lets it go."""
    with open(os.path.join(directory, "reached"), "a"):
        pass
    release = os.path.join(directory, "release")
    while not os.path.exists(release):
        time.sleep(HOLD_POLL)
