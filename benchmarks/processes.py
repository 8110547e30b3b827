"""Processes of a command under test, for benchmarks/fault_injection.py: its descendants found by walking ``/proc``
(each thread's ``children`` file where the kernel has them, else every process's parent pid), recorded while it
runs, and whether they are gone after it is killed (a pid counts as alive only while its start time is unchanged and
it is not a zombie).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLP = [sys.executable, "-m", "vlp"]
GONE_WITHIN_S = 5.0  # a killed command's processes must be gone by then


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time in clock ticks) of a live pid, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), fields[0], int(fields[19])


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    files = list(tasks.glob("*/children")) if tasks.exists() else []
    if files:
        return [int(c) for f in files for c in f.read_text().split()]
    # kernels without CONFIG_PROC_CHILDREN: every process's parent pid instead
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[0] == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every process below ``pid``."""
    found, todo = {}, [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in found and (stat := _stat(child)):
                found[child] = stat[2]
                todo.append(child)
    return found


def alive(procs: dict[int, int]) -> list[int]:
    return [pid for pid, start in procs.items()
            if (stat := _stat(pid)) and stat[2] == start and stat[1] not in ("Z", "X")]


def wait_gone(procs: dict[int, int], within: float = GONE_WITHIN_S) -> tuple[list[int], float]:
    """(pids still alive after ``within`` seconds, seconds until the last one went)."""
    start = time.monotonic()
    while (left := alive(procs)) and time.monotonic() - start < within:
        time.sleep(0.05)
    return left, round(time.monotonic() - start, 2)


class Command:
    """One ``vlp`` command in a process group of its own, its output in a file."""

    def __init__(self, args: list[str], log: Path):
        self.args, self.log = args, log
        self.out = open(log, "ab")  # noqa: SIM115 - the command writes to it until wait() or cleanup() closes it
        self.start = time.monotonic()
        self.proc = subprocess.Popen(VLP + args, cwd=REPO, stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.seen: dict[int, int] = {}  # every descendant recorded so far

    def record(self) -> dict[int, int]:
        now = descendants(self.proc.pid)
        self.seen.update(now)
        return now

    def wait_until(self, ready, poll: float) -> bool:
        """Polls ``ready()`` (recording the process tree meanwhile) until it holds (True) or the process ends."""
        while self.proc.poll() is None and not ready():
            self.record()
            time.sleep(poll)
        return self.proc.poll() is None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.out.close()

    def kill(self, sig: int = signal.SIGKILL) -> dict[int, int]:
        """Signal the command's own process only (as ``kill`` or the OOM killer would); its descendants as
        recorded just before."""
        children = self.record()
        self.proc.send_signal(sig)
        return children

    def cleanup(self) -> None:
        """Ends whatever of this command's process group is left, so one failed check cannot spoil the next case."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in alive(self.seen):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait()
        if not self.out.closed:
            self.out.close()


def run(args: list[str], log: Path, timeout: float = 600) -> tuple[int, float]:
    c = Command(args, log)
    try:
        return c.wait(timeout), round(c.elapsed(), 1)
    finally:
        c.cleanup()


def tail(path: Path, lines: int = 3) -> str:
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
