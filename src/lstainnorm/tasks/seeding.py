"""Random streams of a run, each derived from ``(seed, name)``.

A run draws random numbers for several independent things: the normalisation layer's initial
weights, the network's, and whatever the training loop leaves to the global generator. If they
shared one stream, code that draws one more number anywhere before (estimating a template, building
an augmentation) would hand every later consumer other numbers: the same seed would give another
network. Each consumer here gets its own stream, seeded from the run's seed and its name only.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

__all__ = ["derive_seed", "seeded"]


def derive_seed(seed: int, name: str) -> int:
    """A 31-bit seed for the stream ``name`` of a run seeded ``seed`` (the same on every machine)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())]).generate_state(1)[0] >> 1)


@contextmanager
def seeded(seed: int, name: str) -> Iterator[None]:
    """Run the block on the CPU generator seeded by :func:`derive_seed`; the global generator's state
    outside the block is left as it was (``torch.random.fork_rng``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, name))
        yield
