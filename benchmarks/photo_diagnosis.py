"""What does a network's [CLS] feature key on in the built-in photos: the object or the background?

On ``fashion-mnist-photos`` (docs/segmentation.md) every scene has two labels: the object's
class (10) and the kind of its background (12 kinds shared by all classes). For each feature
(raw pixels, colour statistics, and the [CLS] feature of each network given) this measures:

* ``knn_object``: weighted k-NN (k = 20, T = 0.07) of the object's class, bank = the first
  ``--bank`` train scenes, queries = the first ``--queries`` test scenes;
* ``knn_background``: the same k-NN of the background kind (chance 8.3 %);
* ``knn_object_alone``: the object's class of each test object drawn alone on a flat grey
  frame (same place, size, tint), against the bank of whole train scenes;
* ``same_scene_from_background``, ``same_scene_from_object``: retrieval among the whole test
  scenes: the share (%) of queries whose nearest neighbour is their own scene, when the query is
  the scene with its object removed, or its object alone on grey.

A feature that keys on the object scores high on ``knn_object``, ``knn_object_alone`` and
``same_scene_from_object``; one that keys on the background, on ``knn_background`` and
``same_scene_from_background``.

    python benchmarks/photo_diagnosis.py --run plain=/work/runs/ph-plain --random-like \\
        /work/runs/ph-plain --output results/photo-diagnosis.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from harness import RESULTS_DIR, stamp

from dino.data.datasets import TensorImages
from dino.data.fashion_mnist import read_fashion_mnist
from dino.data.photo_scenes import KINDS, PHOTOS, background_kind, photo_scene_params
from dino.data.scene_render import render_scenes
from dino.eval.features import extract, tensor_eval_batches
from dino.eval.neighbors import weighted_knn
from dino.eval.views import resolve_view
from dino.models.weights import load_backbone

K = 20


def draw(
    split: str, n: int, variants: tuple[str, ...] = ("whole",)
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The first ``n`` photo scenes of ``split`` in each of ``variants``: whole, with the object
    removed (``background``) or the object alone on a flat grey frame (``object``), each drawn
    from the same parameters; images by variant, object classes, background kinds."""
    sources, labels = read_fashion_mnist(split)
    images: dict[str, list[torch.Tensor]] = {v: [] for v in variants}
    kinds = []
    for start in range(0, n, 256):
        idx = list(range(start, min(n, start + 256)))
        p, region_kinds = photo_scene_params(split, idx, sources, labels)
        kinds.append(torch.from_numpy(background_kind(p, region_kinds)))
        for variant in variants:
            q = copy.deepcopy(p)
            if variant == "background":
                q.present[:, -1] = False
            elif variant == "object":
                q.present[:, :-1] = False
                q.colors[:] = 0.42
                q.texture_weight[:] = 0.0
                q.blotch_weight[:] = 0.0
                q.noise[:] = 0.0
            images[variant].append(render_scenes(sources, q)[0])
    return {v: torch.cat(x) for v, x in images.items()}, labels[:n].clone(), torch.cat(kinds)


def colour_stats(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and standard deviation of each image: a 6-d colour feature."""
    x = x.float() / 255
    return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def knn(bank: torch.Tensor, bank_y: torch.Tensor, q: torch.Tensor, q_y: torch.Tensor) -> float:
    return round(weighted_knn(bank, bank_y, q, q_y, ks=(K,))[str(K)]["top1"], 2)


def own_first(gallery: torch.Tensor, queries: torch.Tensor) -> float:
    """% of queries whose most similar gallery row (cosine) is the query's own index."""
    g, q = F.normalize(gallery.float(), dim=1), F.normalize(queries.float(), dim=1)
    hits = 0
    for s in range(0, len(q), 1000):
        best = (q[s : s + 1000] @ g.T).argmax(1)
        hits += int((best == torch.arange(s, s + len(best))).sum())
    return round(100.0 * hits / len(q), 2)


def measure(feature: Callable[[torch.Tensor], torch.Tensor], data: dict) -> dict[str, float]:
    f = {name: feature(images) for name, (images, _, _) in data.items()}
    bank_y, bank_k = data["bank"][1], data["bank"][2]
    q_y, q_k = data["whole"][1], data["whole"][2]
    return {
        "knn_object": knn(f["bank"], bank_y, f["whole"], q_y),
        "knn_background": knn(f["bank"], bank_k, f["whole"], q_k),
        "knn_object_alone": knn(f["bank"], bank_y, f["object"], q_y),
        "same_scene_from_background": own_first(f["whole"], f["background"]),
        "same_scene_from_object": own_first(f["whole"], f["object"]),
    }


def network_feature(model: torch.nn.Module, view) -> Callable[[torch.Tensor], torch.Tensor]:
    def feature(images: torch.Tensor) -> torch.Tensor:
        ds = TensorImages(images, torch.zeros(len(images), dtype=torch.long), [], "photos")
        batches = tensor_eval_batches(
            ds, view.resize, view.crop, view.mean, view.std, 500, torch.device("cpu")
        )
        return extract(model, batches)[0]

    return feature


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=[], metavar="NAME=WEIGHTS")
    p.add_argument("--random-like", default=None, metavar="RUN", help="add the untrained net")
    p.add_argument("--bank", type=int, default=20000)
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--output", default=str(RESULTS_DIR / "photo-diagnosis.json"))
    args = p.parse_args(argv)

    t0 = time.time()
    bank, bank_labels, bank_kinds = draw("train", args.bank)
    test, test_labels, test_kinds = draw("test", args.queries, ("whole", "background", "object"))
    data = {"bank": (bank["whole"], bank_labels, bank_kinds)}
    data.update({v: (x, test_labels, test_kinds) for v, x in test.items()})
    print(f"drew the scenes in {time.time() - t0:.0f} s", flush=True)
    features: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "raw pixels": lambda x: x.float().flatten(1) / 255 - 0.42,
        "colour statistics": colour_stats,
    }
    nets = dict(item.split("=", 1) for item in args.run)
    if args.random_like:
        nets["untrained"] = "random"
    for name, weights in nets.items():
        like = args.random_like if weights == "random" else None
        model = load_backbone(weights, like=like)
        view = resolve_view(PHOTOS, model.weights_info.run_config)
        features[name] = network_feature(model, view)
    rows = {}
    for name, feature in features.items():
        rows[name] = measure(feature, data)
        print(
            f"{name:20s} " + "  ".join(f"{k} {v:6.2f}" for k, v in rows[name].items()), flush=True
        )
    result = {
        "rows": rows,
        "runs": nets,
        "bank": args.bank,
        "queries": args.queries,
        "chance": {"object": 10.0, "background": round(100 / len(KINDS), 2)},
        "kinds": [dataclasses.asdict(k) for k in KINDS],
        "stamp": stamp(torch.device("cpu")),
        "command": " ".join(["python", "benchmarks/photo_diagnosis.py", *(argv or sys.argv[1:])]),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
