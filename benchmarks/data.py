"""Deterministic offline text for the convergence benchmark (no downloads).

The default corpus is the Python standard library's own text: the language-reference prose of
``pydoc_data.topics`` (sorted by topic) followed by stdlib ``.py`` sources (sorted paths, tests and
site-packages left out) up to a byte budget. It is identical for the same Python version on every
machine; its SHA-256 is recorded with the results. ``--corpus PATH`` uses any text file instead.
Tokens are UTF-8 bytes (vocabulary 256). The last ``val_fraction`` of the bytes is the validation split.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_SOURCE_BYTES = 1_500_000


def default_corpus(source_bytes: int = DEFAULT_SOURCE_BYTES) -> bytes:
    """``pydoc_data.topics`` prose plus stdlib sources (at most ``source_bytes`` of them), as bytes."""
    from pydoc_data.topics import topics

    parts = [topics[k].encode("utf-8") for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    budget = source_bytes
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if budget <= 0:
            break
        if "site-packages" in rel or "/test" in f"/{rel}" or "tests" in rel or "idle_test" in rel:
            continue
        try:
            text = path.read_bytes()
        except OSError:
            continue
        parts.append(text[:budget])
        budget -= len(text[:budget])
    return b"\n".join(parts)


@dataclass
class Corpus:
    """Train / validation byte tensors and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    sha256: str
    n_bytes: int

    def batch(self, split: str, step: int, batch_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
        """Batch ``step`` of a split: windows at offsets drawn from a generator seeded by (seed, step).

        The same (seed, step) gives the same batch for every optimizer, on every device.
        """
        data = self.train if split == "train" else self.val
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 2 + (split != "train"))
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
        idx = starts.unsqueeze(1) + torch.arange(seq_len + 1).unsqueeze(0)
        chunk = data[idx].long()
        return chunk[:, :-1], chunk[:, 1:]


def load_corpus(path: str | Path | None = None, val_fraction: float = 0.1,
                source_bytes: int = DEFAULT_SOURCE_BYTES) -> Corpus:
    """The corpus at ``path`` (any text file, read as bytes) or the default stdlib corpus."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"Invalid val_fraction: {val_fraction!r} (expected 0 < val_fraction < 1)")
    raw = Path(path).read_bytes() if path is not None else default_corpus(source_bytes)
    if len(raw) < 4096:
        raise ValueError(f"Invalid corpus: {len(raw)} bytes is too small (need at least 4096)")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    cut = int(len(raw) * (1.0 - val_fraction))
    return Corpus(train=data[:cut].clone(), val=data[cut:].clone(),
                  source=str(path) if path is not None else f"stdlib(pydoc_data.topics + {source_bytes} B of .py)",
                  sha256=hashlib.sha256(raw).hexdigest(), n_bytes=len(raw))
