"""The weighted k-NN evaluation during training, shared among the processes of a run: each
process extracts the features of every ``world``-th image, rank 0 gathers them and votes."""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn
from tqdm import tqdm

from dino.config import Config
from dino.data.datasets import TensorImages, TrainingData, shard
from dino.errors import DinoError
from dino.eval.features import extract
from dino.eval.neighbors import weighted_knn
from dino.eval.views import EvalView, eval_batches
from dino.training.distributed import Dist, gather_strided

log = logging.getLogger("dino")


def knn_ks(cfg: Config, bank: int) -> list[int]:
    """The k values of ``--knn-k`` that a bank of ``bank`` images can answer (k <= bank)."""
    return [k for k in cfg.run.knn_k if k <= bank]


def check_knn_k(cfg: Config, data: TrainingData) -> None:
    """Before a run starts: refuse ``--knn-k`` values that no k-NN bank of ``data`` can answer,
    and say which ones will be left out (:func:`knn_ks`)."""
    if data.knn_bank is None or data.knn_query is None:
        return
    n = len(data.knn_bank)
    kept = knn_ks(cfg, n)
    if not kept:
        raise DinoError(
            f"knn_k {cfg.run.knn_k}: every k is larger than the {n} images of the k-NN bank; "
            f"pass --knn-k values up to {n}"
        )
    if len(kept) < len(cfg.run.knn_k):
        log.warning(
            "k-NN: k=%s exceed the %d images of the bank and are left out; reported: k=%s",
            ", ".join(str(k) for k in cfg.run.knn_k if k > n),
            n,
            ", ".join(map(str, kept)),
        )


def teacher_knn(
    backbone: nn.Module,
    data: TrainingData,
    cfg: Config,
    d: Dist,
    device: torch.device,
) -> dict[str, dict[str, float]] | None:
    """Weighted k-NN accuracy of ``backbone``'s features (bank: ``data.knn_bank``, queries:
    ``data.knn_query``) on rank 0; None on the other ranks or without labeled data.

    The features are fp32 whatever the run's precision, as ``dino knn`` computes them: the same
    weights give the same numbers. Runs with forked random generators, so that it changes
    nothing of the training."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        bank_ds, query_ds = data.knn_bank, data.knn_query
        if bank_ds is None or query_ds is None:
            return None
        dc = cfg.data
        view = EvalView(dc.eval_resize, dc.eval_crop, list(dc.mean), list(dc.std))
        was_training = backbone.training
        backbone.eval()
        feats = []
        for ds in (bank_ds, query_ds):
            part = shard(ds, d.rank, d.world)
            bar = tqdm(
                total=len(part),
                desc=f"k-NN features {getattr(ds, 'name', '')}",
                leave=False,
                disable=not d.main or not sys.stderr.isatty(),
            )
            batch_size = 512 if isinstance(part, TensorImages) else 128
            batches = eval_batches(part, view, batch_size, dc.num_workers, device)
            f, y = extract(backbone, batches, progress=bar.update)
            bar.close()
            if d.world > 1:  # all samples on rank 0, in dataset order, as one process has them
                f, y = gather_strided(f, len(ds)), gather_strided(y, len(ds))
            feats.append((f, y))
        backbone.train(was_training)
        if not d.main:
            return None
        (fb, yb), (fq, yq) = feats
        return weighted_knn(
            fb.to(device),
            yb.to(device),
            fq.to(device),
            yq.to(device),
            knn_ks(cfg, len(fb)),
            cfg.run.knn_temp,
            num_classes=len(bank_ds.classes) or None,
        )
