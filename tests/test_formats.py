"""Formats other tools load: ``dino export --format hf`` (transformers), ``hubconf.py``
(torch.hub), and ``--device mps`` where PyTorch has Apple GPUs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.commands import RANDOM_PICO, one_error_line, run_cli
from test_weights import make_run, perturbed

from dino.cli import main
from dino.devices import resolve_device
from dino.errors import DinoError
from dino.models.backbones import vit
from dino.models.hf_export import export_hf

REPO = Path(__file__).resolve().parents[1]


def hf_features(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.pooler_output, out.last_hidden_state


def test_export_hf_run_loads_in_transformers(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    run = tmp_path / "run"
    make_run(run, "vit_pico", 4, 2, 32)
    out = tmp_path / "hf"
    code, text, err = run_cli(["export", str(run), "--format", "hf", "--output", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ViTModel"]
    import dino

    ours = dino.load_backbone(run)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pooled, tokens = hf_features(out, x)
    with torch.no_grad():
        want = ours(x)
        cls, patches = ours.forward_features(x)[:, 0], ours.forward_features(x)[:, 1:]
    assert (pooled - want).abs().max() < 1e-4
    assert (tokens[:, 0] - cls).abs().max() < 1e-4
    assert (tokens[:, 1:] - patches).abs().max() < 1e-4


def test_export_hf_with_registers_is_dinov2(tmp_path) -> None:
    pytest.importorskip("transformers")
    model = perturbed(vit("vit_pico", 8, 32, depth=2, registers=4), 3)
    model.weights_info = SimpleNamespace(source="test", arch="vit_pico", mean=None, std=None)
    res = export_hf(model, tmp_path / "hf", 32)
    assert res["model_type"] == "dinov2_with_registers" and res["max_abs_diff"] < 1e-4
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pooled, tokens = hf_features(tmp_path / "hf", x)
    with torch.no_grad():
        assert (pooled - model(x)).abs().max() < 1e-4
        assert (tokens - model.forward_features(x)).abs().max() < 1e-4  # registers included


def test_export_format_unknown_is_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "x"
    with pytest.raises(SystemExit) as info:
        main(["export", "random", *RANDOM_PICO[2:], "--format", "keras", "--output", str(out)])
    assert info.value.code == 2
    assert "--format" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_export_hf_refuses_a_convnet(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "x"
    argv = ["export", "random", "--arch", "tv:resnet18", "--format", "hf", "--output", str(out)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "--format timm" in one_error_line(err)
    assert not out.exists()


def test_torch_hub_entries(tmp_path) -> None:
    model = torch.hub.load(str(REPO), "dino_vits8", source="local", pretrained=False)
    assert model.patch_embed.patch_size == (8, 8) and model.embed_dim == 384
    run = tmp_path / "run"
    make_run(run, "vit_pico", 4, 2, 32)
    loaded = torch.hub.load(str(REPO), "dino_run", str(run), source="local")
    import dino

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), dino.load_backbone(run)(x))
    from dino.models.weight_files import REFERENCE_MODELS

    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert all(callable(getattr(hubconf, name)) for name in REFERENCE_MODELS)


def test_device_mps_where_pytorch_has_it(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DinoError, match="no Apple GPU"):
        resolve_device("mps")
