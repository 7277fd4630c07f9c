"""Real text that every machine with Python has: the source of the running
interpreter's standard library (`*.py` under `sysconfig`'s stdlib path,
site-packages and dist-packages left out), read at run time, nothing
downloaded. On Debian's Python 3.11 that is 668 files, 13 MB. Licence: the
Python Software Foundation License (Debian ships it in
`/usr/share/doc/libpython3.X-minimal/copyright`); the text is only read to
train on, never redistributed.

Tokens are bytes (0-255). The files are sorted by path; every 20th goes to
validation, the rest to training, each stream the files joined in order. A
global batch of step t is `global_batch` sequences whose starts are drawn from
`numpy.random.Generator(PCG64([seed, t]))`, so any system (the parameter server,
DDP, one process) training on the same seed sees the same sequences at every
step, and each of `world` ranks takes its contiguous share."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

VALIDATION_EVERY = 20


@dataclass
class Corpus:
    """Training and validation token streams, and where they came from."""

    train: np.ndarray
    validation: np.ndarray
    root: str
    files: List[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for a results page: source, files, sizes."""
        return (
            f"the Python standard library's source under {self.root} ({len(self.files)} files; "
            f"{len(self.train):,} training and {len(self.validation):,} validation bytes; PSF License)"
        )


def stdlib_corpus(root: Optional[str] = None, max_bytes: Optional[int] = None) -> Corpus:
    """The corpus from `root` (default: this interpreter's standard library); `max_bytes`
    keeps only the first files up to that many bytes (for tests)."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(
        str(p.relative_to(base))
        for p in base.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(base).parts) and p.is_file()
    )
    if not files:
        raise FileNotFoundError(f"no Python source under {base}")
    train, validation, total, used = [], [], 0, []
    for index, name in enumerate(files):
        data = (base / name).read_bytes()
        (validation if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train).append(data)
        used.append(name)
        total += len(data)
        if max_bytes is not None and total >= max_bytes and validation:
            break
    as_tokens = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8).copy()  # noqa: E731
    return Corpus(as_tokens(train), as_tokens(validation), str(base), used)


def global_batch(tokens: np.ndarray, step: int, sequences: int, seq_len: int, seed: int) -> np.ndarray:
    """The `sequences` windows of `seq_len + 1` tokens (inputs and next-token targets) of step
    `step`, as int64 of shape (sequences, seq_len + 1)."""
    rng = np.random.Generator(np.random.PCG64([seed, step]))
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=sequences)
    return np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)


def rank_batch(tokens: np.ndarray, step: int, sequences: int, seq_len: int, seed: int, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s contiguous share of step `step`'s global batch (`sequences` divisible by `world`)."""
    if sequences % world:
        raise ValueError(f"a global batch of {sequences} sequences does not split over {world} ranks")
    share = sequences // world
    return global_batch(tokens, step, sequences, seq_len, seed)[rank * share : (rank + 1) * share]
