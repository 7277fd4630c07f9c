"""Shard lists as the servers read them. No dependencies, so tools that
check configuration (deploy/k8s/check_manifests.py) load this file alone."""

from __future__ import annotations

import re
from typing import List, Sequence

_RANGE = re.compile(r"\{(\d+)\.\.(<?)(\d+)\}")


def expand_shards(entries: Sequence[str]) -> List[str]:
    """The shard list with ranges expanded as the servers expand them:
    `ps-{0..3}.ps:50051` names shards 0 to 3 (a StatefulSet's pods), and so
    does `ps-{0..<4}.ps:50051` (first..<count)."""
    shards: List[str] = []
    for entry in entries:
        found = _RANGE.search(entry)
        if found is None:
            if "{" in entry:
                raise ValueError(f"'{entry}': a shard range reads like 'ps-{{0..3}}.ps:50051' or 'ps-{{0..<4}}.ps:50051'")
            shards.append(entry)
            continue
        first, last = int(found.group(1)), int(found.group(3)) - (1 if found.group(2) else 0)
        rest = entry[found.end():]
        if first > last or last - first >= 4096 or "{" in rest or "{" in entry[: found.start()]:
            raise ValueError(
                f"'{entry}': a shard range reads like 'ps-{{0..3}}.ps:50051' (first..last, both included)"
                " or 'ps-{{0..<4}}.ps:50051' (first..<count)"
            )
        shards.extend(f"{entry[: found.start()]}{i}{rest}" for i in range(first, last + 1))
    return shards
