"""Shared fixtures: small deterministic images, the optional real data in ../shared/data."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

# The data-set benchmarks live beside the package (benchmarks/suites), not in it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Training runs compile the layer by default (norm.compile=auto); tests train for a few steps on
# tiny images, where a compilation would cost more than it saves. test_compile.py checks auto.
os.environ.setdefault("LSTAINNORM_COMPILE", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LSTAINNORM_SHARED_DATA", REPO.parent / "shared" / "data"))


def he_like(b: int = 2, h: int = 32, w: int = 32, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Pink/purple H&E-like colours with texture, values well inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([0.80, 0.55, 0.75]).view(1, 3, 1, 1)
    purple = torch.tensor([0.45, 0.30, 0.60]).view(1, 3, 1, 1)
    mix = torch.rand(b, 1, h, w, generator=g)
    noise = 0.05 * torch.rand(b, 3, h, w, generator=g)
    x = base * (1 - mix) + purple * mix + noise
    return x.clamp(0.02, 0.98).to(dtype)


@pytest.fixture
def he_batch() -> torch.Tensor:
    return he_like()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is missing (the ../shared folder beside the repo)")
    return SHARED_DATA


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def killed_writer_temp(folder: Path, name: str) -> Path:
    """A half-written ``folder/name`` as a writer killed mid-write leaves it (the process exits
    inside ``atomic_path``, nothing cleans up); returns the temporary file it left."""
    code = ("import os, sys; from lstainnorm.files import atomic_path; cm = atomic_path(sys.argv[1]); "
            "cm.__enter__().write_bytes(b'half'); os._exit(9)")
    subprocess.run([sys.executable, "-c", code, str(Path(folder) / name)], check=False)
    (left,) = [p for p in Path(folder).iterdir() if p.name.startswith(".tmp-")]
    return left
