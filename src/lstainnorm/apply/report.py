"""``lstainnorm report RUN_DIR``: an HTML page that shows what the layer learned.

Sections: the run; initial vs learned template per colour space (numbers, bars, colour
swatches); the template's trajectory over epochs; the space-wise fusion weights; per-pixel
fusion maps and before/after images of sample tiles; loss and metric curves. Figures are
PNG files beside ``index.html``; the page has no other dependencies.
"""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

import numpy as np
import torch

from ..data.tiles import ImageFiles
from ..layers.color import get_space
from ..files import atomic_write_bytes
from ..runs import find_checkpoint, load_norm, run_dir_of

__all__ = ["write_report"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _swatch(space_name: str, mu: list[float], sigma: list[float], size: int = 48) -> np.ndarray:
    """A swatch of the template: the mean colour in the middle, +-1 std of the first channel
    (L*, hue, R, H) left and right, converted back to RGB."""
    sp = get_space(space_name)
    cols = []
    for k in (-1.0, 0.0, 1.0):
        v = torch.tensor(mu, dtype=torch.float32).clone()
        v[0] += k * sigma[0]
        cols.append(sp.from_space(v.view(1, 3, 1, 1)).abs().clamp(0, 1).view(3))
    strip = torch.stack(cols, dim=1)  # (3, 3)
    img = strip.repeat_interleave(size, dim=1).unsqueeze(1).expand(3, size, 3 * size)
    return img.permute(1, 2, 0).numpy()


def _read_history(run: Path) -> list[dict]:
    p = run / "history.csv"
    if not p.is_file():
        return []
    with open(p, newline="") as fh:
        return list(csv.DictReader(fh))


def _read_trajectory(run: Path) -> list[dict]:
    p = run / "template_history.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _folder_tiles(images: str | Path, n: int, size: int | None) -> tuple[torch.Tensor | None, str]:
    """Up to ``n`` images of a folder, cropped to one square size of at most 224."""
    files = ImageFiles(images, size=size)
    tiles = [t for t in (files[i] for i in range(min(n, len(files)))) if t is not None]
    if not tiles:
        return None, f"no readable images in {images}"
    s = min(224, *(min(t.shape[-2:]) for t in tiles))
    return torch.stack([t[:, :s, :s] for t in tiles]), f"{len(tiles)} images from {images}"


class _Figures:
    """Saves matplotlib figures as PNG files beside the page."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.plt = _plt()

    def save(self, fig, name: str) -> str:
        fig.savefig(self.out / name, dpi=110, bbox_inches="tight")
        self.plt.close(fig)
        return name


def _run_section(run: Path, cfg, metrics: dict) -> str:
    test = metrics.get("test", {}).get("overall", {})
    keys = [k for k in ("acc", "bal_acc", "f1", "auroc", "dice", "iou", "aji", "pq") if k in test]
    rows = "".join(f"<tr><td>{k}</td><td>{test[k]:.4f}</td></tr>" for k in keys if isinstance(test.get(k), (int, float)))
    per_c = metrics.get("test", {}).get("per_centre", {})
    pc_rows = "".join(
        f"<tr><td>{html.escape(str(c))}</td>" + "".join(f"<td>{v.get(k, float('nan')):.4f}</td>" for k in keys[:2]) + f"<td>{v.get('n')}</td></tr>"
        for c, v in per_c.items()
    )
    return (
        f"<h2>Run</h2><p><code>{html.escape(str(run))}</code> &middot; task <b>{cfg.task}</b> &middot; normalisation "
        f"<b>{cfg.norm.mode}</b>{' (' + ', '.join(cfg.norm.spaces) + ')' if cfg.norm.mode == 'lstainnorm' else ''} &middot; network "
        f"<b>{html.escape(cfg.model.backbone)}</b> &middot; best epoch {metrics.get('best_epoch')}</p>"
        + (f"<table><tr><th>test metric</th><th>value</th></tr>{rows}</table>" if rows else "")
        + (f"<table><tr><th>centre</th>{''.join(f'<th>{k}</th>' for k in keys[:2])}<th>n</th></tr>{pc_rows}</table>" if pc_rows else "")
    )


def _template_sections(norm, traj: list[dict], figs: _Figures) -> list[str]:
    plt = figs.plt
    sections = []
    init = traj[0]
    learned = norm.template()
    spaces = list(learned.stats)
    table = ["<table><tr><th>space</th><th>channel</th><th>initial mean</th><th>learned mean</th><th>initial std</th><th>learned std</th><th>units</th></tr>"]
    nat = learned.natural()
    for s in spaces:
        d0, d1 = init["natural"][s], nat[s]
        for c in range(3):
            table.append(
                f"<tr><td>{s}</td><td>{d1['channels'][c]}</td><td>{d0['mu'][c]:.3f}</td><td>{d1['mu'][c]:.3f}</td>"
                f"<td>{d0['sigma'][c]:.3f}</td><td>{d1['sigma'][c]:.3f}</td><td>{d1['units'][c]}</td></tr>"
            )
    table.append("</table>")
    # One panel per channel: channels of a space have different units and ranges.
    fig, axes = plt.subplots(len(spaces), 3, figsize=(8.4, 2.0 * len(spaces)), squeeze=False)
    for i, s in enumerate(spaces):
        d0, d1 = init["natural"][s], nat[s]
        for c in range(3):
            ax = axes[i][c]
            ax.bar([0, 1], [d0["mu"][c], d1["mu"][c]], yerr=[d0["sigma"][c], d1["sigma"][c]], capsize=3, color=["#9aa6b2", "#8e44ad"], width=0.6)
            ax.set_xticks([0, 1], ["initial", "learned"])
            ax.set_title(f"{s} {d1['channels'][c]} ({d1['units'][c]})", fontsize=9)
            ax.axhline(0, color="k", lw=0.5)
    fig.suptitle("template mean ± std per channel", fontsize=10)
    fig.tight_layout()
    bars = figs.save(fig, "template_bars.png")
    fig, axes = plt.subplots(2, len(spaces), figsize=(2.6 * len(spaces), 2.4), squeeze=False)
    for j, s in enumerate(spaces):
        axes[0][j].imshow(_swatch(s, init["internal"][s]["mu"], init["internal"][s]["sigma"]))
        axes[1][j].imshow(_swatch(s, learned.stats[s][0], learned.stats[s][1]))
        axes[0][j].set_title(s)
        for i in range(2):
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
        axes[0][0].set_ylabel("initial")
        axes[1][0].set_ylabel("learned")
    sw = figs.save(fig, "template_swatches.png")
    sections.append(
        "<h2>Initial and learned template</h2><p>Per colour space, the template the layer normalises every image to "
        "(natural units: L*a*b*; HSV hue in degrees; RGB 0-255; HED optical density).</p>"
        + "".join(table)
        + f'<img src="{bars}" alt="template bars"><p>Swatches: the template\'s mean colour (centre) and &plusmn;1 std '
        f'of its first channel, converted back to RGB.</p><img src="{sw}" alt="template swatches">'
    )
    # trajectory
    epochs = [t["epoch"] for t in traj]
    fig, axes = plt.subplots(1, len(spaces), figsize=(4.2 * len(spaces), 3.0), squeeze=False)
    for ax, s in zip(axes[0], spaces):
        for c in range(3):
            base = traj[0]["natural"][s]["mu"][c]
            ax.plot(epochs, [t["natural"][s]["mu"][c] - base for t in traj], marker=".", label=traj[0]["natural"][s]["channels"][c])
        ax.set_title(f"{s}: mean - initial")
        ax.set_xlabel("epoch (-1 = initial)")
        ax.legend(fontsize=8)
    tr = figs.save(fig, "template_trajectory.png")
    sections.append(f'<h2>Template over training</h2><p>Change of each template mean from its initial value, per epoch.</p><img src="{tr}" alt="trajectory">')
    if learned.fusion:
        names = list(learned.fusion)
        fig, ax = plt.subplots(figsize=(4.5, 3.0))
        xs = np.arange(len(names))
        ax.bar(xs - 0.2, [learned.fusion[s]["a"] for s in names], 0.38, label="a (scale)")
        ax.bar(xs + 0.2, [learned.fusion[s]["b"] for s in names], 0.38, label="b (offset)")
        ax.axhline(1.0, color="k", lw=0.6, ls="--")
        ax.set_xticks(xs, names)
        ax.set_title("space-wise fusion weights (init 1)")
        ax.legend(fontsize=8)
        fw = figs.save(fig, "fusion_weights.png")
        rows = "".join(
            f"<tr><td>{s}</td><td>{f['a']:.4f}</td><td>{f['b']:.4f}</td><td>{', '.join(f'{d:.3f}' for d in f['delta'])}</td></tr>" for s, f in learned.fusion.items()
        )
        sections.append(
            "<h2>Fusion weights</h2><p><code>w_s = a_s * Wn_s + b_s</code>; <code>delta_s</code> scales the attention map per channel.</p>"
            f"<table><tr><th>space</th><th>a</th><th>b</th><th>delta (R, G, B)</th></tr>{rows}</table><img src=\"{fw}\" alt=\"fusion weights\">"
        )
    return sections


def _tiles_section(norm, tiles: torch.Tensor | None, source: str, figs: _Figures) -> str:
    plt = figs.plt
    if tiles is not None:
        with torch.no_grad():
            normed = norm(tiles).float().clamp(0, 1)
        rows_n = 2
        maps = norm.fusion_maps(tiles) if hasattr(norm, "fusion_maps") else None
        if maps:
            rows_n += len(maps)
        fig, axes = plt.subplots(rows_n, len(tiles), figsize=(1.9 * len(tiles), 1.95 * rows_n), squeeze=False)
        for j in range(len(tiles)):
            axes[0][j].imshow(tiles[j].permute(1, 2, 0).numpy())
            axes[1][j].imshow(normed[j].permute(1, 2, 0).numpy())
            if maps:
                for i, (s, m) in enumerate(maps.items()):
                    row = m.mean(1)  # (B, H, W): weight of space s per pixel
                    lo, hi = float(row.min()), float(row.max())
                    axes[2 + i][j].imshow(row[j].numpy(), cmap="magma", vmin=lo, vmax=max(hi, lo + 1e-3))
            for i in range(rows_n):
                axes[i][j].set_xticks([])
                axes[i][j].set_yticks([])
        axes[0][0].set_ylabel("input")
        axes[1][0].set_ylabel("normalised")
        if maps:
            for i, (s, m) in enumerate(maps.items()):
                row = m.mean(1)
                axes[2 + i][0].set_ylabel(f"{s} weight\n{float(row.min()):.2f}-{float(row.max()):.2f}\nmean {float(row.mean()):.2f}", fontsize=8)
        st = figs.save(fig, "sample_tiles.png")
        return (
            f"<h2>Sample tiles</h2><p>{html.escape(source)}: input, normalised output"
            + (", and the per-pixel weight of each colour space in the fused image (mean over R, G, B; each row has its own colour scale, from its minimum to its maximum, given on the left)" if maps else "")
            + f'.</p><img src="{st}" alt="sample tiles">'
        )
    return f"<h2>Sample tiles</h2><p>{html.escape(source)}</p>"


def _curves_section(history: list[dict], figs: _Figures) -> str:
    plt = figs.plt
    if history:
        ep = [int(r["epoch"]) for r in history]
        metric_keys = [k for k in ("val/acc", "val/bal_acc", "val/f1", "val/auroc", "val/dice", "val/iou") if any(r.get(k) for r in history)]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for k in ("train/loss", "val/loss"):
            vals = [float(r[k]) if r.get(k) else np.nan for r in history]
            axes[0].plot(ep, vals, marker=".", label=k)
        axes[0].set_title("loss")
        axes[0].set_xlabel("epoch")
        axes[0].legend(fontsize=8)
        for k in metric_keys:
            axes[1].plot(ep, [float(r[k]) if r.get(k) else np.nan for r in history], marker=".", label=k)
        axes[1].set_title("validation metrics")
        axes[1].set_xlabel("epoch")
        axes[1].legend(fontsize=8)
        cv = figs.save(fig, "curves.png")
        return f'<h2>Training curves</h2><img src="{cv}" alt="curves">'
    return ""


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    images: str | Path | None = None,
    n_tiles: int = 6,
    tiles: torch.Tensor | None = None,
) -> Path:
    """Write ``out/index.html`` (default ``RUN_DIR/report/``) and its figures; returns the page's path.

    Sample tiles: ``tiles`` (a batch, e.g. the run's validation tiles, as ``lstainnorm report``
    passes), else the first ``n_tiles`` images of the folder ``images``; without either the
    page has no sample section.
    """
    run = Path(run_dir)
    ckpt = find_checkpoint(run)
    run = run_dir_of(ckpt)
    out = Path(out) if out else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    trained = load_norm(ckpt)
    cfg, norm = trained.config, trained.norm
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    figs = _Figures(out)
    traj = _read_trajectory(run)
    sections = [_run_section(run, cfg, metrics)]
    if hasattr(norm, "template") and traj:
        sections += _template_sections(norm, traj, figs)
    else:
        sections.append(f"<h2>Template</h2><p>The normalisation '{cfg.norm.mode}' has no learnable template.</p>")
    if tiles is not None:
        source = f"{len(tiles)} validation/test tiles of the run, one centre after another"
    elif images is not None:
        tiles, source = _folder_tiles(images, n_tiles, cfg.data.image_size or None)
    else:
        source = "no sample tiles (pass --images DIR)"
    sections.append(_tiles_section(norm, tiles, source, figs))
    sections.append(_curves_section(_read_history(run), figs))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>lstainnorm report</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
        "th{background:#f3f0f7}img{max-width:100%;display:block;margin:.6em 0}h2{border-bottom:2px solid #8e44ad;padding-bottom:.2em}"
        "code{background:#f5f5f5;padding:0 .2em}</style></head><body>"
        f"<h1>What the layer learned</h1>{''.join(sections)}"
        "<p style='color:#777;font-size:.85em'>Written by <code>lstainnorm report</code>.</p></body></html>"
    )
    return atomic_write_bytes(out / "index.html", page.encode())
