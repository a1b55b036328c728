"""Fault injection for the crash-safety tests (docs/crash-safety.md, "Fault-injection checkpoints").

``SQUASHFU_FAULT=NAME`` makes the process SIGKILL its whole process group
when it reaches checkpoint NAME, exactly like a power cut or kill -9 at that
step. Unset (always, outside the tests) a checkpoint costs one dict lookup.
With ``SQUASHFU_FAULT_ACTION=stop`` the process stops itself (SIGSTOP) there
instead, so a test can change the world under it and let it go on (SIGCONT).
"""

from __future__ import annotations

import os
import signal
import time

ENV_VAR = "SQUASHFU_FAULT"


def checkpoint(name: str) -> None:
    """Die here, with everything this process started, if the tests asked for it."""
    if os.environ.get(ENV_VAR) != name:
        return
    time.sleep(float(os.environ.get("SQUASHFU_FAULT_DELAY", "0")))
    if os.environ.get("SQUASHFU_FAULT_ACTION") == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    os.killpg(os.getpgrp(), signal.SIGKILL)
