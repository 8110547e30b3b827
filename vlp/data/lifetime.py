"""Worker processes that end with the process that forked them, even when it is killed with ``kill -9``."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int, poll: float = 1.0) -> None:
    """Call first thing in a forked child, with its parent's pid as recorded before the fork: the child is then
    killed when the parent dies, whatever it is blocked in at that moment (a write to a full pipe that only the dead
    parent read, a join of the thread doing that write at exit). A child that checks on its parent only between
    pieces of work never gets to check.

    On Linux the kernel sends SIGKILL when the *thread* that forked the child exits, so the fork has to come from a
    thread that lives as long as the child should. Elsewhere (or where prctl is refused) a daemon thread polls the
    parent's pid every ``poll`` seconds and ends the process."""
    if sys.platform.startswith("linux"):
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
            if os.getppid() != parent_pid:  # the parent died before prctl took effect: no signal will come
                os._exit(1)
            return
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid, poll), name="die-with-parent",
                     daemon=True).start()


def _exit_when_orphaned(parent_pid: int, poll: float) -> None:
    while os.getppid() == parent_pid:  # an orphan's parent becomes init or a subreaper
        time.sleep(poll)
    os._exit(1)
