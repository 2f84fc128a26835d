"""Image retrieval with frozen global features: revisited Oxford and Paris, and plain folders.

The protocol of the paper (the reference's ``eval_image_retrieval.py``):

* each image is shrunk (never enlarged) so that its longer side is at most ``imsize`` px, aspect
  kept, and normalized; the feature is the backbone's output ([CLS] for a ViT), optionally
  averaged over the scales 1, 1/sqrt(2) and 1/2 (bilinear) before L2 normalization;
* the database is ranked by cosine similarity to each query;
* revisited Oxford and Paris are scored by the revisitop definition of mean average precision:
  AP is the area under the precision-recall curve accumulated as trapezoids, *junk* images are
  removed from the ranking before it is scored, queries without a positive image are left out;
  the Easy / Medium / Hard protocols take easy / easy+hard / hard images as positives (the rest
  of easy/hard as junk). mP@k is revisitop's too: precision at ``min(k, rank of the last
  positive)``.

Plain folders: a folder of queries and a folder of database images give the top-k neighbours of
each query; when both hold class subfolders, an image is relevant to a query of the same class
name, and mAP (same AP definition, no junk) and precision@k (relevant share of the first k) are
reported. An image present in both folders is never its own neighbour. Scores are fractions in
[0, 1].
"""

from __future__ import annotations

import logging
import math
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dino.data.datasets import IMAGE_EXTENSIONS, BadImage, load_image, loader_workers
from dino.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from dino.errors import DinoError
from dino.eval.outputs import Backbone, refuse_existing, resolve_backbone, write_csv, write_json
from dino.eval.patch_features import crop_to_patches

log = logging.getLogger("dino")

#: The scales of the multi-scale feature (bilinear resizes of the input).
SCALES = (1.0, 1 / math.sqrt(2), 0.5)
#: The revisitop data sets and their protocols: (positives, extra junk) by difficulty.
REVISITOP_DATASETS = ("roxford5k", "rparis6k")
PROTOCOLS = {
    "easy": (("easy",), ("hard",)),
    "medium": (("easy", "hard"), ()),
    "hard": (("hard",), ("easy",)),
}
#: The k of revisitop's mP@k and of the plain folders' precision@k.
DEFAULT_KS = (1, 5, 10)

Transform = Callable[[Image.Image], torch.Tensor]


# ------------------------------------------------------------------ reading images


class ImageList(Dataset):
    """Images of a list of paths through ``transform``; item ``(tensor, "")``, or
    ``(None, reason)`` for an unreadable file (reported by :func:`image_batches`)."""

    def __init__(self, paths: Sequence[str | Path], transform: Transform) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str]:
        try:
            img = load_image(self.paths[i])
        except BadImage as exc:
            return None, str(exc)
        return self.transform(img), ""


def image_batches(
    paths: Sequence[str | Path],
    transform: Transform,
    batch_size: int = 1,
    num_workers: int = 0,
    desc: str = "images",
) -> Iterator[torch.Tensor]:
    """Batches ``[B, 3, H, W]`` of the images in ``paths`` (in order); an unreadable image stops
    with a :class:`DinoError` naming it. ``batch_size`` > 1 needs a fixed-size transform."""
    loader = DataLoader(
        ImageList(paths, transform),
        batch_size=batch_size,
        num_workers=loader_workers(num_workers),
        collate_fn=list,
    )
    bar = tqdm(
        total=len(paths), desc=desc, unit="img", leave=False, disable=not sys.stderr.isatty()
    )
    try:
        for items in loader:
            for x, reason in items:
                if x is None:
                    raise DinoError(
                        f"cannot read the image {reason}; replace or remove it and run again"
                    )
            bar.update(len(items))
            yield torch.stack([x for x, _ in items])
    finally:
        bar.close()


def normalized_tensor(
    img: Image.Image, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """An RGB image as a normalized ``[3, H, W]`` float32 tensor."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class Thumbnail:
    """Shrink (never enlarge) so that both sides are at most ``imsize`` px, keeping the aspect
    (PIL's thumbnail, Lanczos), then normalize."""

    def __init__(self, imsize: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.imsize, self.mean, self.std = imsize, list(mean), list(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.copy()
        img.thumbnail((self.imsize, self.imsize), Image.Resampling.LANCZOS)
        return normalized_tensor(img, self.mean, self.std)


# ------------------------------------------------------------------ features


def patch_multiple(model: nn.Module) -> int | None:
    """The patch size a ViT needs its input to be a multiple of (None for other networks)."""
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        return None
    size = embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


@torch.no_grad()
def global_feature(
    model: nn.Module, x: torch.Tensor, scales: Sequence[float] = (1.0,)
) -> torch.Tensor:
    """L2-normalized ``[B, D]`` output of ``model``, averaged over bilinear rescalings of ``x``
    by ``scales`` first (a ViT input is cropped to whole patches, as its strided patch
    embedding would ignore the rest)."""
    patch = patch_multiple(model)
    total = None
    for s in scales:
        inp = (
            x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        )
        if patch:
            inp = crop_to_patches(inp, patch)
        out = model(inp).float()
        total = out if total is None else total + out
    assert total is not None
    return F.normalize(total / len(scales), dim=1)


def extract_global(
    model: nn.Module,
    paths: Sequence[str | Path],
    transform: Transform,
    multiscale: bool,
    device: torch.device,
    num_workers: int = 0,
    desc: str = "features",
) -> torch.Tensor:
    """L2-normalized global features ``[N, D]`` (float32, CPU) of images, one at a time (the
    images keep their aspect, so sizes differ)."""
    scales = _scales(multiscale)
    feats = [
        global_feature(model, x.to(device), scales).cpu()
        for x in image_batches(paths, transform, 1, num_workers, desc)
    ]
    return torch.cat(feats)


# ------------------------------------------------------------------ scores


def average_precision(positive_ranks: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """AP of one query by revisitop's definition: ``positive_ranks`` are the 0-based ranks of the
    positives found (ascending, junk already removed), ``n_positives`` how many exist; the
    precision-recall curve is integrated with trapezoids of width ``1 / n_positives`` between
    the precision just before and just after each positive."""
    if n_positives <= 0:
        raise ValueError("a query without positives has no average precision")
    ap = 0.0
    for j, rank in enumerate(positive_ranks):
        before = 1.0 if rank == 0 else j / rank
        after = (j + 1) / (rank + 1)
        ap += (before + after) / 2 / n_positives
    return ap


def positive_ranks(order: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives in the ranking ``order`` (database indices, best first)
    once the junk images are taken out of it. ``positives`` and ``junk`` are boolean masks over
    the database (an image in both counts as positive)."""
    keep = ~junk[order] | positives[order]
    return np.flatnonzero(positives[order][keep])


def precision_at_k(ranks: np.ndarray, k: int) -> float:
    """Share of relevant images among the first ``k`` (junk removed), from the ranks of the
    positives."""
    return int(np.count_nonzero(ranks < k)) / k


def revisitop_precision_at_k(ranks: np.ndarray, k: int) -> float:
    """revisitop's mP@k term: precision at ``min(k, 1-based rank of the last positive)``."""
    ranks1 = ranks + 1
    kq = min(int(ranks1.max()), k)
    return int(np.count_nonzero(ranks1 <= kq)) / kq


@dataclass
class QueryTruth:
    """Which database images are positive and which are junk for one query."""

    positives: np.ndarray  # int indices
    junk: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def query_scores(
    orders: np.ndarray,
    truth: Sequence[QueryTruth],
    n_database: int,
    ks: Sequence[int] = DEFAULT_KS,
    revisitop_pk: bool = False,
) -> list[tuple[float, list[float]] | None]:
    """(AP, precision@k for each k) of each ranking ``[Q, N]`` (database indices, best first),
    None for a query without positives. With ``revisitop_pk`` the precision@k is revisitop's
    mP@k, else the plain share of relevant images among the first k."""
    out: list[tuple[float, list[float]] | None] = []
    pk = revisitop_precision_at_k if revisitop_pk else precision_at_k
    for order, t in zip(orders, truth, strict=True):
        if len(t.positives) == 0:
            out.append(None)
            continue
        pos = np.zeros(n_database, dtype=bool)
        pos[t.positives] = True
        junk = np.zeros(n_database, dtype=bool)
        junk[t.junk] = True
        ranks = positive_ranks(order, pos, junk)
        out.append((average_precision(ranks, int(pos.sum())), [pk(ranks, k) for k in ks]))
    return out


def mean_scores(
    per_query: Sequence[tuple[float, list[float]] | None], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, Any]:
    """mAP and mean precision@k over the queries that have positives."""
    scored = [s for s in per_query if s is not None]
    return {
        "mAP": float(np.mean([ap for ap, _ in scored])) if scored else None,
        "precision@k": (
            {
                str(k): float(v)
                for k, v in zip(ks, np.mean([pk for _, pk in scored], axis=0), strict=True)
            }
            if scored
            else None
        ),
        "scored_queries": len(scored),
        "ap": [None if s is None else s[0] for s in per_query],
    }


def score_rankings(
    orders: np.ndarray,
    truth: Sequence[QueryTruth],
    n_database: int,
    ks: Sequence[int] = DEFAULT_KS,
    revisitop_pk: bool = False,
) -> dict[str, Any]:
    """:func:`mean_scores` of :func:`query_scores`: mAP, mean precision@k, each query's AP."""
    return mean_scores(query_scores(orders, truth, n_database, ks, revisitop_pk), ks)


def rank_chunks(
    queries: torch.Tensor,
    database: torch.Tensor,
    exclude: Sequence[int | None] | None = None,
    chunk_elems: int = 1 << 24,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(first query, database indices [b, N] by decreasing cosine similarity, similarities)``
    for blocks of queries, so that memory stays at ``chunk_elems`` similarities.

    ``exclude[q]`` (a database index or None) goes to the end of query q's ranking with
    similarity ``-inf``: an image never retrieves itself."""
    step = max(1, chunk_elems // max(1, database.shape[0]))
    for start in range(0, queries.shape[0], step):
        sim = queries[start : start + step] @ database.T
        if exclude is not None:
            for j, i in enumerate(exclude[start : start + step]):
                if i is not None:
                    sim[j, i] = float("-inf")
        sims, order = sim.sort(dim=1, descending=True)
        yield start, order.numpy(), sims.numpy()


def search(
    queries: torch.Tensor,
    database: torch.Tensor,
    truths: dict[str, Sequence[QueryTruth]],
    ks: Sequence[int],
    topk: int,
    revisitop_pk: bool = False,
    exclude: Sequence[int | None] | None = None,
) -> tuple[dict[str, dict[str, Any]], np.ndarray, np.ndarray]:
    """Rank the database for every query (in blocks) and score each ground truth of
    ``truths``; returns the scores by name and the ``topk`` best (indices, similarities)."""
    per_query: dict[str, list] = {name: [] for name in truths}
    tops, top_sims = [], []
    n = database.shape[0]
    for start, orders, sims in rank_chunks(queries, database, exclude):
        tops.append(orders[:, :topk])
        top_sims.append(sims[:, :topk])
        for name, truth in truths.items():
            block = truth[start : start + len(orders)]
            per_query[name] += query_scores(orders, block, n, ks, revisitop_pk)
    scores = {name: mean_scores(values, ks) for name, values in per_query.items()}
    return scores, np.concatenate(tops), np.concatenate(top_sims)


def write_neighbours(
    path: str | Path,
    query_names: Sequence[str],
    database_names: Sequence[str],
    orders: np.ndarray,
    sims: np.ndarray,
    topk: int,
) -> None:
    """CSV ``query,rank,neighbour,similarity`` with the ``topk`` best of each query."""
    rows = [
        [name, r + 1, database_names[orders[q, r]], f"{sims[q, r]:.6f}"]
        for q, name in enumerate(query_names)
        for r in range(min(topk, orders.shape[1]))
        if np.isfinite(sims[q, r])
    ]
    write_csv(path, ["query", "rank", "neighbour", "similarity"], rows)


# ------------------------------------------------------------------ revisited Oxford and Paris


@dataclass
class RevisitopSet:
    """A revisitop data set: image and query files, ground truth per query."""

    name: str
    gnd_file: Path
    images: list[Path]
    queries: list[Path]
    gnd: list[dict[str, Any]]


def find_revisitop(data: str | Path, dataset: str | None = None) -> Path:
    """The ground-truth file of ``data``: ``data/gnd_<name>.pkl``, or
    ``data/<dataset>/gnd_<dataset>.pkl`` (the revisitop download layout)."""
    root = Path(data)
    if not root.is_dir():
        raise DinoError(
            f"{root} is not a folder; pass --data with the revisitop folder (holding "
            "roxford5k/ or rparis6k/), or --queries and --database folders"
        )
    if dataset is not None:
        if dataset not in REVISITOP_DATASETS:
            raise DinoError(
                f"unknown --dataset {dataset!r}; choose {' or '.join(REVISITOP_DATASETS)}"
            )
        for candidate in (root / dataset / f"gnd_{dataset}.pkl", root / f"gnd_{dataset}.pkl"):
            if candidate.is_file():
                return candidate
        raise DinoError(
            f"no gnd_{dataset}.pkl in {root} or {root / dataset}; download the revisitop data "
            "(gnd file and jpg/ folder) as its README explains"
        )
    here = sorted(root.glob("gnd_*.pkl"))
    below = sorted(p for name in REVISITOP_DATASETS for p in root.glob(f"{name}/gnd_{name}.pkl"))
    found = here or below
    if len(found) == 1:
        return found[0]
    if not found:
        raise DinoError(
            f"no revisitop ground truth (gnd_roxford5k.pkl, gnd_rparis6k.pkl) in {root}; pass "
            "the revisitop folder, or --queries and --database folders for plain retrieval"
        )
    names = ", ".join(p.stem.removeprefix("gnd_") for p in found)
    raise DinoError(f"{root} holds several data sets ({names}); choose one with --dataset")


def read_revisitop(gnd_file: Path) -> RevisitopSet:
    """Read and check a revisitop ground truth against its ``jpg/`` folder. The file is a
    pickle: only read files you trust."""
    what = f"the ground truth {gnd_file}"
    try:
        with open(gnd_file, "rb") as f:
            cfg = pickle.load(f)
    except Exception as exc:
        raise DinoError(
            f"cannot read {what} ({exc or type(exc).__name__}); download it again"
        ) from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("imlist", "qimlist", "gnd")):
        raise DinoError(f"{what} is not a revisitop file (no imlist, qimlist and gnd)")
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise DinoError(
            f"{what} does not match its queries: {len(gnd)} ground-truth entries for "
            f"{len(qimlist)} queries"
        )
    n = len(imlist)
    for q, g in enumerate(gnd):
        if not isinstance(g, dict) or not all(k in g for k in ("easy", "hard", "junk")):
            raise DinoError(f"{what}: entry {q} lacks the easy, hard and junk lists")
        for key in ("easy", "hard", "junk"):
            idx = np.asarray(g[key], dtype=np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise DinoError(
                    f"{what} does not match its images: query {qimlist[q]} names image index "
                    f"{int(idx.max() if idx.max() >= n else idx.min())} ({key}), but imlist has "
                    f"{n} images"
                )
    folder = gnd_file.parent / "jpg"
    images = [folder / f"{name}.jpg" for name in imlist]
    queries = [folder / f"{name}.jpg" for name in qimlist]
    missing = [p for p in images + queries if not p.is_file()]
    if missing:
        raise DinoError(
            f"{what} does not match the images: {len(missing)} of its files are missing from "
            f"{folder} (first: {missing[0].name}); download the images or pass the matching "
            "ground truth"
        )
    if not queries:
        raise DinoError(f"{what} lists no query")
    name = gnd_file.stem.removeprefix("gnd_")
    return RevisitopSet(name, gnd_file, images, queries, gnd)


def revisitop_retrieval(
    model: nn.Module,
    data: str | Path,
    dataset: str | None = None,
    imsize: int = 224,
    multiscale: bool = False,
    crop_queries: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    neighbours_csv: str | Path | None = None,
    topk: int = 10,
) -> dict[str, Any]:
    """mAP and mP@k of revisited Oxford or Paris for the Easy, Medium and Hard protocols."""
    ds = read_revisitop(find_revisitop(data, dataset))
    features = _Features(model, imsize, multiscale, device, num_workers)
    db = features(ds.images, "database")
    if crop_queries:
        boxes = []
        for q, g in enumerate(ds.gnd):
            if "bbx" not in g:
                raise DinoError(f"{ds.gnd_file} has no query box (bbx) for query {q}")
            boxes.append(g["bbx"])
        q_feats = torch.cat(
            [features.one(_crop(ds.queries[q], boxes[q])) for q in range(len(ds.queries))]
        )
    else:
        q_feats = features(ds.queries, "queries")
    truths = {
        protocol: [QueryTruth(_indices(g, pos), _indices(g, ("junk", *junk))) for g in ds.gnd]
        for protocol, (pos, junk) in PROTOCOLS.items()
    }
    scores, orders, sims = search(q_feats, db, truths, ks, topk, revisitop_pk=True)
    res: dict[str, Any] = {
        "dataset": ds.name,
        "mAP": {p: s["mAP"] for p, s in scores.items()},
        "mP@k": {p: s["precision@k"] for p, s in scores.items()},
    }
    res.update(
        {
            "scores": "fractions in [0, 1]",
            "n_queries": len(ds.queries),
            "n_images": len(ds.images),
            "imsize": imsize,
            "multiscale": multiscale,
            "crop_queries": crop_queries,
            "feature_dim": int(db.shape[1]),
        }
    )
    if neighbours_csv is not None:
        write_neighbours(
            neighbours_csv,
            [p.stem for p in ds.queries],
            [p.stem for p in ds.images],
            orders,
            sims,
            topk,
        )
        res["neighbours"] = str(neighbours_csv)
    return res


class _Features:
    """The global features of images for ``model``: shrunk to ``imsize`` and normalized with
    the model's input statistics, at one scale or the three of ``multiscale``."""

    def __init__(
        self,
        model: nn.Module,
        imsize: int,
        multiscale: bool,
        device: torch.device | str,
        num_workers: int,
    ) -> None:
        self.model, self.multiscale, self.num_workers = model, multiscale, num_workers
        self.device = torch.device(device)
        self.thumb = Thumbnail(imsize, *input_stats(model))

    def __call__(self, paths: Sequence[Path], desc: str) -> torch.Tensor:
        """``[N, D]`` features of the image files ``paths`` (progress labelled ``desc``)."""
        return extract_global(
            self.model, paths, self.thumb, self.multiscale, self.device, self.num_workers, desc
        )

    def one(self, img: Image.Image) -> torch.Tensor:
        """``[1, D]`` feature of one image."""
        x = self.thumb(img)[None].to(self.device)
        return global_feature(self.model, x, _scales(self.multiscale)).cpu()


def _scales(multiscale: bool) -> tuple[float, ...]:
    return SCALES if multiscale else (1.0,)


def _crop(path: Path, box: Sequence[float]) -> Image.Image:
    try:
        img = load_image(path)
    except BadImage as exc:
        raise DinoError(f"cannot read the image {exc}; replace or remove it") from None
    x1, y1, x2, y2 = (float(v) for v in box)
    return img.crop((math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)))


def _indices(g: dict[str, Any], keys: Sequence[str]) -> np.ndarray:
    parts = [np.asarray(g[k], dtype=np.int64).reshape(-1) for k in keys]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def input_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalization (mean, std) of a loaded backbone: its run's, else ImageNet's."""
    info = getattr(model, "weights_info", None)
    if info is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(info.mean), tuple(info.std)


# ------------------------------------------------------------------ plain folders


@dataclass
class ImageFolder:
    """The images below a folder (sorted) and their class (first-level subfolder) names;
    ``classes`` is None when the images do not all sit in class subfolders."""

    root: Path
    files: list[Path]
    classes: list[str] | None


def read_folder(path: str | Path, what: str) -> ImageFolder:
    """The images of a folder given as ``what`` (``--queries`` ...), recursively."""
    root = Path(path)
    if not root.is_dir():
        raise DinoError(f"{what} {root} is not a folder; pass a folder of images")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )
    if not files:
        raise DinoError(
            f"{what} {root} holds no image; put image files (jpg, png ...) in it or in subfolders"
        )
    rel = [p.relative_to(root).parts for p in files]
    classes = [parts[0] for parts in rel] if all(len(parts) >= 2 for parts in rel) else None
    return ImageFolder(root, files, classes)


def folder_retrieval(
    model: nn.Module,
    queries: str | Path,
    database: str | Path,
    imsize: int = 224,
    multiscale: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    neighbours_csv: str | Path | None = None,
    topk: int = 10,
) -> dict[str, Any]:
    """Top-k neighbours of each query among the database images; mAP and precision@k when both
    folders have class subfolders."""
    qf = read_folder(queries, "--queries")
    dbf = read_folder(database, "--database")
    features = _Features(model, imsize, multiscale, device, num_workers)
    db = features(dbf.files, "database")
    q = features(qf.files, "queries")
    index = {p.resolve(): i for i, p in enumerate(dbf.files)}
    itself = [index.get(p.resolve()) for p in qf.files]
    truths: dict[str, list[QueryTruth]] = {}
    if qf.classes is not None and dbf.classes is not None:
        db_classes = np.asarray(dbf.classes)
        # an image is not relevant to itself: it is junk for its own query
        truths["classes"] = [
            QueryTruth(
                np.setdiff1d(np.flatnonzero(db_classes == c), [] if i is None else [i]),
                np.asarray([] if i is None else [i], dtype=np.int64),
            )
            for c, i in zip(qf.classes, itself, strict=True)
        ]
    scores, orders, sims = search(q, db, truths, ks, topk, exclude=itself)
    res: dict[str, Any] = {
        "scores": "fractions in [0, 1]",
        "n_queries": len(qf.files),
        "n_database": len(dbf.files),
        "imsize": imsize,
        "multiscale": multiscale,
        "feature_dim": int(db.shape[1]),
    }
    if "classes" in scores:
        scored = scores["classes"]
        res["mAP"] = scored["mAP"]
        res["precision@k"] = scored["precision@k"]
        res["scored_queries"] = scored["scored_queries"]
        if scored["mAP"] is None:
            log.warning(
                "no query class has images in the database folder, so there is no mAP; "
                "name the class subfolders alike in both folders"
            )
    if neighbours_csv is not None:
        write_neighbours(
            neighbours_csv,
            [str(p.relative_to(qf.root)) for p in qf.files],
            [str(p.relative_to(dbf.root)) for p in dbf.files],
            orders,
            sims,
            topk,
        )
        res["neighbours"] = str(neighbours_csv)
    return res


def data_or_folders(
    data: object,
    folders: tuple[object, object],
    flags: tuple[str, str],
    layout: str,
    task: str,
) -> bool:
    """Whether the inputs are two plain folders (given as ``flags``) rather than a ``layout``
    data set given as ``--data``; raise :class:`DinoError` unless exactly one of the two is
    given, in full."""
    plain = any(f is not None for f in folders)
    first, second = flags
    if plain and data is not None:
        raise DinoError(f"pass either --data ({layout}) or {first} and {second}, not both")
    if plain and any(f is None for f in folders):
        raise DinoError(f"plain {task} needs both {first} and {second} folders")
    if not plain and data is None:
        raise DinoError(f"pass --data with a {layout} folder, or {first} and {second}")
    return plain


def image_retrieval(
    backbone: Backbone,
    data: str | Path | None = None,
    dataset: str | None = None,
    queries: str | Path | None = None,
    database: str | Path | None = None,
    imsize: int = 224,
    multiscale: bool = False,
    crop_queries: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    neighbours_csv: str | Path | None = None,
    topk: int = 10,
    json_out: str | Path | None = None,
    device: str = "auto",
    num_workers: int = 0,
) -> dict[str, Any]:
    """Image retrieval with frozen features (see the module docstring).

    Args:
        backbone: a module, weights for :func:`dino.load_backbone`, or a function returning the
            module (called once the inputs are checked).
        data: a revisitop folder (``gnd_<name>.pkl`` + ``jpg/``, or its parent with
            ``roxford5k/`` / ``rparis6k/``); or else:
        queries, database: two folders of images (plain retrieval).
        dataset: ``roxford5k`` or ``rparis6k`` when ``data`` holds both.
        imsize: longer side at most this many px (224 for Oxford, 512 for Paris in the paper).
        multiscale: average the features at scales 1, 1/sqrt(2), 1/2.
        crop_queries: crop revisitop queries to their box (revisitop's own protocol; the
            paper's script uses the whole query image).
        ks: the k of precision@k.
        neighbours_csv: write the ``topk`` neighbours of each query there (must not exist).
        json_out: also write the results there as JSON (must not exist).
        device, num_workers: where the network runs; DataLoader workers (-1: auto).

    Returns the scores (fractions in [0, 1]) and counts.
    """
    from dino.devices import resolve_device

    if imsize < 1:
        raise DinoError(f"--imsize must be a positive number of pixels, got {imsize}")
    if any(k < 1 for k in ks) or topk < 1:
        raise DinoError("--k and --topk must be at least 1")
    plain = data_or_folders(
        data, (queries, database), ("--queries", "--database"), "revisitop", "retrieval"
    )
    refuse_existing(neighbours_csv, "--neighbours")
    refuse_existing(json_out, "--json")
    if plain:
        # read both folders before loading weights: a typo fails fast
        read_folder(queries, "--queries")  # type: ignore[arg-type]
        read_folder(database, "--database")  # type: ignore[arg-type]
    else:
        read_revisitop(find_revisitop(data, dataset))  # type: ignore[arg-type]
    dev = resolve_device(device)
    model = resolve_backbone(backbone, dev)
    if plain:
        res = folder_retrieval(
            model,
            queries,  # type: ignore[arg-type]
            database,  # type: ignore[arg-type]
            imsize,
            multiscale,
            ks,
            dev,
            num_workers,
            neighbours_csv,
            topk,
        )
    else:
        res = revisitop_retrieval(
            model,
            data,  # type: ignore[arg-type]
            dataset,
            imsize,
            multiscale,
            crop_queries,
            ks,
            dev,
            num_workers,
            neighbours_csv,
            topk,
        )
    info = getattr(model, "weights_info", None)
    res["weights"] = info.source if info else None
    if json_out is not None:
        write_json(json_out, res)
    return res
