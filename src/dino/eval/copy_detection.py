"""Copy detection with frozen ViT features: the Copydays protocol, and plain folders.

The protocol of the paper (the reference's ``eval_copy_detection.py``):

* images are resized to ``imsize`` x ``imsize`` (320, bicubic, aspect not kept) and normalized;
* the descriptor concatenates the [CLS] token and the GeM pooling (exponent 4, tokens clamped at
  1e-6) of the patch tokens of the last block, after the final norm;
* whitening, only when a folder of images to learn it is given (as the reference: never on the
  database's own distractors): features are centered by the mean of
  that set and projected on the eigenvectors of its second-moment matrix, each scaled by
  ``eigenvalue ** -0.5`` (the reference's PCA whitening, all dimensions kept); eigenvalues below
  1e-5 of the largest are dropped here, rather than floored, so that a small whitening set does
  not blow up directions it never saw (with more images than dimensions nothing is dropped);
* descriptors are L2-normalized and compared by cosine similarity; the database is the originals
  plus the distractor images.

Copydays: every query block (``original``, ``strong``, ``jpegqual/<q>``, ``crops/<p>``) searches
the database; a query's positives are its original (the same position in name order for the
jpeg and crop blocks, the same 4-character name prefix for the strong block). AP is computed on
the first 20 results (revisitop's trapezoid definition, as the Holidays package), averaged per
block, and per subset: strong, jpeg (mean over the qualities), crops (mean over the crop sizes).
Scores are fractions in [0, 1].

Plain folders: a folder of originals and a folder of suspected copies give each copy's best
match (an original, or a distractor) and its cosine similarity.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dino.errors import DinoError
from dino.eval.image_files import data_or_folders, image_batches, normalized_tensor, read_folder
from dino.eval.outputs import Backbone, refuse_existing, resolve_backbone, write_csv, write_json
from dino.eval.patch_features import cls_and_patch_tokens, vit_patch_size
from dino.eval.ranking import average_precision
from dino.models.weights import input_stats

log = logging.getLogger("dino")

#: The Copydays query blocks, in the reference's order.
COPYDAYS_BLOCKS = (
    ("original", "strong")
    + tuple(f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75))
    + tuple(f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80))
)
#: The exponent of the GeM pooling of the patch tokens.
GEM_P = 4.0
#: Results per query that count for AP (the reference keeps the top 20).
RESULTS_PER_QUERY = 20
#: Whitening: the power of the eigenvalues (0.5: full whitening) and the relative floor.
WHITENING_POWER = 0.5
WHITENING_EPS = 1e-5


class SquareResize:
    """Resize to ``imsize`` x ``imsize`` (bicubic), then normalize."""

    def __init__(self, imsize: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.imsize, self.mean, self.std = imsize, list(mean), list(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.resize((self.imsize, self.imsize), Image.Resampling.BICUBIC)
        return normalized_tensor(img, self.mean, self.std)


def gem(tokens: torch.Tensor, p: float = GEM_P, eps: float = 1e-6) -> torch.Tensor:
    """Generalized mean ``(mean(clamp(x, eps) ** p)) ** (1 / p)`` over the tokens ``[B, N, D]``."""
    return tokens.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


@torch.no_grad()
def copy_descriptor(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, 2D]``: [CLS] token and GeM-pooled patch tokens of the last block (not normalized)."""
    cls, patches = cls_and_patch_tokens(model, x)
    return torch.cat([cls, gem(patches.flatten(1, 2))], dim=1).float()


def extract_descriptors(
    model: nn.Module,
    paths: Sequence[str | Path],
    imsize: int,
    device: torch.device,
    batch_size: int = 16,
    num_workers: int = 0,
    desc: str = "features",
) -> torch.Tensor:
    """Copy-detection descriptors ``[N, 2D]`` (float32, CPU) of images."""
    mean, std = input_stats(model)
    transform = SquareResize(imsize, mean, std)
    out = [
        copy_descriptor(model, x.to(device)).cpu()
        for x in image_batches(paths, transform, batch_size, num_workers, desc)
    ]
    return torch.cat(out) if out else torch.zeros(0, 2 * int(model.embed_dim))


@dataclass
class Whitening:
    """``x -> (x - mean) @ projection.T``: PCA whitening learned on a set of descriptors."""

    mean: torch.Tensor
    projection: torch.Tensor  # [K, D], rows = eigenvectors / eigenvalue ** power

    @classmethod
    def learn(
        cls, feats: torch.Tensor, power: float = WHITENING_POWER, eps: float = WHITENING_EPS
    ) -> Whitening:
        """Learn it from descriptors ``[N, D]``: the eigen-decomposition of their second-moment
        matrix ``X^T X / N`` (as the reference), components below ``eps`` x the largest
        eigenvalue dropped."""
        x = feats.double()
        if x.shape[0] < 2:
            raise DinoError("learning the whitening needs at least 2 images; give a larger folder")
        moment = x.T @ x / x.shape[0]
        values, vectors = torch.linalg.eigh(moment)
        values, order = values.sort(descending=True)
        vectors = vectors[:, order]
        keep = values > eps * values[0]
        projection = (vectors[:, keep] / values[keep].pow(power)).T
        return cls(feats.double().mean(0).float(), projection.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.projection.T


def normalize(x: torch.Tensor, whitening: Whitening | None) -> torch.Tensor:
    """Whiten (when learned) then L2-normalize descriptors."""
    return F.normalize(whitening(x) if whitening is not None else x, dim=1)


# ------------------------------------------------------------------ Copydays


@dataclass
class CopydaysBlock:
    """One query block: its images and, per query, the indices of its originals."""

    name: str
    files: list[Path]
    positives: list[list[int]]


def _jpgs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg" and p.is_file())


def read_copydays(root: str | Path) -> tuple[list[Path], list[CopydaysBlock]]:
    """The originals and the query blocks present under a Copydays root, with ground truth."""
    base = Path(root)
    if not (base / "original").is_dir():
        raise DinoError(
            f"{base} has no original/ folder; the Copydays layout is original/, strong/, "
            "jpegqual/<quality>/ and crops/<percent>/ folders of .jpg files (or pass "
            "--originals and --copies folders)"
        )
    originals = _jpgs(base / "original")
    if not originals:
        raise DinoError(f"{base / 'original'} holds no .jpg image")
    by_prefix: dict[str, list[int]] = {}
    for i, p in enumerate(originals):
        by_prefix.setdefault(p.name[:4], []).append(i)
    blocks = []
    for name in COPYDAYS_BLOCKS:
        folder = base / name
        if not folder.is_dir():
            continue
        files = _jpgs(folder)
        if not files:
            continue
        if name == "strong":
            positives = []
            for p in files:
                if p.name[:4] not in by_prefix:
                    raise DinoError(
                        f"the strong copy {p} matches no original: Copydays names a copy after "
                        "its original's first 4 characters; the folders do not match"
                    )
                positives.append(by_prefix[p.name[:4]])
        else:
            if len(files) != len(originals):
                raise DinoError(
                    f"{folder} holds {len(files)} images but original/ holds {len(originals)}; "
                    "a jpegqual or crops block has one copy of each original, in the same name "
                    "order"
                )
            positives = [[i] for i in range(len(files))]
        blocks.append(CopydaysBlock(name, files, positives))
    if len(blocks) < 2:
        raise DinoError(
            f"{base} has no query block besides original/ (strong/, jpegqual/<q>/, crops/<p>/)"
        )
    return originals, blocks


def score_block(orders: np.ndarray, positives: list[list[int]], depth: int) -> float:
    """mAP of one block from its rankings ``[Q, >= depth]``: AP on the first ``depth``
    results."""
    aps = []
    for order, pos in zip(orders, positives, strict=True):
        hits = np.flatnonzero(np.isin(order[:depth], pos))
        aps.append(average_precision(hits, len(pos)))
    return float(np.mean(aps))


def copydays_subsets(blocks: dict[str, float]) -> dict[str, float]:
    """The per-subset means of per-block mAPs: original, strong, jpeg, crops."""
    out = {}
    for subset, prefix in (
        ("original", "original"),
        ("strong", "strong"),
        ("jpeg", "jpegqual/"),
        ("crops", "crops/"),
    ):
        values = [v for k, v in blocks.items() if k == prefix or k.startswith(prefix)]
        if values and (prefix.endswith("/") or subset == prefix):
            out[subset] = float(np.mean(values))
    return out


# ------------------------------------------------------------------ the evaluation


def _image_files(folder: str | Path | None, what: str) -> list[Path]:
    return [] if folder is None else read_folder(folder, what).files


def copy_detection(
    backbone: Backbone,
    data: str | Path | None = None,
    originals: str | Path | None = None,
    copies: str | Path | None = None,
    distractors: str | Path | None = None,
    whitening: str | Path | None = None,
    imsize: int = 320,
    matches_csv: str | Path | None = None,
    json_out: str | Path | None = None,
    batch_size: int = 16,
    device: str = "auto",
    num_workers: int = 0,
) -> dict[str, Any]:
    """Copy detection with frozen features (see the module docstring).

    Args:
        backbone: a ViT module, weights for :func:`dino.load_backbone`, or a function
            returning the module (called once the inputs are checked).
        data: a Copydays root; or else:
        originals, copies: a folder of originals and one of suspected copies.
        distractors: a folder of other images added to the database.
        whitening: a folder of images to learn the whitening on (default: no whitening; the
            paper used 20k other images than its 10k distractors). The results record it.
        imsize: images are resized to this square size.
        matches_csv: write each query's best match there (must not exist); the plain case's
            output.
        json_out: also write the results there as JSON (must not exist).
        batch_size, device, num_workers: loading and placement.

    Returns the mAP per block and subset (Copydays) or the best matches (plain folders).
    """
    from dino.devices import resolve_device

    plain = data_or_folders(
        data, (originals, copies), ("--originals", "--copies"), "Copydays", "copy detection"
    )
    if imsize < 1 or batch_size < 1:
        raise DinoError("--imsize and --batch-size must be positive")
    refuse_existing(matches_csv, "--matches")
    refuse_existing(json_out, "--json")
    # read every folder before loading the network: a bad path fails fast
    if plain:
        db_files = _image_files(originals, "--originals")
        blocks = [CopydaysBlock("copies", _image_files(copies, "--copies"), [])]
    else:
        db_files, blocks = read_copydays(data)  # type: ignore[arg-type]
    distractor_files = _image_files(distractors, "--distractors")
    whitening_files = _image_files(whitening, "--whitening")
    dev = resolve_device(device)
    model = resolve_backbone(backbone, dev)
    vit_patch_size(model, "copy detection")

    def descriptors(files: list[Path], desc: str) -> torch.Tensor:
        return extract_descriptors(model, files, imsize, dev, batch_size, num_workers, desc)

    white = None
    if whitening_files:
        white = Whitening.learn(descriptors(whitening_files, "whitening"))
    database = normalize(
        torch.cat(
            [descriptors(db_files, "originals"), descriptors(distractor_files, "distractors")]
        )
        if distractor_files
        else descriptors(db_files, "originals"),
        white,
    )
    db_names = [str(p) for p in db_files + distractor_files]
    res: dict[str, Any] = {
        "scores": "fractions in [0, 1]",
        "n_originals": len(db_files),
        "n_distractors": len(distractor_files),
        "whitening": "PCA whitening (power 0.5)" if white is not None else "none",
        "whitening_learned_on": str(whitening) if whitening is not None else None,
        "whitening_images": len(whitening_files),
        "whitening_dims": int(white.projection.shape[0]) if white is not None else None,
        "imsize": imsize,
    }
    rows: list[tuple[str, str, float]] = []
    block_map: dict[str, float] = {}
    for block in blocks:
        q = normalize(descriptors(block.files, block.name), white)
        sim = q @ database.T
        depth = min(RESULTS_PER_QUERY, sim.shape[1])
        top_sim, top_idx = sim.topk(depth, dim=1)
        orders = top_idx.numpy()
        for i, p in enumerate(block.files):
            rows.append((str(p), db_names[orders[i, 0]], float(top_sim[i, 0])))
        if block.positives:
            block_map[block.name] = score_block(orders, block.positives, depth)
            log.info("%s: mAP %.3f over %d queries", block.name, block_map[block.name], len(q))
    if not plain:
        res["mAP"] = copydays_subsets(block_map)
        res["blocks"] = block_map
    else:
        res["n_copies"] = len(rows)
        res["matches"] = [{"copy": c, "best_match": m, "similarity": s} for c, m, s in rows]
    if matches_csv is not None:
        write_csv(
            matches_csv,
            ["query", "best_match", "similarity"],
            [[c, m, f"{sim:.6f}"] for c, m, sim in rows],
        )
        res["output"] = str(matches_csv)
    info = getattr(model, "weights_info", None)
    res["weights"] = info.source if info else None
    if json_out is not None:
        write_json(json_out, res)
    return res
