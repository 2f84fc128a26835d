"""dino: DINO self-supervised pretraining (Caron et al., 2021) as a library and a command.

>>> import dino
>>> cfg = dino.load_config("fashion-mnist", {"epochs": 1})
>>> results = dino.train(cfg)  # doctest: +SKIP
>>> backbone = dino.load_backbone("dino_vits16")  # doctest: +SKIP
>>> dino.export("runs/fmnist", "exported/")  # doctest: +SKIP
>>> dino.report("runs/fmnist")  # doctest: +SKIP

The functions mirror the commands: ``dino train`` (:func:`train`), ``dino export``
(:func:`export`), ``dino report`` (:func:`report`); the evaluations are in :mod:`dino.eval`
(``knn_eval``, ``linear_probe``, ``extract_features``) and the attention maps in
:mod:`dino.viz.attention`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dino.config import Config
from dino.config_load import load_config
from dino.errors import DinoError

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

__all__ = ["Config", "DinoError", "export", "load_backbone", "load_config", "report", "train"]
__version__ = "0.1.0"


def train(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Run DINO pretraining as ``dino train`` does (see :func:`dino.training.train`).

    Args:
        cfg: the run's configuration, e.g. ``dino.load_config("vit_small_100ep", {"data":
            "/path/to/images"})``.
        resume: a run folder to continue from its latest checkpoint.

    Returns the results also written to ``results.json`` (final weighted k-NN when the data has
    labels).
    """
    from dino.training import train as _train

    return _train(cfg, resume)


def export(
    weights: str | Path | nn.Module, output_dir: str | Path, **kwargs: Any
) -> dict[str, Any]:
    """Write a backbone as ``model.safetensors`` + timm ``config.json`` and ``model.onnx``, as
    ``dino export`` does (see :func:`dino.models.export.export_backbone` for the options)."""
    from dino.models.export import export_backbone

    return export_backbone(weights, output_dir, **kwargs)


def report(
    run_dir: str | Path, output_dir: str | Path | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Write ``report.html`` with the curves and attention maps of a run folder, as ``dino
    report`` does (see :func:`dino.viz.report.write_report` for the options)."""
    from dino.viz.report import write_report

    return write_report(run_dir, output_dir, **kwargs)


def __getattr__(name: str) -> Any:
    # imported on first use: ``import dino`` stays light (no torch import)
    if name == "load_backbone":
        from dino.models.weights import load_backbone

        return load_backbone
    raise AttributeError(f"module 'dino' has no attribute {name!r}")
