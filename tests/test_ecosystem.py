"""Fitting the ecosystem: timm / torchvision backbones, recipe presets, ``--init``, ``dino
export`` (timm safetensors + ONNX), TensorBoard events and ``dino report``.

Every training run is tiny (256 Fashion-MNIST images, one epoch of 8 steps, 32 px global and
16-32 px local crops, K = 64, fp32 on one CPU thread), so the file runs in well under a minute.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from dino.cli import main
from dino.config import Config
from dino.config_load import load_config
from dino.data.fashion_mnist import FASHION_MNIST_DIRS
from dino.errors import DinoError
from dino.models.backbones import vit
from dino.models.export import timm_spec
from dino.models.weights import WeightsInfo, load_backbone
from dino.training.networks import build_networks

torch.set_num_threads(1)

FASHION = pytest.mark.skipif(
    not any((d / "train-images-idx3-ubyte.gz").exists() for d in FASHION_MNIST_DIRS),
    reason="Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed",
)

TINY = [
    "--subset", "256", "--epochs", "1", "--batch-size", "32", "--global-size", "32",
    "--patch-size", "4", "--local-size", "16",
    "--local-crops", "2", "--out-dim", "64", "--head-hidden-dim", "64", "--eval-every", "0",
    "--precision", "fp32", "--eval-resize", "32", "--eval-crop", "32", "--num-workers", "0",
]  # fmt: skip


def train_tiny(run: Path, *extra: str) -> dict:
    assert main(["train", *TINY, "--output-dir", str(run), *extra]) == 0
    return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def pico_run(tmp_path_factory) -> Path:
    """The built-in preset's ViT-pico (patch 4, depth 6), one tiny epoch, TensorBoard on."""
    if not any((d / "train-images-idx3-ubyte.gz").exists() for d in FASHION_MNIST_DIRS):
        pytest.skip("Fashion-MNIST is not installed")
    run = tmp_path_factory.mktemp("runs") / "pico"
    train_tiny(run, "--local-size", "16", "--log-every", "2")
    return run


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).float()


# ---------------------------------------------------------------- presets


PRESETS = ("vit_small_100ep", "vit_small_300ep_boost", "vit_base", "resnet50")


@pytest.mark.parametrize("name", PRESETS)
def test_preset_show(name: str, capsys) -> None:
    assert main(["config", "show", name]) == 0
    out = capsys.readouterr().out
    assert "Reference command" in out  # the file itself is shown, with its sources
    assert "# the full config it gives" in out


def test_preset_values() -> None:
    ref = Config()
    vanilla = load_config("vit_small_100ep")
    assert vanilla.to_dict() == {
        **ref.to_dict(),
        "optim": {**ref.to_dict()["optim"], "optimizer": "adamw"},
    }
    boost = load_config("vit_small_300ep_boost")
    assert (boost.optim.epochs, boost.loss.teacher_temp) == (300, 0.07)
    assert boost.loss.warmup_teacher_temp_epochs == 30 and not boost.model.norm_last_layer
    assert boost.model.arch == "vit_small" and boost.data.local_crops == 8
    base = load_config("vit_base")
    assert (base.model.arch, base.model.patch_size, base.model.norm_last_layer) == (
        "vit_base",
        16,
        True,
    )
    rn = load_config("resnet50")
    assert (rn.model.arch, rn.optim.optimizer, rn.optim.lr) == ("tv:resnet50", "sgd", 0.03)
    assert rn.optim.weight_decay == rn.optim.weight_decay_end == 1e-4
    assert rn.data.global_scale == [0.14, 1.0] and rn.data.local_scale == [0.05, 0.14]
    assert not rn.model.use_bn_in_head  # the reference command's head: no BatchNorm


def test_optimizer_field() -> None:
    with pytest.raises(DinoError, match="optimizer must be"):
        load_config(None, {"optimizer": "adam"})
    with pytest.raises(DinoError, match="needs a model name"):
        load_config(None, {"init": "timm:"})


# ---------------------------------------------------------------- backbones


def optimizer_kind(run: Path) -> str:
    ckpt = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=False)
    return "adamw" if "betas" in ckpt["optimizer"]["param_groups"][0] else "sgd"


@FASHION
def test_timm_vit_trains_and_exports(tmp_path) -> None:
    res = train_tiny(tmp_path / "run", "--arch", "test_vit", "--local-size", "16")
    assert res["knn"]["20"]["top1"] > 10
    assert optimizer_kind(tmp_path / "run") == "adamw"
    model = load_backbone(tmp_path / "run")
    assert model.embed_dim == 64 and model.weights_info.arch == "test_vit"
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "x")]) == 0
    import timm

    cfg = json.loads((tmp_path / "x" / "config.json").read_text())
    assert cfg["architecture"] == "test_vit"
    loaded = timm.create_model(
        cfg["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "x" / "model.safetensors")),
        num_classes=0,
        **cfg["model_args"],
    )
    x = torch.randn(2, 3, 48, 48)
    assert torch.allclose(features(loaded, x), features(model, x), atol=1e-5)


@FASHION
def test_timm_convnext_trains(tmp_path) -> None:
    res = train_tiny(tmp_path / "run", "--arch", "test_convnext", "--local-size", "32")
    assert res["knn"]["20"]["top1"] > 10
    assert optimizer_kind(tmp_path / "run") == "adamw"
    assert load_backbone(tmp_path / "run").embed_dim == 64


@pytest.mark.slow
@FASHION
def test_torchvision_resnet_trains_exports_and_reports(tmp_path) -> None:
    run = tmp_path / "run"
    res = train_tiny(run, "--arch", "tv:resnet18", "--local-size", "32", "--tensorboard", "false")
    assert res["knn"]["20"]["top1"] > 10
    assert optimizer_kind(run) == "adamw"  # every backbone, as the reference's default
    assert not list(run.glob("events.out.tfevents*"))
    model = load_backbone(run)
    assert model.embed_dim == 512 and not hasattr(model.net.fc, "weight")
    # torchvision's ResNet-18 is timm's resnet18, parameter for parameter
    import timm

    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("matplotlib")

    assert main(["export", str(run), "--output", str(tmp_path / "x")]) == 0
    loaded = timm.create_model(f"local-dir:{tmp_path / 'x'}", pretrained=True, num_classes=0)
    x = torch.randn(3, 3, 40, 40)
    assert torch.allclose(features(loaded, x), features(model, x), atol=1e-5)
    session = ort.InferenceSession(str(tmp_path / "x" / "model.onnx"))
    x = torch.randn(5, 3, 32, 32)
    got = session.run(None, {"images": x.numpy()})[0]
    assert np.abs(got - features(model, x).numpy()).max() <= 1e-4
    # a report without attention maps (not a ViT), but with its curves
    from dino.viz.report import write_report

    rep = write_report(run, images=1)
    assert rep["html"].is_file() and not rep["attention"]
    assert any("attention maps skipped" in n for n in rep["notes"])


@FASHION
def test_crops_too_small_for_convnet(tmp_path, capsys) -> None:
    args = ["--arch", "test_convnext", "--local-size", "16"]
    assert main(["train", *TINY, "--output-dir", str(tmp_path / "r"), *args]) == 2
    assert "cannot take 16-pixel crops" in capsys.readouterr().err


def test_timm_names_of_our_vits() -> None:
    def spec(arch: str, patch: int, img: int, depth: int) -> tuple:
        model = vit(arch, patch, img, depth)
        info = WeightsInfo("x", arch, patch, depth, img, None, model.embed_dim)
        return timm_spec(model, info)

    assert spec("vit_small", 16, 224, 12) == (
        "vit_small_patch16_224",
        {"img_size": 224, "dynamic_img_size": True},
    )
    assert spec("vit_base", 8, 96, 12) == (
        "vit_base_patch8_224",
        {"img_size": 96, "dynamic_img_size": True},
    )
    name, kwargs = spec("vit_pico", 4, 28, 2)
    assert name == "vit_small_patch16_224"
    assert kwargs == {
        "embed_dim": 96,
        "num_heads": 3,
        "depth": 2,
        "patch_size": 4,
        "img_size": 28,
        "dynamic_img_size": True,
    }


# ---------------------------------------------------------------- --init


def pico_cfg(**overrides: object) -> Config:
    base = {
        "out_dim": 64, "head_hidden_dim": 64, "patch_size": 4, "global_size": 32, "local_size": 16,
    }  # fmt: skip
    return load_config("fashion-mnist", base | overrides)


@pytest.mark.slow
def test_init_from_a_run(pico_run) -> None:
    want = load_backbone(pico_run).state_dict()
    torch.manual_seed(5)
    student, teacher = build_networks(pico_cfg(init=str(pico_run / "checkpoint.pth")))
    for net in (student, teacher):
        got = net.backbone.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    # another crop size: the positional embedding is resampled to the new patch grid
    cfg = pico_cfg(init=str(pico_run), global_size=48, eval_crop=48, eval_resize=48)
    student, _ = build_networks(cfg)
    got = student.backbone.state_dict()
    assert got["pos_embed"].shape == (1, 1 + 12 * 12, 96)
    assert torch.equal(got["blocks.0.attn.qkv.weight"], want["blocks.0.attn.qkv.weight"])
    # a resumed run keeps its own weights: no init
    torch.manual_seed(5)
    student, _ = build_networks(pico_cfg(init=str(pico_run)), load_init=False)
    assert not torch.equal(student.backbone.state_dict()["pos_embed"], want["pos_embed"])


def test_init_mismatch_and_unknown(pico_run, tmp_path) -> None:
    with pytest.raises(DinoError, match="depth"):
        build_networks(pico_cfg(init=str(pico_run), depth=4))
    with pytest.raises(DinoError, match="not the requested vit_small"):
        build_networks(pico_cfg(init=str(pico_run), arch="vit_small"))
    with pytest.raises(DinoError, match="timm has no model"):
        build_networks(pico_cfg(init="timm:no_such_model_here"))
    with pytest.raises(DinoError, match="does not exist"):
        build_networks(pico_cfg(init=str(tmp_path / "missing.pth")))


def test_init_from_timm_weights(monkeypatch) -> None:
    """``timm:<name>``: timm's pretrained ResNet-18 into torchvision's (same parameter names);
    the download is replaced by a seeded random model."""
    import timm

    real = timm.create_model

    def fake(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        torch.manual_seed(7)
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", fake)
    want = fake("resnet18", num_classes=0).state_dict()
    cfg = pico_cfg(arch="tv:resnet18", init="timm:resnet18.a1_in1k", local_size=32)
    student, teacher = build_networks(cfg)
    for net in (student, teacher):
        got = net.backbone.net.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


@FASHION
def test_train_with_init(pico_run, tmp_path) -> None:
    run = tmp_path / "run"
    args = ["--init", str(pico_run), "--subset", "64", "--local-size", "16"]
    assert main(["train", *TINY, "--output-dir", str(run), *args]) == 0
    assert load_config(str(run / "config.yaml")).model.init == str(pico_run)


# ---------------------------------------------------------------- export


def test_export_round_trip(pico_run, tmp_path) -> None:
    import timm

    ort = pytest.importorskip("onnxruntime")

    out = tmp_path / "export"
    assert main(["export", str(pico_run), "--output", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "model.onnx"}
    cfg = json.loads((out / "config.json").read_text())
    ours = load_backbone(pico_run)
    # as the brief asks: the timm name, the safetensors file, and the config's kwargs
    loaded = timm.create_model(
        cfg["dino"]["timm"]["name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
        num_classes=0,
        **cfg["dino"]["timm"]["kwargs"],
    )
    x = torch.randn(2, 3, 32, 32)  # the training size: the same positional embedding
    assert torch.allclose(features(loaded, x), features(ours, x), atol=1e-5)
    # other sizes (dynamic_img_size): timm resamples the positional embedding with
    # antialiasing, ours as the reference code does (dino.models.vit); the rest is the same
    ours._pos_embed = types.MethodType(VisionTransformer._pos_embed, ours)
    for size in (16, 48):
        x = torch.randn(2, 3, size, size)
        assert torch.allclose(features(loaded, x), features(ours, x), atol=1e-5)
    del ours._pos_embed
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0)
    assert by_dir.pretrained_cfg["mean"] == list(ours.weights_info.mean)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(features(by_dir, x), features(ours, x), atol=1e-5)
    # ONNX: any batch size, the export's image size
    session = ort.InferenceSession(str(out / "model.onnx"))
    assert cfg["dino"]["onnx"]["input_shape"] == ["batch", 3, 32, 32]
    for batch in (1, 7):
        x = torch.randn(batch, 3, 32, 32)
        got = session.run(["features"], {"images": x.numpy()})[0]
        assert got.shape == (batch, 96)
        assert np.abs(got - features(ours, x).numpy()).max() <= 1e-4
    assert cfg["dino"]["onnx"]["max_abs_diff"] <= 1e-4


def test_export_image_size_checked(pico_run, tmp_path) -> None:
    with pytest.raises(DinoError, match="multiple of the patch size"):
        import dino

        dino.export(pico_run, tmp_path / "x", image_size=30)


# ---------------------------------------------------------------- TensorBoard and report


def test_tensorboard_events(pico_run) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(pico_run.glob("events.out.tfevents*"))
    acc = EventAccumulator(str(pico_run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/teacher_entropy", "knn/top1_k20"} <= tags
    lines = [json.loads(x) for x in (pico_run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in lines if "loss" in r]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(logged)


def test_report(pico_run, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    assert main(["report", str(pico_run), "--output", str(out), "--images", "2"]) == 0
    page = (out / "report.html").read_text()
    names = ("loss.png", "knn.png", "schedules.png", "collapse.png", "attention-0.png")
    for name in names:
        assert f"src='{name}'" in page
        pixels = np.asarray(Image.open(out / name).convert("RGB"), dtype=np.float64)
        assert pixels.std() > 0, name
    assert (out / "attention-1.png").is_file()
    assert "k-NN top-1, k=20" in page


def test_report_needs_a_run(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
