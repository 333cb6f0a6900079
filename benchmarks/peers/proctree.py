"""A server's whole process tree, from /proc: its CPU time, and stopping every process in it.

Servers are started in a session of their own with a marker in their environment. A process belongs to the
server when it is in that session, descends from the server's first process, or carries the marker: Ray's
actors are re-parented to init when their raylet goes, but keep the session and the environment, and
they are exactly the processes a plain ``kill`` of the leader leaves behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

TICKS = os.sysconf("SC_CLK_TCK")
MARKER = "OPTIC_PEER_BENCH_TAG"


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    sid: int
    name: str
    zombie: bool
    cpu_s: float  # utime + stime + cutime + cstime: the process and the children it has reaped


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:  # gone, or not ours to read
        return None
    # The name is in parentheses and may hold spaces or parentheses: split after the last ")".
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, session 6, utime..cstime 14..17.
    ppid, sid = int(fields[1]), int(fields[3])
    ticks = sum(int(v) for v in fields[11:15])
    return ProcStat(pid, ppid, sid, name, fields[0] == "Z", ticks / TICKS)


def _has_marker(pid: int, tag: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{MARKER}={tag}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def members(leader: int, tag: str) -> dict[int, ProcStat]:
    """Every live process of the server started as ``leader`` (a session leader) with marker ``tag``."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (s := read_stat(int(entry))) is not None:
            stats[s.pid] = s
    children: dict[int, list[int]] = {}
    for s in stats.values():
        children.setdefault(s.ppid, []).append(s.pid)
    found: set[int] = {p for p, s in stats.items() if s.sid == leader}
    stack = [leader]
    while stack:  # descendants, in case one started a session of its own
        pid = stack.pop()
        if pid in stats:
            found.add(pid)
        stack.extend(c for c in children.get(pid, ()) if c not in found)
    me = os.getpid()
    for pid in stats:
        if pid not in found and pid != me and _has_marker(pid, tag):
            found.add(pid)
    found.discard(me)
    return {p: stats[p] for p in found}


@dataclass(frozen=True)
class CpuSample:
    at: float  # time.monotonic()
    per_pid: dict[int, ProcStat]


def sample(leader: int, tag: str) -> CpuSample:
    return CpuSample(time.monotonic(), members(leader, tag))


def cpu_delta(before: CpuSample, after: CpuSample) -> tuple[float, dict[str, float]]:
    """CPU seconds the tree spent between two samples, and the same split by process name.

    A process alive at both contributes its difference; one started in between, all of its time; one that
    ended in between, its time until ``before`` is lost unless a parent in the tree reaped it (then it is in
    the parent's cutime/cstime, as ``after`` reads it).
    """
    total = 0.0
    by_name: dict[str, float] = {}
    for pid, a in after.per_pid.items():
        b = before.per_pid.get(pid)
        spent = max(0.0, a.cpu_s - (b.cpu_s if b is not None else 0.0))
        total += spent
        by_name[a.name] = by_name.get(a.name, 0.0) + spent
    return total, by_name


def living(leader: int, tag: str) -> dict[int, ProcStat]:
    """The server's processes that still run (zombies are dead: they wait only for their parent to reap them)."""
    return {p: s for p, s in members(leader, tag).items() if not s.zombie}


def stop(leader: int, tag: str, grace_s: float = 20.0, signum: int = signal.SIGTERM) -> list[str]:
    """Signal the leader (SIGTERM), wait for the whole tree to exit, then SIGKILL whatever is left, pid by pid.

    Returns ``"pid name"`` for any process still alive at the end (none, normally). The caller reaps the
    leader (its ``Popen``).
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(leader, signum)
    deadline = time.monotonic() + grace_s
    left = living(leader, tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = living(leader, tag)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = living(leader, tag)
    return [f"{s.pid} {s.name}" for s in left.values()]
