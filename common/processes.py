"""The process tree under a process and what it spent, read from /proc (stage sets, benchmarks and
tests all need it)."""

from __future__ import annotations

import os
from collections.abc import Callable

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int | str) -> list[str]:
    """/proc/PID/stat after the command name (state, ppid, ...). Raises OSError when it is gone."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process. Raises OSError when it is gone."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kb(pid: int | str, field: str) -> int:
    """One figure of /proc/PID/smaps_rollup in kB ("Pss", "Private_Dirty", "Shared_Dirty"...; `pid`
    may be "self"); 0 if the kernel does not report it. Raises OSError when the process is gone."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
    return 0


def command_words(pid: int) -> list[str]:
    """The words of a process's command line (a stage forked by the zygote has set its own as one
    string: split on spaces, as ps shows it). Raises OSError when it is gone."""
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().replace(b"\0", b" ").decode(errors="replace").split()


def parent_pid(pid: int) -> int | None:
    """The parent of `pid`; None when it is gone."""
    try:
        return int(_stat_fields(pid)[1])
    except (OSError, IndexError, ValueError):
        return None


def tree_total(root: int, measure: Callable[[int], float]) -> float:
    """`measure(pid)` summed over `root` and every living process under it (one that ends meanwhile,
    raising OSError, is not counted)."""
    total = 0.0
    for pid in [root, *descendants(root)]:
        try:
            total += measure(pid)
        except OSError:
            continue
    return total


def tree_cpu_seconds(root: int) -> float:
    """CPU time of `root` and every living process under it."""
    return tree_total(root, cpu_seconds)


def descendants(root: int) -> list[int]:
    """Every living process under `root` (children, theirs, and so on; zombies left out)."""
    return descendants_of([root])


def descendants_of(roots: list[int]) -> list[int]:
    """Every living process under any of `roots`, from one pass over /proc (a pass reads every
    process's stat: under load, on a node with a hundred processes, a pass per root took 0.35 s)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(entry)
        except OSError:
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found, frontier = [], list(roots)
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found
