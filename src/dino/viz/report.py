"""A run's report: one HTML page with the training curves and the final teacher's attention.

:func:`write_report` reads what ``dino train`` leaves in a run folder (``metrics.jsonl``,
``config.yaml``, ``results.json``, the teacher weights) and writes into ``RUN_DIR/report/``:

* ``loss.png``: the training loss over epochs;
* ``knn.png``: weighted k-NN top-1 over epochs, one line per k;
* ``schedules.png``: learning rate, weight decay, teacher momentum and teacher temperature over
  iterations;
* ``collapse.png``: teacher output entropy (with log K, the value of a uniform collapse) and the
  teacher-student KL divergence (0 when collapsed) over iterations;
* ``attention-<i>.png``: for ViTs, the last-block [CLS] attention of the final teacher on a few
  images (Fashion-MNIST runs: test images of different classes; folder runs: images of the
  folder), as :func:`dino.viz.attention.overview` draws it;
* ``report.html``: all of it on one page, with the run's summary and config.

Plots need matplotlib (``pip install 'dino[report]'``).

>>> from dino.viz.report import write_report
>>> write_report("runs/fmnist")["html"]  # doctest: +SKIP
PosixPath('runs/fmnist/report/report.html')
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from dino.atomic_files import write_text
from dino.errors import DinoError

log = logging.getLogger("dino")

_SCHEDULES = (
    ("lr", "learning rate"),
    ("wd", "weight decay"),
    ("momentum", "teacher momentum"),
    ("teacher_temp", "teacher temperature"),
)


# ------------------------------------------------------------------ reading the run


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (lines torn by a kill are skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_optional(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None


# ------------------------------------------------------------------ plots


def _figure(rows: int, cols: int, width: float = 6.4, height: float = 3.2) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise DinoError(
            "dino report draws its plots with matplotlib, which is not installed; "
            "pip install 'dino[report]' (or pip install matplotlib)"
        ) from None
    return Figure(figsize=(width * cols, height * rows), dpi=100, layout="constrained")


def _series(rows: Sequence[dict[str, Any]], key: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[x], r[key]) for r in rows if _finite(r.get(key)) and _finite(r.get(x))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(pts, dtype=np.float64)
    return a[:, 0], a[:, 1]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in metrics.jsonl", ha="center", va="center", color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _line(
    ax: Any,
    steps: Sequence[dict[str, Any]],
    key: str,
    x: str,
    color: str,
    title: str,
    ylabel: str | None = None,
    missing: str | None = None,
    label: str | None = None,
) -> bool:
    """Plot ``key`` of the metrics over ``x`` with its axis labels, grid and ``title``, or a note
    that metrics.jsonl has no ``missing`` (default: ``key``); whether there was data."""
    xs, ys = _series(steps, key, x)
    if len(xs):
        ax.plot(xs, ys, color=color, lw=1.2, label=label)
        ax.set_xlabel(x)
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    else:
        _no_data(ax, missing or key)
    ax.set_title(title)
    return bool(len(xs))


def plot_loss(steps: Sequence[dict[str, Any]], path: Path) -> Path:
    """Training loss over epochs."""
    fig = _figure(1, 1)
    _line(fig.add_subplot(), steps, "loss", "epoch", "tab:blue", "training loss", "DINO loss")
    fig.savefig(path)
    return path


def plot_knn(evals: Sequence[dict[str, Any]], path: Path) -> Path:
    """Weighted k-NN top-1 over epochs, one line per k."""
    fig = _figure(1, 1)
    ax = fig.add_subplot()
    ks = sorted({k for r in evals for k in r.get("knn", {})}, key=lambda k: int(k))
    for k in ks:
        pts = [(r["epoch"], r["knn"][k]["top1"]) for r in evals if k in r.get("knn", {})]
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=f"k={k}")
    if ks:
        ax.set_xlabel("epoch")
        ax.set_ylabel("top-1 (%)")
        ax.legend()
        ax.grid(alpha=0.3)
    else:
        _no_data(ax, "k-NN evaluation")
    ax.set_title("weighted k-NN of the teacher's features")
    fig.savefig(path)
    return path


def plot_schedules(steps: Sequence[dict[str, Any]], path: Path) -> Path:
    """Learning rate, weight decay, teacher momentum and temperature over iterations."""
    fig = _figure(2, 2, width=4.8, height=3.0)
    for i, (key, title) in enumerate(_SCHEDULES):
        _line(fig.add_subplot(2, 2, i + 1), steps, key, "iteration", "tab:green", title)
    fig.savefig(path)
    return path


def plot_collapse(steps: Sequence[dict[str, Any]], out_dim: int | None, path: Path) -> Path:
    """Teacher entropy (and log K) and teacher-student KL over iterations."""
    fig = _figure(1, 2, width=4.8)
    ax = fig.add_subplot(1, 2, 1)
    what = "teacher entropy"
    if _line(ax, steps, "teacher_entropy", "iteration", "tab:purple", "teacher output entropy",
             "nats", missing=what, label=what):  # fmt: skip
        bx, by = _series(steps, "batch_entropy", "iteration")
        if len(bx):
            ax.plot(bx, by, color="tab:orange", lw=1.0, label="entropy of the batch mean")
        if out_dim:
            ax.axhline(math.log(out_dim), color="gray", ls="--", lw=1, label="log K (uniform)")
        ax.legend(fontsize=8)
    kl = fig.add_subplot(1, 2, 2)
    _line(kl, steps, "kl", "iteration", "tab:red", "KL(teacher || student)", "nats",
          missing="KL divergence")  # fmt: skip
    fig.savefig(path)
    return path


# ------------------------------------------------------------------ attention


def sample_images(data: str, n: int) -> list[tuple[str, Image.Image]]:
    """``n`` (caption, picture) pairs of the run's data: Fashion-MNIST test images of different
    classes, or images spread over a folder. Empty when the data cannot be found."""
    from dino.data.datasets import BUILTIN, BadImage, builtin_split, load_image, scan_folder

    if n <= 0:
        return []
    if data in BUILTIN:
        test = builtin_split(data, "test", 1000)
        labels = test.labels.tolist() if test.labels is not None else [-1] * len(test)
        picks: list[int] = []
        for c in range(len(test.classes)):
            if c in labels:
                picks.append(labels.index(c))
        picks = (picks or list(range(len(test))))[:n]
        out = []
        for i in picks:
            pix = test.images[i].permute(1, 2, 0).numpy()
            img = Image.fromarray(pix[..., 0] if pix.shape[-1] == 1 else pix)
            out.append((f"test image {i} ({test.classes[labels[i]]})", img))
        return out
    try:
        files, _labels, _classes = scan_folder(data)
    except DinoError:
        return []
    out = []
    for i in np.linspace(0, len(files) - 1, num=min(n, len(files)), dtype=int) if files else []:
        try:
            out.append((Path(files[i]).name, load_image(files[i])))
        except BadImage:
            continue
    return out


def attention_overviews(
    backbone: Any,
    images: Sequence[tuple[str, Image.Image]],
    out: Path,
    image_size: int | None,
    device: str = "cpu",
) -> list[tuple[str, Path]]:
    """One ``attention-<i>.png`` overview per image (a DinoError for non-ViT backbones)."""
    from dino.eval.attention import attention_masks, attention_patch_size, cls_attention
    from dino.models.weights import input_stats
    from dino.viz.attention import overview
    from dino.viz.drawing import prepare_image

    patch = attention_patch_size(backbone)
    mean, std = input_stats(backbone)
    written = []
    for i, (caption, img) in enumerate(images):
        x, picture = prepare_image(img, patch, image_size, mean, std)
        att = cls_attention(backbone, x.to(device))[0].float().cpu()
        masks = attention_masks(att, 0.6)
        path = out / f"attention-{i}.png"
        overview(picture, att.numpy(), masks.numpy()).save(path)
        written.append((caption, path))
    return written


# ------------------------------------------------------------------ the page


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{body}</table>"


_CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; } th, td { padding: 2px 10px; text-align: left; }
th { color: #555; font-weight: normal; } img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.warn { color: #a40; }
"""


def write_report(
    run_dir: str | Path,
    output_dir: str | Path | None = None,
    images: int = 4,
    image_size: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Write ``report.html`` and its PNGs for a ``dino train`` run folder.

    Args:
        run_dir: the run folder (``metrics.jsonl`` is required; the weights are needed for the
            attention maps).
        output_dir: where to write (default ``RUN_DIR/report``).
        images: number of images whose attention is drawn (0: none).
        image_size: resize their shorter side to this first (default: the run's global crop
            size when under 224, else 480).
        device: where to run the teacher for the attention maps.

    Returns ``{"html": path, "plots": [paths], "attention": [paths], "notes": [str]}``.
    """
    run = Path(run_dir)
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.is_file():
        raise DinoError(f"{run} has no metrics.jsonl; pass the run folder that `dino train` wrote")
    rows = read_metrics(metrics_path)
    cfg = _read_optional(run / "config.yaml") or {}
    results = _read_optional(run / "results.json") or {}
    out = Path(output_dir) if output_dir is not None else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if isinstance(r.get("knn"), dict)]
    warnings_ = [r for r in rows if r.get("warning")]
    skipped = [r for r in rows if r.get("skipped")]
    model_cfg, data_cfg = cfg.get("model", {}), cfg.get("data", {})
    out_dim = model_cfg.get("out_dim")

    plots = [
        ("Training loss", plot_loss(steps, out / "loss.png")),
        ("Weighted k-NN over epochs", plot_knn(evals, out / "knn.png")),
        ("Schedules", plot_schedules(steps, out / "schedules.png")),
        ("Collapse indicators", plot_collapse(steps, out_dim, out / "collapse.png")),
    ]

    notes: list[str] = []
    attention: list[tuple[str, Path]] = []
    if images > 0:
        try:
            from dino.models.weights import load_backbone
            from dino.viz.attention import default_image_size

            backbone = load_backbone(run, device=device)
            size = image_size if image_size is not None else default_image_size(cfg)
            picked = sample_images(str(data_cfg.get("data", "")), images)
            if not picked:
                notes.append(f"no images found in {data_cfg.get('data')!r} for attention maps")
            else:
                attention = attention_overviews(backbone, picked, out, size, device)
        except DinoError as exc:
            notes.append(f"attention maps skipped: {exc}")

    summary: list[tuple[str, Any]] = [
        ("run folder", run.resolve()),
        ("backbone", model_cfg.get("arch", "?")),
        ("data", data_cfg.get("data", "?")),
        ("epochs", cfg.get("optim", {}).get("epochs", "?")),
        ("iterations", results.get("iterations", steps[-1]["iteration"] + 1 if steps else "?")),
    ]
    if steps:
        summary.append(("last logged loss", f"{steps[-1]['loss']:.4f}"))
    knn = results.get("knn") or (evals[-1]["knn"] if evals else None)
    if knn:
        summary += [(f"k-NN top-1, k={k}", f"{v['top1']:.2f}%") for k, v in knn.items()]
    if results.get("train_seconds"):
        summary.append(("training time", f"{results['train_seconds'] / 60:.1f} min"))
    summary.append(("skipped steps (non-finite)", len(skipped)))

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>DINO run {html.escape(run.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>DINO run {html.escape(run.name)}</h1>",
        _table(summary),
    ]
    if warnings_:
        parts.append("<h2>Warnings</h2><ul>")
        parts += [
            f"<li class='warn'>iteration {r.get('iteration')}: {html.escape(str(r['warning']))}"
            "</li>"
            for r in warnings_[:20]
        ]
        parts.append("</ul>")
    parts.append("<h2>Curves</h2>")
    for title, path in plots:
        parts.append(
            f"<figure><img src='{path.name}' alt='{html.escape(title)}'>"
            f"<figcaption>{html.escape(title)}</figcaption></figure>"
        )
    parts.append("<h2>Attention of the final teacher</h2>")
    parts.append(
        "<p>Last block, [CLS] query: the image, each head's map, their mean and the masks that "
        "keep 60% of each head's attention.</p>"
    )
    for caption, path in attention:
        parts.append(
            f"<figure><img src='{path.name}' alt='attention'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    parts += [f"<p class='warn'>{html.escape(n)}</p>" for n in notes]
    if cfg:
        dumped = yaml.safe_dump(cfg, sort_keys=False)
        parts.append(f"<h2>Config</h2><pre>{html.escape(dumped)}</pre>")
    parts.append("</body></html>")
    page = out / "report.html"
    write_text(page, "\n".join(parts))
    for note in notes:
        log.warning("%s", note)
    return {
        "html": page,
        "plots": [p for _, p in plots],
        "attention": [p for _, p in attention],
        "notes": notes,
    }
