"""``lstainnorm bench speed``: every method on the same tiles, one run.

ms per tile and tiles per second for our layers (eager and compiled) and each peer
(torchstain, torch-staintools, StainTools when installed), with every ratio to LStainNorm,
plus end to end: normalisation + a ResNet-18 forward, ours inside the network against a
classical normaliser run as a separate pre-processing step.
"""

from __future__ import annotations

import json
import platform
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from lstainnorm.data.io import find_images, image_to_tensor, read_rgb, tensor_to_image
from lstainnorm.data.synthetic import SyntheticHE
from lstainnorm.files import atomic_write_bytes
from lstainnorm.layers.fusion import LStainNorm
from lstainnorm.layers.norm import StainNorm
from lstainnorm.experiments.runner import markdown_table, median_ms

__all__ = ["speed_benchmark", "run_speed_cli", "load_benchmark_tiles", "torchstain_macenko_runner"]

# Where benchmark tiles come from when no folder is given: the MoNuSeg images of ../shared/data.
SHARED_DATA_ENV = "LSTAINNORM_SHARED_DATA"


def load_benchmark_tiles(n: int, size: int, folder: str | Path | None = None, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``n`` random ``size`` x ``size`` crops of the images in ``folder`` (default: the MoNuSeg
    images under ``$LSTAINNORM_SHARED_DATA`` when set), else synthetic tiles."""
    import os

    if folder is None and os.environ.get(SHARED_DATA_ENV):
        folder = Path(os.environ[SHARED_DATA_ENV]) / "monuseg-train" / "images"
    if folder is not None and Path(folder).is_dir():
        rng = np.random.default_rng(seed)
        files = find_images(folder)
        per = max(1, -(-n // len(files)))
        tiles = []
        for f in files:
            a = read_rgb(f)
            if a.shape[0] < size or a.shape[1] < size:
                continue
            for _ in range(per):
                i, j = rng.integers(0, a.shape[0] - size + 1), rng.integers(0, a.shape[1] - size + 1)
                tiles.append(a[i : i + size, j : j + size])
        if tiles:
            while len(tiles) < n:
                tiles += tiles[: n - len(tiles)]
            return image_to_tensor(np.stack(tiles[:n])).contiguous(), f"{n} crops of the images in {folder}"
    gen = SyntheticHE(size=size, seed=seed)
    x = image_to_tensor(np.stack([gen.render(i % gen.n_classes, i % gen.n_centres, i)[0] for i in range(n)]))
    return x, f"{n} synthetic tiles"


def _to_uint8(t: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) float tile as the uint8 tensor the torch peers take."""
    return (t * 255).round().to(torch.uint8)


@contextmanager
def _staintools() -> Iterator[Any]:
    """StainTools, with its SPAMS calls given the Fortran-ordered float64 arrays that current SPAMS
    builds require, for the duration of the block only (the original functions are restored)."""
    import spams
    import staintools

    orig_lasso, orig_dl = spams.lasso, spams.trainDL

    def lasso(X, D=None, *a, **k):
        return orig_lasso(np.asfortranarray(X, dtype=np.float64), D=np.asfortranarray(D, dtype=np.float64), *a, **k)

    def train_dl(X, *a, **k):
        return orig_dl(np.asfortranarray(X, dtype=np.float64), *a, **k)

    spams.lasso, spams.trainDL = lasso, train_dl
    try:
        yield staintools
    finally:
        spams.lasso, spams.trainDL = orig_lasso, orig_dl


def torchstain_macenko_runner(x: torch.Tensor) -> Callable[[], None] | None:
    """A callable that normalises every tile of ``x`` with torchstain's Macenko (torch backend),
    fitted to the first tile, one tile at a time as its users run it; None if not installed."""
    try:
        import torchstain
    except ImportError:
        return None
    u8 = [_to_uint8(t) for t in x]
    mac = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    mac.fit(u8[0])

    def run() -> None:
        for t in u8:
            try:
                mac.normalize(I=t, stains=False)
            except Exception:  # torchstain raises on tiles without enough tissue
                pass

    return run


def _peers(x: torch.Tensor, slow_n: int) -> list[tuple[str, int, Callable[[], Any] | None, str]]:
    """(name, tiles timed, callable, note) for every peer normaliser that is installed."""
    out: list = []
    target = x[0]
    u8 = [_to_uint8(t) for t in x]
    try:
        import torchstain

        rein = torchstain.normalizers.ReinhardNormalizer(backend="torch")
        rein.fit(u8[0])
        out.append(("torchstain Macenko", len(u8), torchstain_macenko_runner(x), "per tile"))
        out.append(("torchstain Reinhard", len(u8), lambda: [rein.normalize(I=t) for t in u8], "per tile"))
    except ImportError:
        out.append(("torchstain", 0, None, "not installed"))
    try:
        from torch_staintools.normalizer import NormalizerBuilder
        import logging

        logging.getLogger("torch_staintools").setLevel(logging.ERROR)
        for m in ("reinhard", "macenko", "vahadane"):
            nrm = NormalizerBuilder.build(m, concentration_solver="qr", luminosity_threshold=0.8, rng=0)
            nrm.fit(target.unsqueeze(0))
            if m == "reinhard":
                out.append((f"torch-staintools {m.capitalize()}", len(x), lambda n=nrm: n.transform(x), "batched"))
            else:
                k = len(x) if m == "macenko" else min(slow_n, len(x))
                out.append((f"torch-staintools {m.capitalize()}", k, lambda n=nrm, k=k: [n.transform(x[i : i + 1]) for i in range(k)], "per tile"))
    except ImportError:
        out.append(("torch-staintools", 0, None, "not installed"))
    try:
        arr = list(tensor_to_image(x))

        def transform_all(nrm: Any, k: int) -> None:
            with _staintools():
                for a in arr[:k]:
                    nrm.transform(a)

        for m in ("macenko", "vahadane"):
            with _staintools() as st:
                nrm = st.StainNormalizer(method=m)
                nrm.fit(arr[0])
            k = min(len(arr), 16 if m == "macenko" else slow_n)
            out.append((f"StainTools {m.capitalize()}", k, lambda n=nrm, k=k: transform_all(n, k), "per tile"))
    except Exception as err:  # not installed, or its SPAMS dependency broken
        out.append(("StainTools", 0, None, f"unavailable ({type(err).__name__})"))
    return out


def speed_benchmark(
    n: int = 64,
    size: int = 224,
    threads: int = 2,
    repeats: int = 3,
    compile: bool = True,
    tiles: str | Path | None = None,
    slow_n: int = 8,
    end_to_end: bool = True,
    progress: bool = True,
) -> dict:
    """Time every method on the same tiles; returns rows, ratios and the text table."""
    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the peers' deprecation warnings would drown the progress lines
        return _speed_benchmark(n, size, threads, repeats, compile, tiles, slow_n, end_to_end, progress)


def _speed_benchmark(
    n: int, size: int, threads: int, repeats: int, compile: bool, tiles: str | Path | None, slow_n: int, end_to_end: bool, progress: bool
) -> dict:
    x, source = load_benchmark_tiles(n, size, tiles)
    rows: list[dict] = []

    def say(msg: str) -> None:
        if progress:
            print(f"[bench speed] {msg}", flush=True)

    def record(name: str, mode: str, k: int, ms_total: float | None, note: str = "") -> None:
        per = None if ms_total is None else ms_total / k
        rows.append({"method": name, "mode": mode, "tiles": k, "ms_per_tile": per, "tiles_per_s": None if per is None else 1000.0 / per, "note": note})

    layers = [(f"StainNorm({s})", lambda s=s: StainNorm(s)) for s in ("lab", "hsv", "rgb", "hed")] + [("LStainNorm", LStainNorm)]
    for name, make in layers:
        for mode in ("eager", "compiled") if compile else ("eager",):
            m = make()
            if mode == "compiled":
                m.enable_compile()
            say(f"{name} [{mode}]")
            with torch.no_grad():
                record(name, mode, len(x), median_ms(lambda: m(x), repeats), "batched")
    for name, k, fn, note in _peers(x, slow_n):
        if fn is None:
            record(name, "-", 0, None, note)
            continue
        say(name)
        record(name, "eager", k, median_ms(fn, 1 if k < len(x) else repeats), note)

    ours = min(r["ms_per_tile"] for r in rows if r["method"] == "LStainNorm")
    for r in rows:
        r["x_LStainNorm"] = None if r["ms_per_tile"] is None else r["ms_per_tile"] / ours

    e2e = _end_to_end(x[: min(len(x), 64)], repeats, compile, say) if end_to_end else []

    def ratio(name: str) -> float | None:
        vals = [r["ms_per_tile"] for r in rows if r["method"] == name and r["ms_per_tile"] is not None]
        return min(vals) / ours if vals else None

    checks = []
    v = ratio("StainTools Vahadane")
    checks.append(["StainTools Vahadane / LStainNorm", v, ">= 100", None if v is None else v >= 100])
    v = ratio("torchstain Macenko")
    checks.append(["LStainNorm / torchstain Macenko", None if v is None else 1.0 / v, "<= 1.0", None if v is None else 1.0 / v <= 1.0])
    text = (
        f"{source}, {size} x {size}; {platform.machine()}, torch {torch.__version__}, {threads} threads; median of {repeats} runs "
        f"(slow per-tile methods: {slow_n} tiles, one run).\n\n"
        + markdown_table(
            ["method", "mode", "ms / tile", "tiles / s", "x LStainNorm", "note"],
            [[r["method"], r["mode"], r["ms_per_tile"], r["tiles_per_s"], r["x_LStainNorm"], r["note"]] for r in rows],
        )
        + "\n\nx LStainNorm: the method's time per tile divided by LStainNorm's best (compiled when available).\n"
    )
    if e2e:
        text += "\nEnd to end, batch of 64 (normalisation + ResNet-18 forward, no grad):\n\n" + markdown_table(
            ["pipeline", "ms / tile", "tiles / s"], [[r["pipeline"], r["ms_per_tile"], r["tiles_per_s"]] for r in e2e]
        )
    text += "\n\n" + markdown_table(["target", "value", "wanted", "met"], [[c[0], c[1], c[2], "-" if c[3] is None else ("yes" if c[3] else "NO")] for c in checks])
    return {"rows": rows, "end_to_end": e2e, "checks": checks, "source": source, "text": text}


def _end_to_end(xb: torch.Tensor, repeats: int, compile: bool, say: Callable[[str], None]) -> list[dict]:
    """Normalisation + a ResNet-18 forward: ours inside the network, Macenko as pre-processing."""
    import timm

    net = timm.create_model("resnet18", pretrained=False, num_classes=9).eval()
    say("end to end")
    e2e = []
    with torch.no_grad():
        e2e.append({"pipeline": "ResNet-18 alone", "ms_per_tile": median_ms(lambda: net(xb), repeats) / len(xb)})
        for mode in ("eager", "compiled") if compile else ("eager",):
            norm = LStainNorm()
            if mode == "compiled":
                norm.enable_compile()
            e2e.append({"pipeline": f"LStainNorm inside the network ({mode})", "ms_per_tile": median_ms(lambda: net(norm(xb)), repeats) / len(xb)})
        try:
            import torchstain
        except ImportError:
            torchstain = None
        if torchstain is not None:
            mac = torchstain.normalizers.MacenkoNormalizer(backend="torch")
            mac.fit(_to_uint8(xb[0]))

            def pre_then_net():
                outs = []
                for t in xb:
                    try:
                        outs.append(mac.normalize(I=_to_uint8(t), stains=False)[0].permute(2, 0, 1).float() / 255)
                    except Exception:  # torchstain raises on tiles without enough tissue
                        outs.append(t)
                return net(torch.stack(outs))

            e2e.append({"pipeline": "torchstain Macenko pre-processing, then the network", "ms_per_tile": median_ms(pre_then_net, repeats) / len(xb)})
    for r in e2e:
        r["tiles_per_s"] = 1000.0 / r["ms_per_tile"]
    return e2e


def run_speed_cli(out: str | Path, **kwargs) -> dict:
    res = speed_benchmark(**kwargs)
    out = Path(out)
    atomic_write_bytes(out / "speed.md", (res["text"] + "\n").encode())
    atomic_write_bytes(out / "speed.json", json.dumps({k: v for k, v in res.items() if k != "text"}, indent=2, default=str).encode())
    return res



