"""Real text that every machine with Python has: the source of the running
interpreter's standard library (`*.py` under `sysconfig`'s stdlib path,
site-packages and dist-packages left out), read at run time, nothing
downloaded. On Debian's Python 3.11 that is 668 files, 11 MB. Licence: the
Python Software Foundation License (Debian ships it in
`/usr/share/doc/libpython3.X-minimal/copyright`); the text is only read to
train on, never redistributed. `python_corpus` adds the Python source of the
installed `torch` package (Debian's python3-torch 1.13: 1,141 files, 15 MB;
BSD-3-Clause, `/usr/share/doc/python3-torch/copyright`), 26 MB in all, for the
language-model benchmark; the tests keep to the standard library.

Tokens are bytes (0-255). The files are sorted by path; every 20th goes to
validation, the rest to training, each stream the files joined in order. A
global batch of step t is `global_batch` sequences whose starts are drawn from
`numpy.random.Generator(PCG64([seed, t]))`, so any system (the parameter server,
DDP, one process) training on the same seed sees the same sequences at every
step, and each of `world` ranks takes its contiguous share."""

from __future__ import annotations

import importlib.util
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
    # What the text is and its licence, for `describe`.
    source: str = "the Python standard library's source"
    licence: str = "PSF License"

    def describe(self) -> str:
        """One line for a results page: source, files, sizes."""
        return (
            f"{self.source} under {self.root} ({len(self.files)} files; "
            f"{len(self.train):,} training and {len(self.validation):,} validation bytes; {self.licence})"
        )


def _python_files(base: Path) -> List[Path]:
    """The `*.py` files under `base`, sorted, packages installed beneath it left out."""
    return sorted(
        p for p in base.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.relative_to(base).parts) and p.is_file()
    )


def _corpus_of(files: List[Path], max_bytes: Optional[int], root: str, source: str, licence: str) -> Corpus:
    """Every 20th file to validation, the rest to training, each stream joined in order."""
    if not files:
        raise FileNotFoundError(f"no Python source under {root}")
    train, validation, total, used = [], [], 0, []
    for index, path in enumerate(files):
        data = path.read_bytes()
        (validation if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train).append(data)
        used.append(str(path))
        total += len(data)
        if max_bytes is not None and total >= max_bytes and validation:
            break
    as_tokens = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8).copy()  # noqa: E731
    return Corpus(as_tokens(train), as_tokens(validation), root, used, source, licence)


def stdlib_corpus(root: Optional[str] = None, max_bytes: Optional[int] = None) -> Corpus:
    """The corpus from `root` (default: this interpreter's standard library); `max_bytes`
    keeps only the first files up to that many bytes (for tests)."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    return _corpus_of(_python_files(base), max_bytes, str(base), "the Python standard library's source", "PSF License")


def python_corpus(max_bytes: Optional[int] = None) -> Corpus:
    """The standard library's source followed by the installed torch package's (found
    without importing it); the standard library alone where torch is not installed."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return stdlib_corpus(max_bytes=max_bytes)
    torch_dir = Path(spec.origin).parent
    files = _python_files(stdlib) + _python_files(torch_dir)
    return _corpus_of(
        files,
        max_bytes,
        f"{stdlib} and {torch_dir}",
        "the source of the Python standard library and of PyTorch's Python package",
        "PSF License and BSD-3-Clause",
    )


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
