"""Loading backbones from our checkpoints and the reference code's formats (dino.models.weights).

Networks are random-init and shallow (depth 2) so the tests stay fast on a CPU; the formats are
written the way the reference code and ``dino train`` write them.
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from torch import nn

from dino.config_load import load_config
from dino.errors import DinoError
from dino.eval.attention import cls_attention
from dino.models.arch_detect import detect_arch
from dino.models.backbones import build_backbone, vit
from dino.models.head import DINOHead
from dino.models.multicrop import MultiCropNet
from dino.models.weight_files import REFERENCE_MODELS
from dino.models.weights import load_backbone

torch.set_num_threads(1)
TOL = 1e-4


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """Shift every parameter and buffer a little so that a weight that fails to load shows
    (LayerNorm weights start at 1, biases at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype.is_floating_point:
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    return model.eval()


def make_vit(arch: str, patch: int, img: int = 32, depth: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return perturbed(vit(arch, patch, img, depth), seed)


def head_state(dim: int, prefix: str) -> dict[str, torch.Tensor]:
    head = DINOHead(dim, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    return {f"{prefix}head.{k}": v for k, v in head.state_dict().items()}


def reference_full(teacher: nn.Module, student: nn.Module) -> dict:
    """A full checkpoint as the reference code saves it: DDP student, plain teacher."""
    dim = teacher.embed_dim
    return {
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()}
        | head_state(dim, "module."),
        "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()}
        | head_state(dim, ""),
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=32),
        "dino_loss": {"center": torch.zeros(1, 32)},
        "fp16_scaler": {"scale": 65536.0},
    }


@pytest.fixture(scope="module")
def vits() -> dict[tuple[str, int], tuple[nn.Module, nn.Module]]:
    """(teacher, student) ViT-S/16 and ViT-B/8, depth 2, pos-embed grid for 32x32."""
    out = {}
    for i, (arch, patch) in enumerate([("vit_small", 16), ("vit_base", 8)]):
        teacher = make_vit(arch, patch, seed=i)
        student = perturbed(make_vit(arch, patch, seed=i), seed=100 + i)
        out[(arch, patch)] = (teacher, student)
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("arch,patch", [("vit_small", 16), ("vit_base", 8)])
@pytest.mark.parametrize("fmt", ["backbone", "full"])
def test_reference_formats_give_the_same_features_and_attention(
    vits: dict, tmp_path, arch: str, patch: int, fmt: str
) -> None:
    teacher, student = vits[(arch, patch)]
    path = tmp_path / f"{arch}{patch}_{fmt}.pth"
    if fmt == "backbone":
        state = teacher.state_dict()
        assert "blocks.0.attn.qkv.weight" in state and "blocks.1.mlp.fc2.weight" in state
        assert not any(k.startswith("head") for k in state)
        torch.save(state, path)
    else:
        torch.save(reference_full(teacher, student), path)

    loaded = load_backbone(path)  # no arch, no patch size: detected
    info = loaded.weights_info
    assert (info.arch, info.patch_size, info.depth, info.img_size) == (arch, patch, 2, 32)
    assert not loaded.training
    x = torch.randn(2, 3, 48, 32)  # not the pos-embed size: interpolated positions
    with torch.no_grad():
        assert max_diff(loaded(x), teacher(x)) <= TOL
        assert loaded(x).shape == (2, teacher.embed_dim)
    assert max_diff(cls_attention(loaded, x), cls_attention(teacher, x)) <= TOL

    if fmt == "full":
        s = load_backbone(path, arch=arch, patch_size=patch, checkpoint_key="student")
        assert s.weights_info.checkpoint_key == "student"
        with torch.no_grad():
            assert max_diff(s(x), student(x)) <= TOL
            assert max_diff(s(x), teacher(x)) > 1e-3  # really the other network


def test_resnet50_reference_state_dict(tmp_path) -> None:
    torch.manual_seed(0)
    trunk = perturbed(build_backbone("tv:resnet50"), 3)
    state = trunk.net.state_dict()
    assert "conv1.weight" in state and "layer4.2.conv3.weight" in state
    assert not any(k.startswith("fc.") for k in state)
    torch.save(state, tmp_path / "dino_resnet50_pretrain.pth")
    full = {"teacher": {f"backbone.{k}": v for k, v in state.items()}, "epoch": 1}
    torch.save(full, tmp_path / "full.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = trunk(x)
        for name in ("dino_resnet50_pretrain.pth", "full.pth"):
            loaded = load_backbone(tmp_path / name)
            assert loaded.weights_info.arch == "tv:resnet50"
            assert loaded.embed_dim == 2048
            assert max_diff(loaded(x), want) <= TOL
        # the reference's --arch resnet50 names the same network: its keys load the same way
        by_name = load_backbone(tmp_path / "dino_resnet50_pretrain.pth", arch="resnet50")
        assert by_name.weights_info.arch == "tv:resnet50"
        assert max_diff(by_name(x), want) <= TOL


def test_reference_resnet_names_build_torchvision_and_other_names_timm() -> None:
    """``--arch resnet50`` is torchvision's ResNet-50 as in the reference code: its residual
    blocks' last BN starts at gamma = 1 (timm's ResNets start it at 0); other timm names stay
    timm's."""
    import timm
    import torchvision

    net = build_backbone("resnet50")
    assert isinstance(net.net, torchvision.models.ResNet) and net.embed_dim == 2048
    gammas = [b.bn3.weight for layer in (net.net.layer1, net.net.layer4) for b in layer]
    assert all(bool((g == 1).all()) for g in gammas)
    timm_net = timm.create_model("resnet50", num_classes=0)
    assert bool((timm_net.layer1[0].bn3.weight == 0).all())  # what --arch resnet50 used to give
    other = build_backbone("resnet10t")
    assert isinstance(other, timm.models.ResNet) and not hasattr(other, "net")


def make_run(root, arch: str = "vit_pico", patch: int = 4, depth: int = 2, size: int = 32):
    """A run folder as ``dino train`` leaves it (checkpoint.pth, teacher_backbone.pth,
    config.yaml), without training: random teacher and a different student."""
    cfg = load_config(
        None,
        {
            "arch": arch, "patch_size": patch, "depth": depth, "global_size": size,
            "local_size": 16, "out_dim": 32, "head_hidden_dim": 16, "head_bottleneck_dim": 8,
            "eval_resize": size, "eval_crop": size, "mean": [0.3, 0.3, 0.3],
            "std": [0.35, 0.35, 0.35], "data": "fashion-mnist",
        },
    )  # fmt: skip
    torch.manual_seed(1)
    nets = []
    for seed in (1, 2):
        backbone = perturbed(vit(arch, patch, size, depth), seed)
        head = DINOHead(backbone.embed_dim, 32, 16, 8)
        nets.append(MultiCropNet(backbone, head).eval())
    teacher, student = nets
    root.mkdir(parents=True, exist_ok=True)
    state = {
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": {},
        "iteration": 10,
        "epoch": 1,
        "config": cfg.to_dict(),
        "rng": {"numpy": ("MT19937", __import__("numpy").zeros(3))},  # needs the full unpickler
    }
    torch.save(state, root / "checkpoint.pth")
    torch.save(teacher.backbone.state_dict(), root / "teacher_backbone.pth")
    cfg.save_yaml(root / "config.yaml")
    return teacher.backbone, student.backbone


def test_run_folder_checkpoint_and_teacher_backbone(tmp_path) -> None:
    teacher, student = make_run(tmp_path / "run")
    x = torch.randn(3, 3, 28, 36)
    with torch.no_grad():
        for source in (tmp_path / "run", tmp_path / "run" / "checkpoint.pth"):
            m = load_backbone(source)
            assert m.weights_info.arch == "vit_pico" and m.weights_info.patch_size == 4
            assert m.weights_info.run_config["data"]["eval_crop"] == 32
            assert list(m.weights_info.mean) == [0.3, 0.3, 0.3]
            assert max_diff(m(x), teacher(x)) <= TOL
        m = load_backbone(tmp_path / "run", checkpoint_key="student")
        assert max_diff(m(x), student(x)) <= TOL
        m = load_backbone(tmp_path / "run" / "teacher_backbone.pth")
        assert m.weights_info.run_config is not None  # the config.yaml beside it
        assert max_diff(m(x), teacher(x)) <= TOL
        (tmp_path / "run" / "checkpoint.pth").unlink()
        m = load_backbone(tmp_path / "run")  # falls back to teacher_backbone.pth
        assert max_diff(m(x), teacher(x)) <= TOL


def test_published_names_download_once_through_the_hub(monkeypatch, vits) -> None:
    teacher, _ = vits[("vit_small", 16)]
    calls = []

    def fake(url: str, **kwargs):
        calls.append(url)
        return teacher.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake)
    m = load_backbone("dino_vits16")
    assert calls == [REFERENCE_MODELS["dino_vits16"]["url"]]
    assert m.weights_info.arch == "vit_small" and m.weights_info.patch_size == 16
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(m(x), teacher(x)) <= TOL


#: The published files' names: ``dino_<network><patch>_pretrain`` (the ViT-S is DeiT-S).
PUBLISHED_FILE = re.compile(
    r"https://dl\.fbaipublicfiles\.com/dino/(?P<stem>dino_(?P<net>deitsmall|vitbase|resnet)"
    r"(?P<n>\d+)_pretrain)/(?P=stem)\.pth"
)
PUBLISHED_NETWORKS = {"deitsmall": "vit_small", "vitbase": "vit_base", "resnet": "tv:resnet"}


def reference_name(arch: str, patch_size: int | None) -> str:
    """The library name of a published network: ``dino_vits16``, ``dino_resnet50``..."""
    if arch.startswith("tv:"):
        return f"dino_{arch[3:]}"
    return f"dino_vit{arch.removeprefix('vit_')[0]}{patch_size}"


@pytest.mark.parametrize("name", list(REFERENCE_MODELS))
def test_reference_names_load_the_network_their_file_holds(monkeypatch, name: str) -> None:
    """Each name's URL is a published file whose name gives a network of the name's
    architecture and patch size; a file of that network, served by the hub, loads under the
    name as that network."""
    spec = REFERENCE_MODELS[name]
    m = PUBLISHED_FILE.fullmatch(spec["url"])
    assert m, spec["url"]
    arch = PUBLISHED_NETWORKS[m["net"]]
    if arch.startswith("tv:"):
        arch, patch = arch + m["n"], None
        file_net = build_backbone(arch)
    else:
        patch = int(m["n"])
        file_net = vit(arch, patch, 2 * patch, depth=1)
    assert (spec["arch"], spec["patch_size"]) == (arch, patch)
    assert reference_name(arch, patch) == name
    monkeypatch.setattr(
        torch.hub, "load_state_dict_from_url", lambda url, **kw: file_net.state_dict()
    )
    got = load_backbone(name).weights_info
    assert (got.arch, got.patch_size) == (arch, patch)
    assert got.source.endswith(f"{m['stem']}.pth")


def test_download_failure_is_a_dino_error(monkeypatch) -> None:
    def fail(url: str, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    with pytest.raises(DinoError, match="dino_vitb8"):
        load_backbone("dino_vitb8")


@pytest.mark.parametrize("arch,dim", [("vit_pico", 96), ("vit_nano", 128), ("vit_tiny", 192)])
def test_detect_small_vits(arch: str, dim: int) -> None:
    state = vit(arch, 4, 28, depth=3).state_dict()
    found = detect_arch(state)
    assert found["arch"] == arch and found["embed_dim"] == dim
    assert (found["patch_size"], found["depth"], found["img_size"]) == (4, 3, 28)


# ------------------------------------------------------------------ errors name the file


def test_missing_file_and_unknown_name(tmp_path) -> None:
    with pytest.raises(DinoError, match="nothing-here.pth"):
        load_backbone(tmp_path / "nothing-here.pth")
    with pytest.raises(DinoError, match="dino_vits16"):  # lists the known names
        load_backbone("dino_vit_huge")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DinoError, match="empty"):
        load_backbone(tmp_path / "empty")


def test_truncated_file(tmp_path, vits) -> None:
    teacher, _ = vits[("vit_small", 16)]
    path = tmp_path / "cut.pth"
    torch.save(teacher.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DinoError, match="cut.pth.*truncated"):
        load_backbone(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(DinoError, match="cut.pth"):
        load_backbone(path)


def test_checkpoint_without_backbone(tmp_path) -> None:
    cases = {
        "heads.pth": {"teacher": head_state(384, ""), "student": head_state(384, "module.")},
        "optim.pth": {"optimizer": {"state": {}}, "epoch": 3},
        "tensor.pth": torch.zeros(3),
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(DinoError, match=name):
            load_backbone(tmp_path / name)
    full = {"teacher": {"backbone.cls_token": torch.zeros(1, 1, 384)}}
    torch.save(full, tmp_path / "teacher-only.pth")
    with pytest.raises(DinoError, match="teacher-only.pth.*--checkpoint-key teacher"):
        load_backbone(tmp_path / "teacher-only.pth", checkpoint_key="student")


def test_shape_mismatch_with_the_requested_arch(tmp_path, vits) -> None:
    teacher, _ = vits[("vit_small", 16)]
    path = tmp_path / "vits16.pth"
    torch.save(teacher.state_dict(), path)
    with pytest.raises(DinoError, match="vits16.pth.*vit_base"):
        load_backbone(path, arch="vit_base")
    with pytest.raises(DinoError, match="vits16.pth.*patch size 16"):
        load_backbone(path, patch_size=8)
    with pytest.raises(DinoError, match="vits16.pth"):
        load_backbone(path, arch="tv:resnet18")
    broken = dict(teacher.state_dict())
    broken["blocks.1.mlp.fc1.weight"] = torch.zeros(10, 384)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(DinoError, match="broken.pth.*blocks.1.mlp.fc1.weight"):
        load_backbone(tmp_path / "broken.pth")


def test_classifier_layers_are_dropped_and_convnet_runs_load(tmp_path) -> None:
    torch.manual_seed(0)
    model = vit("vit_pico", 4, 16, depth=1).eval()
    state = model.state_dict() | {"head.weight": torch.zeros(10, 96), "head.bias": torch.zeros(10)}
    torch.save(state, tmp_path / "classifier.pth")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(load_backbone(tmp_path / "classifier.pth")(x), model(x)) <= TOL
    # a torchvision run: teacher_backbone.pth keys are net.*, the arch comes from config.yaml
    run = tmp_path / "run"
    run.mkdir()
    net = perturbed(build_backbone("tv:resnet18"), 5)
    load_config(None, {"arch": "tv:resnet18"}).save_yaml(run / "config.yaml")
    torch.save(net.state_dict(), run / "teacher_backbone.pth")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        loaded = load_backbone(run)
        assert loaded.weights_info.arch == "tv:resnet18"
        assert max_diff(loaded(x), net(x)) <= TOL


def test_init_resamples_positions_as_the_network_does(tmp_path) -> None:
    """``--init`` from weights trained at another image size resamples the positional embedding
    with the rule the ViT itself applies to other input sizes (the reference's), so the started
    network computes what the source network computes on inputs of the new size."""
    from dino.models.weights import init_backbone

    torch.manual_seed(0)
    source = perturbed(vit("vit_pico", 8, 64, 2), 1).eval()
    torch.save(source.state_dict(), tmp_path / "source.pth")
    target = vit("vit_pico", 8, 32, 2).eval()
    init_backbone(target, str(tmp_path / "source.pth"), "vit_pico", 8)
    assert target.pos_embed.shape == (1, 1 + 4 * 4, 96)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(target(x), source(x)) <= TOL
