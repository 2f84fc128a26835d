"""The k-NN a run reports (``results.json``, ``metrics.jsonl``) is ``dino knn``'s of the same
weights: fp32 features whatever the run's precision, the same bank, queries and votes."""

from __future__ import annotations

import pytest

import dino.training.knn
from dino.config_load import load_config
from dino.data.fashion_mnist import FASHION_MNIST_DIRS
from dino.eval.api import knn_eval
from dino.eval.views import EvalView
from dino.training.trainer import Trainer


@pytest.mark.skipif(
    not any((d / "train-images-idx3-ubyte.gz").exists() for d in FASHION_MNIST_DIRS),
    reason="Fashion-MNIST is not installed",
)
@pytest.mark.slow  # reads Fashion-MNIST twice: about 10 s on 2 cores
def test_a_bf16_run_reports_the_fp32_knn_of_dino_knn(tmp_path, monkeypatch) -> None:
    cfg = load_config(None, {
        "data": "fashion-mnist", "subset": 256, "batch_size": 16, "arch": "vit_pico",
        "depth": 1, "patch_size": 4, "global_size": 16, "local_size": 8, "local_crops": 2,
        "out_dim": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "eval_resize": 16,
        "eval_crop": 16, "knn_k": [5, 20], "precision": "bf16", "device": "cpu",
        "num_workers": 0, "output_dir": str(tmp_path / "run"),
    })  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.precision == "bf16"  # the training step runs in bf16
    dtypes = []
    extract = dino.training.knn.extract

    def recording(model, batches, autocast_dtype=None, progress=None):
        dtypes.append(autocast_dtype)
        return extract(model, batches, autocast_dtype, progress)

    monkeypatch.setattr(dino.training.knn, "extract", recording)
    ours = trainer.knn()
    assert dtypes == [None, None]  # bank and queries: fp32
    d = cfg.data
    view = EvalView(d.eval_resize, d.eval_crop, list(d.mean), list(d.std))
    backbone = trainer.learner.teacher.backbone
    theirs = knn_eval(backbone, "fashion-mnist", [5, 20], view=view, subset=256, batch_size=512)
    assert ours == theirs["knn"]
