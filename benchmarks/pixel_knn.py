"""Weighted k-NN of Fashion-MNIST on raw pixels: the baseline a learned feature has to beat.

The same vote as every k-NN evaluation of the package (:func:`dino.eval.neighbors.weighted_knn`:
cosine similarity, T = 0.07, bank = the 60 000 training images, queries = the 10 000 test
images), with each image's 784 pixels as its feature: scaled to 0..1 ("raw"), and normalized
with the built-in preset's mean and std (what the network sees). Deterministic; about a minute
on 2 CPU cores.

    python benchmarks/pixel_knn.py
"""

from __future__ import annotations

import torch

from dino.config_load import load_config
from dino.data.datasets import fashion_mnist
from dino.eval.neighbors import weighted_knn

KS = (10, 20, 100, 200)


def main() -> None:
    train, test = fashion_mnist("train"), fashion_mnist("test")
    data = load_config("fashion-mnist").data
    mean, std = data.mean[0], data.std[0]  # gray images: the three channels share them
    features = {
        "raw pixels (0..1)": lambda x: x.float().flatten(1) / 255,
        f"normalized pixels ((x - {mean}) / {std})": lambda x: (
            (x.float().flatten(1) / 255 - mean) / std
        ),
    }
    print(f"{'features':<44} " + " ".join(f"{'k=' + str(k):>13}" for k in KS))
    for name, f in features.items():
        res = weighted_knn(f(train.images), train.labels, f(test.images), test.labels, ks=KS)
        cells = " ".join(f"{res[str(k)]['top1']:6.2f}/{res[str(k)]['top5']:6.2f}" for k in KS)
        print(f"{name:<44} {cells}")
    print("(top-1 / top-5, percent)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
