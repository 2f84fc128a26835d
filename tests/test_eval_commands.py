"""``dino extract``, ``dino knn`` and ``dino linear`` end to end on a tiny folder of PNGs.

The backbone is a random ViT-pico (depth 2) in a run folder laid out as ``dino train`` leaves
it; the two classes differ in color, so even random features separate them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_weights import make_run

from dino.cli import main
from dino.data.fashion_mnist import FASHION_MNIST_DIRS
from dino.eval.linear_head import ProbeFeatures
from dino.eval.views import resolve_view
from dino.models.backbones import vit

torch.set_num_threads(1)
CLASSES = ("apples", "sky")


def write_images(root: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = (32, 32) if i % 3 else (40, 36)  # some need the resize
            base = np.array([200, 60, 40]) if c == 0 else np.array([50, 110, 220])
            pix = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pix, "RGB")
            if i == 1:
                img = img.convert("RGBA")
            img.save(root / name / f"{i:02d}.png")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_images(root / "train", 10, 0)
    write_images(root / "val", 5, 1)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    make_run(run, "vit_pico", 4, 2, 32)
    return run


def test_knn_command(data_root, run_dir, tmp_path, capsys) -> None:
    out = tmp_path / "knn.json"
    rc = main(["knn", "--weights", str(run_dir), "--data", str(data_root), "--output", str(out),
               "--num-workers", "0", "--batch-size", "8"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "20" in printed
    res = json.loads(out.read_text())
    assert (res["n_train"], res["n_val"], res["feature_dim"]) == (20, 10, 96)
    assert set(res["knn"]) == {"10", "20"}  # 100 and 200 exceed the bank of 20: left out
    assert res["view"] == {"resize": 32, "crop": 32, "mean": [0.3] * 3, "std": [0.35] * 3}
    assert res["knn"]["10"]["top1"] >= 80.0
    assert res["knn"]["10"]["top5"] == 100.0  # 2 classes


def test_knn_command_with_reference_weights_and_view_flags(data_root, tmp_path) -> None:
    torch.manual_seed(0)
    torch.save(vit("vit_small", 16, 32, 1).state_dict(), tmp_path / "ref.pth")
    out = tmp_path / "knn.json"
    rc = main(["knn", "--weights", str(tmp_path / "ref.pth"), "--data", str(data_root),
               "--eval-resize", "48", "--eval-crop", "32", "--k", "5", "--temperature", "0.1",
               "--output", str(out), "--num-workers", "0"])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["view"]["resize"] == 48 and res["view"]["mean"] == [0.485, 0.456, 0.406]
    assert list(res["knn"]) == ["5"] and res["feature_dim"] == 384


def test_linear_cached_command_and_resume(data_root, run_dir, tmp_path, capsys) -> None:
    out = tmp_path / "lin"
    args = ["linear", "--weights", str(run_dir), "--data", str(data_root), "--cached",
            "--epochs", "30", "--batch-size", "8", "--lr", "0.5", "--output-dir", str(out),
            "--num-workers", "0"]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["cached"] and res["n_last_blocks"] == 2  # 4 by default, clipped to the depth
    assert res["feature_dim"] == 2 * 96 and res["num_classes"] == 2
    assert len(res["history"]) == 30 and res["top1"] >= 80.0 and res["top5"] == 100.0
    assert (out / "checkpoint.pth").is_file() and (out / "features.pt").is_file()
    assert "top-1" in capsys.readouterr().out
    # a rerun finds the finished checkpoint and the feature cache: same numbers, no training
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["top1"] == res["top1"] and len(again["history"]) == 30
    # another setup in the same folder is refused, --restart overrides
    assert main(args[:-4] + ["--output-dir", str(out), "--num-workers", "0", "--avgpool"]) == 2
    assert "--restart" in capsys.readouterr().err
    assert main(args + ["--avgpool", "--restart", "--epochs", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["avgpool"] and res["feature_dim"] == 3 * 96 and len(res["history"]) == 2


def test_linear_augmented_checkpoint_resume(data_root, run_dir, tmp_path) -> None:
    out = tmp_path / "lin"
    base = ["linear", "--weights", str(run_dir), "--data", str(data_root), "--batch-size", "8",
            "--output-dir", str(out), "--num-workers", "0", "--n-last-blocks", "1"]  # fmt: skip
    assert main(base + ["--epochs", "1"]) == 0
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1
    assert main(base + ["--epochs", "2"]) == 0  # continues from epoch 1
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    res = json.loads((out / "results.json").read_text())
    assert not res["cached"] and 0.0 <= res["top1"] <= 100.0 and res["feature_dim"] == 96


def test_probe_features_match_the_backbone() -> None:
    torch.manual_seed(0)
    model = vit("vit_pico", 4, 32, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        one = ProbeFeatures(model, 1)(x)
        four = ProbeFeatures(model, 4, avgpool=True)(x)
        assert torch.allclose(one, model(x), atol=1e-5)  # last [CLS] after the norm
    assert four.shape == (2, 4 * 96)  # 3 blocks + pooled patches
    assert torch.allclose(four[:, 2 * 96 : 3 * 96], one, atol=1e-5)


def test_extract_command(data_root, run_dir, tmp_path) -> None:
    src = tmp_path / "imgs"
    write_images(src, 3, 2)
    (src / "sky" / "zz-broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "feats"
    rc = main(["extract", "--weights", str(run_dir), "--data", str(src), "--output", str(out),
               "--num-workers", "0", "--batch-size", "4"])  # fmt: skip
    assert rc == 0
    feats = np.load(out / "features.npy")
    assert feats.shape == (6, 96) and feats.dtype == np.float32
    rows = list(csv.DictReader(open(out / "index.csv")))
    assert [r["class"] for r in rows] == ["apples"] * 3 + ["sky"] * 3
    assert all(Path(r["path"]).is_file() for r in rows)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 6 and meta["unreadable"][0].endswith("zz-broken.png")
    # the features are the backbone's on the eval view
    from dino.models.weights import load_backbone

    backbone = load_backbone(run_dir)
    img = Image.open(rows[4]["path"]).convert("RGB")
    from dino.eval.views import eval_transform

    view = resolve_view(str(src), backbone.weights_info.run_config)
    with torch.no_grad():
        want = backbone(eval_transform(view)(img)[None])[0].numpy()
    assert np.abs(feats[4] - want).max() < 1e-4


def test_user_errors_exit_2(data_root, run_dir, tmp_path, capsys) -> None:
    rc = main(["knn", "--weights", str(tmp_path / "nope"), "--data", str(data_root)])
    assert rc == 2 and "dino: error:" in capsys.readouterr().err
    rc = main(["knn", "--weights", str(run_dir), "--data", str(data_root / "train" / "sky")])
    assert rc == 2 and "train/ and val/" in capsys.readouterr().err
    rc = main(
        [
            "linear",
            "--weights",
            str(run_dir),
            "--data",
            str(data_root),
            "--eval-resize",
            "16",
            "--eval-crop",
            "32",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert rc == 2 and "--eval-resize" in capsys.readouterr().err


@pytest.mark.skipif(
    not any((d / "t10k-images-idx3-ubyte.gz").exists() for d in FASHION_MNIST_DIRS),
    reason="Fashion-MNIST is not installed",
)
def test_knn_on_fashion_mnist_uses_the_preset_view(run_dir, tmp_path) -> None:
    out = tmp_path / "knn.json"
    rc = main(["knn", "--weights", str(run_dir), "--data", "fashion-mnist", "--subset", "60",
               "--k", "10", "--output", str(out)])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["view"]["crop"] == 28 and res["view"]["resize"] == 28
    assert res["view"]["mean"] == [0.3] * 3  # the run's statistics
    assert (res["n_train"], res["n_val"]) == (60, 60)
