"""Configuration loading, overrides, validation, YAML round trip and the CLI's error path."""

from __future__ import annotations

import pytest
import yaml

from dino.cli import main
from dino.config import Config, leaf_fields
from dino.config_checks import validate
from dino.config_load import apply_overrides, list_presets, load_config, load_yaml
from dino.errors import DinoError
from dino.training.schedules import shorten_warmups


def test_defaults_are_the_recipe() -> None:
    cfg = load_config("default")
    assert cfg.model.arch == "vit_small"
    assert cfg.model.patch_size == 16
    assert cfg.model.out_dim == 65536
    assert cfg.model.norm_last_layer is True
    assert cfg.data.global_size == 224 and cfg.data.local_size == 96
    assert cfg.data.local_crops == 8
    assert cfg.data.global_scale == [0.4, 1.0] and cfg.data.local_scale == [0.05, 0.4]
    assert cfg.data.blur_p == [1.0, 0.1, 0.5] and cfg.data.solarize_p == [0.0, 0.2, 0.0]
    assert cfg.loss.student_temp == 0.1
    assert cfg.loss.teacher_temp == 0.04 and cfg.loss.warmup_teacher_temp == 0.04
    assert cfg.loss.center_momentum == 0.9
    assert cfg.optim.lr == 0.0005 and cfg.optim.min_lr == 1e-6
    assert cfg.optim.warmup_epochs == 10
    assert cfg.optim.weight_decay == 0.04 and cfg.optim.weight_decay_end == 0.4
    assert cfg.optim.momentum_teacher == 0.996
    assert cfg.optim.clip_grad == 3.0 and cfg.optim.freeze_last_layer == 1
    assert cfg.optim.batch_size == 64 and cfg.optim.epochs == 100
    assert cfg.run.knn_temp == 0.07 and 20 in cfg.run.knn_k


def test_fashion_mnist_preset() -> None:
    cfg = load_config("fashion-mnist")
    assert cfg.model.arch == "vit_pico"
    assert cfg.model.patch_size == 7
    assert cfg.data.global_size == 28 and cfg.data.local_size == 14
    assert cfg.data.global_size % cfg.model.patch_size == 0
    assert cfg.data.local_size % cfg.model.patch_size == 0
    assert cfg.data.local_crops == 6
    assert cfg.model.norm_last_layer is False
    # fields the preset does not set keep their dataclass defaults
    assert cfg.loss.student_temp == 0.1
    assert cfg.optim.weight_decay_end == 0.4


def test_overrides_by_leaf_name_and_section() -> None:
    cfg = load_config("fashion-mnist", {"patch_size": 2, "lr": 0.01})
    assert cfg.model.patch_size == 2
    assert cfg.optim.lr == 0.01
    cfg = load_config("fashion-mnist", {"optim": {"epochs": 7}, "local-crops": 2})
    assert cfg.optim.epochs == 7
    assert cfg.data.local_crops == 2


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("teacher_temp", "0.5", 0.5),
        ("epochs", "3", 3),
        ("norm_last_layer", "true", True),
        ("norm_last_layer", "False", False),
        ("compile", "1", True),
        ("global_scale", "0.4 1.0", [0.4, 1.0]),
        ("local_scale", "0.05,0.3", [0.05, 0.3]),
        ("knn_k", ["10", "20"], [10, 20]),
        ("arch", "vit_tiny", "vit_tiny"),
    ],
)
def test_type_coercion(name, text, expected) -> None:
    cfg = apply_overrides(Config(), {name: text})
    section = {"teacher_temp": "loss", "epochs": "optim", "norm_last_layer": "model",
               "compile": "run", "global_scale": "data", "local_scale": "data", "knn_k": "run",
               "arch": "model"}[name]  # fmt: skip
    value = getattr(getattr(cfg, section), name)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(value, list):
        assert all(type(v) is type(e) for v, e in zip(value, expected, strict=True))


@pytest.mark.parametrize(
    ("name", "text"),
    [("epochs", "three"), ("norm_last_layer", "maybe"), ("epochs", 2.5), ("lr", "fast")],
)
def test_bad_values_raise_dino_error(name, text) -> None:
    with pytest.raises(DinoError, match=name):
        apply_overrides(Config(), {name: text})


def test_unknown_field() -> None:
    with pytest.raises(DinoError, match="no_such_field"):
        load_config("default", {"no_such_field": 1})


def test_unknown_preset() -> None:
    with pytest.raises(DinoError, match="no-such-preset"):
        load_config("no-such-preset")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"patch_size": 5}, "global_size"),  # 28 is not a multiple of 5
        ({"local_size": 10}, "local_size"),  # 10 is not a multiple of 4
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"local_crops": -1}, "local_crops"),
        ({"global_scale": [0.5]}, "global_scale"),
        ({"local_scale": [0.5, 0.1]}, "local_scale"),
        ({"blur_p": [1.0, 0.5]}, "blur_p"),
        ({"precision": "fp8"}, "precision"),
        ({"augment": "gpu"}, "augment"),
        ({"out_dim": 1}, "out_dim"),
    ],
)
def test_validate_errors_name_the_field(overrides, field) -> None:
    with pytest.raises(DinoError, match=field):
        load_config("fashion-mnist", overrides)


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_is_valid_and_sets_its_fields(preset: str) -> None:
    """Each shipped preset passes validation, and each field its file (or its base chain) names
    holds the file's value; a warm-up that outlasts the run is shortened to it."""
    cfg = load_config(preset)  # validates
    chain = [load_yaml(preset)]
    while "base" in chain[-1]:
        chain.append(load_yaml(chain[-1]["base"]))
    fields = leaf_fields()
    for layer in chain[::-1]:
        for key, value in layer.items():
            if key == "base" or any(key in later for later in chain[: chain.index(layer)]):
                continue
            got = getattr(getattr(cfg, fields[key][0]), key)
            assert got == pytest.approx(value) if isinstance(value, float) else got == value, key
    validate(cfg)
    cfg.optim.warmup_epochs = cfg.optim.epochs + 1  # a quick trial of the preset: still valid,
    validate(cfg)  # and the run shortens the warm-up to its length
    assert shorten_warmups(cfg).optim.warmup_epochs == cfg.optim.epochs


def test_yaml_round_trip(tmp_path) -> None:
    cfg = load_config("fashion-mnist", {"patch_size": 7, "global_scale": "0.3 0.9", "lr": 1e-3,
                                         "local_size": 14, "norm_last_layer": "true"})  # fmt: skip
    path = tmp_path / "cfg.yaml"
    cfg.save_yaml(path)
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    again = load_config(str(path))
    assert again.to_dict() == cfg.to_dict()
    assert again.model.patch_size == 7 and again.data.global_scale == [0.3, 0.9]


def test_yaml_base_preset(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("base: fashion-mnist\nepochs: 9\n")
    cfg = load_config(str(path))
    assert cfg.optim.epochs == 9
    assert cfg.model.arch == "vit_pico"  # from the base preset


def test_invalid_yaml_file(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: [1,\n")
    with pytest.raises(DinoError, match="bad.yaml"):
        load_config(str(path))


def test_cli_error_line_and_exit_code(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    code = main(["train", "--patch-size", "5", "--output-dir", str(run_dir)])
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("dino: error:")
    assert "patch_size" in lines[0]
    assert not run_dir.exists()


def test_cli_unknown_preset_error(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    code = main(["train", "--config", "no-such-preset", "--output-dir", str(run_dir)])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("dino: error:")
    assert not run_dir.exists()
