"""``lstainnorm bench speed`` and ``lstainnorm bench accuracy``: every method, same tiles, one run.

Speed: ms per tile and tiles per second for our layers (eager and compiled) and each peer
(torchstain, torch-staintools, StainTools when installed), with every ratio to LStainNorm,
plus end to end: normalisation + a ResNet-18 forward, ours inside the network against a
classical normaliser run as a separate pre-processing step.

Accuracy: the synthetic multi-centre benchmark (train on centre A, test on A-D) for every
normalisation and augmentation method, several seeds, mean and std.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .data.io import atomic_write_bytes

__all__ = ["speed_benchmark", "accuracy_benchmark", "ACCURACY_METHODS", "load_benchmark_tiles", "markdown_table"]

ACCURACY_METHODS = (
    "none", "reinhard", "macenko", "vahadane", "randstainna", "hed-jitter",
    "template", "learnable-lab", "learnable-hsv", "learnable-rgb", "learnable-hed", "lstainnorm",
)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def default_tile_folder() -> Path | None:
    env = os.environ.get("LSTAINNORM_SHARED_DATA")
    for base in ([Path(env)] if env else []) + [Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]:
        p = base / "monuseg-train" / "images"
        if p.is_dir():
            return p
    return None


def load_benchmark_tiles(n: int, size: int, folder: str | Path | None = None, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``n`` random ``size`` x ``size`` crops of the images in ``folder`` (default: the MoNuSeg
    tiles in ../shared/data when present), else synthetic tiles."""
    from .data.io import read_rgb
    from .data.tiles import find_images

    folder = Path(folder) if folder else default_tile_folder()
    if folder is not None:
        files = find_images(folder)
        rng = np.random.default_rng(seed)
        tiles = []
        per = max(1, -(-n // len(files)))
        for f in files:
            a = read_rgb(f)
            if a.shape[0] < size or a.shape[1] < size:
                continue
            for _ in range(per):
                i, j = rng.integers(0, a.shape[0] - size + 1), rng.integers(0, a.shape[1] - size + 1)
                tiles.append(a[i : i + size, j : j + size])
        if len(tiles) >= 1:
            while len(tiles) < n:
                tiles += tiles[: n - len(tiles)]
            arr = np.stack(tiles[:n])
            return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255).contiguous(), f"{n} crops of the images in {folder}"
    from .data.synthetic import SyntheticHE

    gen = SyntheticHE(size=size, seed=seed)
    x = torch.stack([torch.from_numpy(gen.render(i % gen.n_classes, i % gen.n_centres, i)[0]).permute(2, 0, 1) for i in range(n)])
    return x.float().div(255), f"{n} synthetic tiles"


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _staintools_compat() -> Any:
    """Import StainTools, patching its calls into current SPAMS builds (which need Fortran arrays)."""
    import spams  # noqa: F401

    if not getattr(spams, "_lstainnorm_patched", False):
        orig_lasso, orig_dl = spams.lasso, spams.trainDL

        def lasso(X, D=None, *a, **k):
            return orig_lasso(np.asfortranarray(X, dtype=np.float64), D=np.asfortranarray(D, dtype=np.float64), *a, **k)

        def train_dl(X, *a, **k):
            return orig_dl(np.asfortranarray(X, dtype=np.float64), *a, **k)

        spams.lasso, spams.trainDL, spams._lstainnorm_patched = lasso, train_dl, True
    import staintools

    return staintools


def torchstain_macenko_runner(x: torch.Tensor) -> Callable[[], None] | None:
    """A callable that normalises every tile of ``x`` with torchstain's Macenko (torch backend),
    fitted to the first tile, one tile at a time as its users run it; None if not installed."""
    try:
        import torchstain
    except ImportError:
        return None
    u8 = [(t * 255).round().to(torch.uint8) for t in x]
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
    u8 = [(t * 255).round().to(torch.uint8) for t in x]
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
        st = _staintools_compat()
        arr = [(t.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for t in x]
        for m in ("macenko", "vahadane"):
            nrm = st.StainNormalizer(method=m)
            nrm.fit(arr[0])
            k = min(len(arr), 16 if m == "macenko" else slow_n)
            out.append((f"StainTools {m.capitalize()}", k, lambda n=nrm, k=k: [n.transform(a) for a in arr[:k]], "per tile"))
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
    from . import LStainNorm, StainNorm

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
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
                record(name, mode, len(x), _median_ms(lambda: m(x), repeats), "batched")
    for name, k, fn, note in _peers(x, slow_n):
        if fn is None:
            record(name, "-", 0, None, note)
            continue
        say(name)
        record(name, "eager", k, _median_ms(fn, 1 if k < len(x) else repeats), note)

    ours = min(r["ms_per_tile"] for r in rows if r["method"] == "LStainNorm")
    for r in rows:
        r["x_LStainNorm"] = None if r["ms_per_tile"] is None else r["ms_per_tile"] / ours

    e2e = []
    if end_to_end:
        import timm

        net = timm.create_model("resnet18", pretrained=False, num_classes=9).eval()
        xb = x[: min(len(x), 64)]
        say("end to end")
        with torch.no_grad():
            base = _median_ms(lambda: net(xb), repeats) / len(xb)
            e2e.append({"pipeline": "ResNet-18 alone", "ms_per_tile": base})
            for mode in ("eager", "compiled") if compile else ("eager",):
                norm = LStainNorm()
                if mode == "compiled":
                    norm.enable_compile()
                e2e.append({"pipeline": f"LStainNorm inside the network ({mode})", "ms_per_tile": _median_ms(lambda: net(norm(xb)), repeats) / len(xb)})
            try:
                import torchstain

                mac = torchstain.normalizers.MacenkoNormalizer(backend="torch")
                mac.fit((xb[0] * 255).round().to(torch.uint8))

                def pre_then_net():
                    outs = []
                    for t in xb:
                        try:
                            outs.append(mac.normalize(I=(t * 255).round().to(torch.uint8), stains=False)[0].permute(2, 0, 1).float() / 255)
                        except Exception:
                            outs.append(t)
                    return net(torch.stack(outs))

                e2e.append({"pipeline": "torchstain Macenko pre-processing, then the network", "ms_per_tile": _median_ms(pre_then_net, repeats) / len(xb)})
            except ImportError:
                pass
        for r in e2e:
            r["tiles_per_s"] = 1000.0 / r["ms_per_tile"]

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


def _method_overrides(method: str, cache: Path) -> list[str]:
    if method == "none":
        return ["norm.mode=none"]
    if method in ("reinhard", "macenko", "vahadane"):
        return [f"norm.mode={method}", f"norm.cache_dir={cache / method}"]
    if method in ("randstainna", "hed-jitter"):
        return ["norm.mode=none", f"data.augment={method}"]
    if method == "template":
        return ["norm.mode=template", "norm.space=lab"]
    if method.startswith("learnable-"):
        return ["norm.mode=learnable", f"norm.space={method.split('-', 1)[1]}"]
    if method == "lstainnorm":
        return ["norm.mode=lstainnorm"]
    raise ValueError(f"unknown benchmark method {method!r}; choose from {list(ACCURACY_METHODS)}")


def accuracy_benchmark(
    out: str | Path = "bench_out/accuracy",
    methods: Sequence[str] = ACCURACY_METHODS,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 8,
    per_class: int = 200,
    backbone: str = "resnet18",
    size: int = 96,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> dict:
    """Train on centre A, test on A-D, for every method and seed; mean and std per method.

    Resumable: a (method, seed) whose result is in ``out/results.jsonl`` is not rerun.
    """
    from .config import make_config
    from .data.synthetic import write_synthetic
    from .demo import demo_config
    from .tasks.train import RUN_DIR_ENV, train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    synth = out / "synth"
    info = synth / "synthetic.json"
    if not (info.is_file() and json.loads(info.read_text()).get("per_class") == per_class and json.loads(info.read_text()).get("size") == size):
        write_synthetic(synth, centres=4, per_class=per_class, size=size, seed=0, progress=progress)
    done_path = out / "results.jsonl"
    done = [json.loads(line) for line in done_path.read_text().splitlines()] if done_path.is_file() else []
    have = {(d["method"], d["seed"], d["epochs"], d["backbone"]) for d in done}
    for method in methods:
        for seed in seeds:
            if (method, seed, epochs, backbone) in have:
                continue
            os.environ.pop(RUN_DIR_ENV, None)
            raw = demo_config()
            raw["data"]["manifest"] = str(synth / "manifest.csv")
            raw["output_path"] = str(out / "runs")
            raw["postfix"] = f"{method}_s{seed}"
            raw["seed"] = seed
            raw["trainer"]["max_epochs"] = epochs
            raw["trainer"]["progress"] = False
            raw["model"]["backbone"] = backbone
            cfg, notes = make_config(raw, _method_overrides(method, out / "cache") + list(overrides))
            if progress:
                print(f"[bench accuracy] {method} seed {seed}", flush=True)
            t = time.time()
            res = train(cfg, notes)
            rec = {
                "method": method, "seed": seed, "epochs": epochs, "backbone": backbone,
                "in_acc": res["in_centre"]["acc"], "in_f1": res["in_centre"]["f1"],
                "cross_acc": res["cross_centre"]["acc"], "cross_f1": res["cross_centre"]["f1"],
                "per_centre": {c: v["acc"] for c, v in res["test"]["per_centre"].items()},
                "fallbacks": res.get("norm_fallbacks"), "minutes": (time.time() - t) / 60, "run_dir": res["run_dir"],
            }
            done.append(rec)
            atomic_write_bytes(done_path, ("\n".join(json.dumps(d) for d in done) + "\n").encode())
    sel = [d for d in done if d["method"] in methods and d["seed"] in seeds and d["epochs"] == epochs and d["backbone"] == backbone]

    def ms(vals: list[float]) -> str:
        m = 100 * float(np.mean(vals))
        s = 100 * float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        return f"{m:.1f} ± {s:.1f}"

    rows, summary = [], {}
    for method in methods:
        rs = [d for d in sel if d["method"] == method]
        if not rs:
            continue
        summary[method] = {k: float(np.mean([d[k] for d in rs])) for k in ("in_acc", "cross_acc", "in_f1", "cross_f1")}
        summary[method]["n_seeds"] = len(rs)
        rows.append([method, ms([d["in_acc"] for d in rs]), ms([d["cross_acc"] for d in rs]), ms([d["in_f1"] for d in rs]), ms([d["cross_f1"] for d in rs]),
                     " / ".join(f"{100 * np.mean([d['per_centre'].get(c, float('nan')) for d in rs]):.1f}" for c in ("B", "C", "D")), len(rs)])
    table = markdown_table(["method", "in-centre acc (A)", "cross-centre acc (B-D)", "in-centre macro-F1", "cross-centre macro-F1", "acc B / C / D", "seeds"], rows)
    notes = []
    if "lstainnorm" in summary:
        lst = summary["lstainnorm"]["cross_acc"]
        classical = {m: summary[m]["cross_acc"] for m in ("reinhard", "macenko", "vahadane", "template") if m in summary}
        beaten = [m for m, v in classical.items() if v > lst]
        notes.append(
            "LStainNorm cross-centre vs classical methods: "
            + ("at least as good as every one" if not beaten else f"below {beaten}")
        )
        if "none" in summary:
            gain = 100 * (lst - summary["none"]["cross_acc"])
            notes.append(f"LStainNorm cross-centre vs none: {gain:+.1f} points (target >= +10)")
    text = (
        f"Synthetic multi-centre set ({size} x {size}, {per_class} tiles per class and centre); {backbone} trained {epochs} epochs on "
        f"centre A, tested on A-D; mean ± std over seeds {list(seeds)} (%).\n\n" + table + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")
    )
    result = {"summary": summary, "runs": sel, "text": text}
    atomic_write_bytes(out / "accuracy.md", (text + "\n").encode())
    atomic_write_bytes(out / "accuracy.json", json.dumps(result, indent=2).encode())
    return result


def run_speed_cli(out: str | Path, **kwargs) -> dict:
    res = speed_benchmark(**kwargs)
    out = Path(out)
    atomic_write_bytes(out / "speed.md", (res["text"] + "\n").encode())
    atomic_write_bytes(out / "speed.json", json.dumps({k: v for k, v in res.items() if k != "text"}, indent=2, default=str).encode())
    return res



SEGMENTATION_METHODS = ("none", "template", "learnable-lab", "lstainnorm", "macenko")


def segmentation_benchmark(
    config: str | Path = "configs/segment_monuseg_cpu.yaml",
    out: str | Path = "bench_out/segmentation",
    methods: Sequence[str] = SEGMENTATION_METHODS,
    seeds: Sequence[int] = (0, 1, 2),
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> dict:
    """Nuclei segmentation on held-out hospitals for every method and seed (resumable).

    Reports Dice, IoU, AJI and PQ on the test split (mean over test images, then mean ± std
    over seeds), overall and per held-out hospital.
    """
    from .config import load_config
    from .tasks.train import RUN_DIR_ENV, train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "results.jsonl"
    done = [json.loads(line) for line in done_path.read_text().splitlines()] if done_path.is_file() else []
    key = lambda d: (d["method"], d["seed"], d["config"], tuple(d.get("overrides", [])))  # noqa: E731
    have = {key(d) for d in done}
    for method in methods:
        for seed in seeds:
            rec_key = (method, seed, str(config), tuple(overrides))
            if rec_key in have:
                continue
            os.environ.pop(RUN_DIR_ENV, None)
            ov = _method_overrides(method, out / "cache") + [f"seed={seed}", f"output_path={out / 'runs'}", f"postfix=seg_{method}_s{seed}", "trainer.progress=false"] + list(overrides)
            cfg, notes = load_config(config, ov)
            if progress:
                print(f"[bench segmentation] {method} seed {seed}", flush=True)
            t = time.time()
            res = train(cfg, notes)
            test = res["test"]
            rec = {
                "method": method, "seed": seed, "config": str(config), "overrides": list(overrides),
                **{k: test["overall"][k] for k in ("dice", "iou", "aji", "pq")},
                "per_centre": {c: {k: v[k] for k in ("dice", "aji", "pq")} for c, v in test["per_centre"].items()},
                "minutes": (time.time() - t) / 60, "run_dir": res["run_dir"], "best_epoch": res.get("best_epoch"),
            }
            done.append(rec)
            atomic_write_bytes(done_path, ("\n".join(json.dumps(d) for d in done) + "\n").encode())
    sel = [d for d in done if d["method"] in methods and d["seed"] in seeds and d["config"] == str(config) and d.get("overrides", []) == list(overrides)]

    def ms(vals: list[float]) -> str:
        return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.3f}"

    rows, summary = [], {}
    centres = sorted({c for d in sel for c in d["per_centre"]})
    for method in methods:
        rs = [d for d in sel if d["method"] == method]
        if not rs:
            continue
        summary[method] = {k: float(np.mean([d[k] for d in rs])) for k in ("dice", "iou", "aji", "pq")}
        rows.append([method] + [ms([d[k] for d in rs]) for k in ("dice", "iou", "aji", "pq")] + [len(rs), f"{np.mean([d['minutes'] for d in rs]):.0f}"])
    table = markdown_table(["method", "Dice", "IoU", "AJI", "PQ", "seeds", "min / run"], rows)
    per = markdown_table(
        ["method"] + centres,
        [[m] + [f"{np.mean([d['per_centre'][c]['dice'] for d in sel if d['method'] == m and c in d['per_centre']]):.3f}" for c in centres] for m in methods if any(d["method"] == m for d in sel)],
    )
    text = (
        f"Config `{config}`{' with ' + ' '.join(overrides) if overrides else ''}; test = held-out hospitals; mean over test images, "
        f"then mean ± std over seeds {list(seeds)}.\n\n{table}\n\nDice per held-out hospital (mean over seeds):\n\n{per}"
    )
    result = {"summary": summary, "runs": sel, "text": text}
    atomic_write_bytes(out / "segmentation.md", (text + "\n").encode())
    atomic_write_bytes(out / "segmentation.json", json.dumps(result, indent=2).encode())
    return result
