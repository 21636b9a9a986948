"""A character-level corpus that ships with every Python installation: the standard library's own source files.

Deterministic for a given Python installation: the top-level ``*.py`` files of the standard library, sorted by
name, read as UTF-8 and joined with a newline until ``max_chars`` characters. Characters are token ids over a
fixed vocabulary (independent of the files): ``VOCABULARY[0]`` stands for every character outside it (tabs,
non-ASCII), then newline and the printable ASCII characters. The first ``1 - val_fraction`` of the tokens are
the training split, the rest validation. Batches are ``(x, y)`` of shape ``(N, T)``: ``T`` consecutive tokens
from random offsets and the same window shifted by one (next-character targets).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from hbpc.data.errors import DatasetMissing

UNKNOWN = "\x00"
VOCABULARY = UNKNOWN + "\n" + "".join(chr(code) for code in range(32, 127))
_INDEX = {char: index for index, char in enumerate(VOCABULARY)}


class TextCorpus(NamedTuple):
    """Token ids (int64, 1-D) of the training and validation splits, and the files they came from."""

    train: Tensor
    val: Tensor
    files: tuple


def encode(text: str) -> Tensor:
    """Token ids of ``text`` (int64, shape ``(len(text),)``); characters outside ``VOCABULARY`` become 0."""
    return torch.tensor([_INDEX.get(char, 0) for char in text], dtype=torch.int64)


def decode(ids) -> str:
    """The text of token ids (``UNKNOWN`` for id 0)."""
    return "".join(VOCABULARY[int(i)] for i in ids)


def stdlib_files(root=None) -> list[Path]:
    """The top-level ``*.py`` files of the standard library (or of ``root``), sorted by name."""
    folder = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    files = sorted(folder.glob("*.py"), key=lambda path: path.name)
    if not files:
        raise DatasetMissing(f"no *.py files in {folder}; pass root= a folder of Python sources")
    return files


def load_stdlib_text(max_chars: int = 1_000_000, val_fraction: float = 0.1, root=None) -> TextCorpus:
    """The corpus: at most ``max_chars`` characters of the standard library's sources, split train / validation."""
    if max_chars < 2:
        raise ValueError(f"max_chars={max_chars} must be at least 2")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
    parts, size, used = [], 0, []
    for path in stdlib_files(root):
        text = path.read_text(encoding="utf-8", errors="replace") + "\n"
        parts.append(text[:max_chars - size])
        used.append(path.name)
        size += len(parts[-1])
        if size >= max_chars:
            break
    tokens = encode("".join(parts))
    cut = int(round(len(tokens) * (1 - val_fraction)))
    return TextCorpus(tokens[:cut], tokens[cut:], tuple(used))


def token_batches(tokens: Tensor, batch_size: int, block_size: int, steps: int,
                  generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """``steps`` batches ``(x, y)`` of shape ``(batch_size, block_size)``: windows at random offsets
    (``torch.randint`` with ``generator``) and the next characters."""
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size={batch_size} and block_size={block_size} must be at least 1")
    if len(tokens) <= block_size:
        raise ValueError(f"{len(tokens)} tokens are too few for windows of {block_size} + 1")
    offsets = torch.arange(block_size + 1)
    for _ in range(steps):
        starts = torch.randint(len(tokens) - block_size, (batch_size, 1), generator=generator)
        window = tokens[starts + offsets]
        yield window[:, :-1], window[:, 1:]
