"""What /proc says about a process and its group, for code that signals processes it started:
a pid is trusted only with the start time it was recorded with, so a reused pid is never
taken for the process that had it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcStat:
    state: str
    pgrp: int
    session: int
    start_ticks: int

    @property
    def running(self) -> bool:
        # Z: exited, not yet reaped (an orphan whose new parent never reaps it stays so); X: dead.
        return self.state not in ("Z", "X")


def read_stat(pid: int) -> ProcStat | None:
    """The process's state, group, session and start time; None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # Field 2 (comm) is in parentheses and may itself hold spaces or ')': split after the last.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcStat(
            state=fields[0].decode("ascii", "replace"),
            pgrp=int(fields[2]),
            session=int(fields[3]),
            start_ticks=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def start_ticks(pid: int) -> int | None:
    """When the process `pid` started (clock ticks since boot); None if it is gone."""
    stat = read_stat(pid)
    return stat.start_ticks if stat is not None else None


def group_members(leader: int, leader_start_ticks: int) -> list[int]:
    """Running processes of the group (and session) that `leader`, started at
    `leader_start_ticks`, leads: those started no earlier than it."""
    stat = read_stat(leader)
    if stat is not None and stat.start_ticks != leader_start_ticks:
        # The pid is another process's now, which the kernel allows only once the group it
        # led is empty: what looks like its group belongs to someone else.
        return []
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        member = read_stat(int(entry.name))
        if (
            member is not None
            and member.running
            and member.pgrp == leader
            and member.session == leader
            and member.start_ticks >= leader_start_ticks
        ):
            members.append(int(entry.name))
    return members
