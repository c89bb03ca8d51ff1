"""The process tree under a process, read from /proc (stage sets, benchmarks and tests all need it)."""

from __future__ import annotations

import os


def descendants(root: int) -> list[int]:
    """Every living process under `root` (children, theirs, and so on; zombies left out)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found, frontier = [], [root]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found
