"""Configuration: one typed dataclass tree, loadable from YAML, overridable from the command line.

The dataclass defaults are the reference code's recipe (ViT-S/16 on ImageNet-sized images,
RECIPE.md). Presets in ``dino/presets/*.yaml`` override some of them; ``fashion-mnist`` is the
built-in CPU run. Every leaf field has a unique name, which is also its command-line flag
(``patch_size`` -> ``--patch-size``) and its help text is the field's ``help`` metadata.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dino.errors import DinoError

PRESET_DIR = Path(__file__).parent / "presets"


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    arch: str = _f(
        "vit_small",
        "backbone: vit_pico, vit_nano (96 and 128 wide, for small images), vit_tiny, vit_small, "
        "vit_base (with --patch-size), any timm model name, or tv:<torchvision model>. Larger "
        "ViTs learn better features but cost more per step.",
    )
    patch_size: int = _f(
        16,
        "ViT patch size in pixels. Smaller patches give better features at a quadratic cost in "
        "tokens; crop sizes must be multiples of it.",
    )
    depth: int = _f(12, "number of transformer blocks of our ViTs (12 in the paper).")
    drop_path_rate: float = _f(0.1, "stochastic depth rate of the student (the teacher uses none).")
    out_dim: int = _f(
        65536,
        "K, the number of prototypes of the DINO head. 65536 for ImageNet; small datasets need "
        "far fewer. Increase it if the teacher entropy saturates near log K.",
    )
    head_hidden_dim: int = _f(2048, "width of the head's hidden layers.")
    head_bottleneck_dim: int = _f(256, "size of the L2-normalized bottleneck of the head.")
    norm_last_layer: bool = _f(
        True,
        "freeze the weight norm of the head's last layer. False learns faster (ViT-S) but can be "
        "unstable; set it true if training diverges.",
    )
    use_bn_in_head: bool = _f(False, "BatchNorm in the head's hidden layers (on for convnets).")
    init: str = _f(
        "",
        "start the student and teacher backbones from these weights instead of a random "
        "initialization: a published name (dino_vits16, dino_vitb16, dino_resnet50 ...), a run "
        "folder or checkpoint file, or timm:<name> for timm's pretrained weights "
        "(timm:vit_small_patch16_224.augreg_in21k). Use it to continue pretraining on your own "
        "images; lower --lr and --warmup-epochs then. Empty: random initialization.",
    )


@dataclass
class DataConfig:
    data: str = _f(
        "fashion-mnist",
        "a folder of images (nested class folders or flat; labels are not needed) or the "
        "built-in dataset 'fashion-mnist'.",
    )
    global_size: int = _f(224, "side of the 2 global crops (the teacher sees only these).")
    local_size: int = _f(96, "side of the local crops.")
    local_crops: int = _f(
        8, "number of local crops per image; 0 disables multi-crop (then widen global_scale)."
    )
    global_scale: list[float] = _f(
        [0.4, 1.0], "RandomResizedCrop area range of the global crops (min max)."
    )
    local_scale: list[float] = _f(
        [0.05, 0.4], "RandomResizedCrop area range of the local crops (min max)."
    )
    brightness: float = _f(0.4, "color jitter brightness strength.")
    contrast: float = _f(0.4, "color jitter contrast strength.")
    saturation: float = _f(0.2, "color jitter saturation strength.")
    hue: float = _f(0.1, "color jitter hue strength.")
    color_jitter_p: float = _f(0.8, "probability of applying the color jitter.")
    grayscale_p: float = _f(0.2, "probability of converting a view to grayscale.")
    blur_sigma: list[float] = _f(
        [0.1, 2.0], "Gaussian blur sigma range in pixels (min max); scale it with the image size."
    )
    blur_p: list[float] = _f(
        [1.0, 0.1, 0.5], "blur probability of global view 1, global view 2 and local views."
    )
    solarize_p: list[float] = _f(
        [0.0, 0.2, 0.0], "solarization probability of global view 1, global view 2, local views."
    )
    mean: list[float] = _f([0.485, 0.456, 0.406], "normalization mean (RGB).")
    std: list[float] = _f([0.229, 0.224, 0.225], "normalization std (RGB).")
    eval_resize: int = _f(256, "evaluation transform: resize the shorter side to this (bicubic).")
    eval_crop: int = _f(224, "evaluation transform: then center-crop to this.")
    augment: str = _f(
        "auto",
        "augmentation path: 'tensor' (batched on the training device, needs an in-memory "
        "dataset), 'pil' (per image in DataLoader workers) or 'auto' (tensor when possible).",
    )
    num_workers: int = _f(-1, "DataLoader workers per process; -1 picks from the core count.")
    subset: int = _f(
        0,
        "use only the first N images of the training data and of each k-NN split (0: all); "
        "for quick trials.",
    )
    max_bad_fraction: float = _f(
        0.01,
        "stop the run when more than this fraction of the images cannot be decoded (each one is "
        "replaced by another image and listed in bad_files.txt). Check a folder first with "
        "`dino check-data`; raise it to train on a known-dirty folder.",
    )


@dataclass
class LossConfig:
    student_temp: float = _f(0.1, "student softmax temperature tau_s.")
    teacher_temp: float = _f(
        0.04,
        "final teacher temperature tau_t (0.04-0.07). Lower sharpens more; try lowering it if "
        "the teacher entropy drifts up toward log K (uniform collapse).",
    )
    warmup_teacher_temp: float = _f(
        0.04, "initial teacher temperature; lower it if the loss does not decrease at first."
    )
    warmup_teacher_temp_epochs: float = _f(
        0, "epochs of the linear teacher-temperature warm-up (30 in the improved recipe)."
    )
    center_momentum: float = _f(0.9, "EMA momentum of the teacher center.")


@dataclass
class OptimConfig:
    epochs: int = _f(100, "number of training epochs.")
    batch_size: int = _f(64, "images per process per step (the global batch is this x processes).")
    lr: float = _f(
        0.0005,
        "peak learning rate for a global batch of 256; it is scaled linearly with the global "
        "batch. Lower it if the loss is unstable.",
    )
    min_lr: float = _f(1e-6, "final learning rate of the cosine decay.")
    warmup_epochs: float = _f(10, "epochs of linear learning-rate warm-up from 0.")
    weight_decay: float = _f(0.04, "initial weight decay (biases and norms get none).")
    weight_decay_end: float = _f(0.4, "final weight decay of the cosine schedule.")
    momentum_teacher: float = _f(
        0.996,
        "initial EMA momentum of the teacher, cosine to 1. Use 0.9995 with small batches (256).",
    )
    clip_grad: float = _f(3.0, "maximum gradient norm of each parameter; 0 disables clipping.")
    freeze_last_layer: float = _f(
        1, "epochs during which the head's last layer is not updated; raise it if training fails."
    )
    optimizer: str = _f(
        "auto",
        "adamw, sgd (momentum 0.9) or auto: AdamW for ViTs and other backbones without "
        "BatchNorm, SGD for BatchNorm convnets such as ResNets (the reference's choices). With "
        "sgd use a larger --lr (0.03 for ResNet-50) and a constant weight decay.",
    )


@dataclass
class RunConfig:
    output_dir: str = _f("", "run folder; default runs/<timestamp>.")
    seed: int = _f(0, "seed of all randomness (data order, augmentations, initialization).")
    device: str = _f("auto", "cpu, cuda, cuda:N, or auto (CUDA when available).")
    precision: str = _f(
        "auto",
        "bf16, fp16, fp32 or auto (bf16 where supported, else fp16 with loss scaling on CUDA). "
        "Use fp32 for exact reproducibility or if the loss goes NaN.",
    )
    eval_every: int = _f(
        1, "weighted k-NN every this many epochs when the data has labels (0: only at the end)."
    )
    knn_k: list[int] = _f([10, 20, 100, 200], "k values of the weighted k-NN evaluation.")
    knn_temp: float = _f(0.07, "temperature of the weighted k-NN votes.")
    log_every: int = _f(10, "iterations between two lines of metrics.jsonl.")
    save_every: int = _f(
        0, "iterations between two checkpoints (0: at the end of each epoch only)."
    )
    keep: int = _f(1, "number of past checkpoints kept besides the latest.")
    max_bad_steps: int = _f(
        20,
        "stop the run after this many consecutive steps with a non-finite loss or gradient "
        "(each is skipped; the last checkpoint is kept). Raise it for fp16 runs whose loss "
        "scale needs many steps to settle; lower it to fail fast.",
    )
    stop_on_collapse: bool = _f(
        False,
        "end the run (exit code 2, last checkpoint kept) when the collapse monitor detects a "
        "uniform or single-dimension collapse, instead of only warning. Use it for unattended "
        "runs and hyperparameter sweeps.",
    )
    compile: bool = _f(False, "torch.compile the networks (faster steps after a slow start).")
    tensorboard: bool = _f(
        True,
        "write TensorBoard events if tensorboard is installed, beside metrics.jsonl in the run "
        "folder (view them with `tensorboard --logdir runs`); false: metrics.jsonl only.",
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def leaf_fields() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """Every leaf field by its unique name: ``name -> (section, field, type)``."""
    out: dict[str, tuple[str, dataclasses.Field, Any]] = {}
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in out, f"duplicate config field {f.name}"
            out[f.name] = (section.name, f, hints[f.name])
    return out


def _coerce(name: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    try:
        if origin is list:
            (inner,) = typing.get_args(typ)
            if isinstance(value, str):
                value = value.replace(",", " ").split()
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [_coerce(name, v, inner) for v in value]
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return typ(value)
    except (TypeError, ValueError):
        raise DinoError(f"config field {name!r} expects {typ}, got {value!r}") from None


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Set fields from a flat ``{leaf_name: value}`` or nested ``{section: {leaf: value}}`` dict."""
    leaves = leaf_fields()
    for key, value in overrides.items():
        if key in SECTIONS and isinstance(value, dict):
            apply_overrides(cfg, value)
            continue
        key = key.replace("-", "_")
        if key not in leaves:
            raise DinoError(f"unknown config field {key!r}; see `dino train --help` for the fields")
        section, f, typ = leaves[key]
        setattr(getattr(cfg, section), key, _coerce(key, value, typ))
    return cfg


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_yaml(name_or_path: str) -> dict[str, Any]:
    """Read a preset by name or a YAML file by path."""
    path = Path(name_or_path)
    if not path.exists():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise DinoError(
            f"no config file or preset named {name_or_path!r}; presets: {', '.join(list_presets())}"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DinoError(f"{path} is not valid YAML ({exc}); fix the file") from None
    if not isinstance(data, dict):
        raise DinoError(f"{path} must hold a mapping of config fields")
    return data


def load_config(name_or_path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then a preset or YAML file (which may name a ``base`` preset), then overrides."""
    cfg = Config()
    if name_or_path:
        data = load_yaml(name_or_path)
        chain = [data]
        while "base" in chain[-1]:
            chain.append(load_yaml(chain[-1]["base"]))
        for layer in reversed(chain):
            apply_overrides(cfg, {k: v for k, v in layer.items() if k != "base"})
    if overrides:
        apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject impossible configurations with one clear sentence."""
    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run
    if m.arch.startswith("vit_") and m.arch.count("_") == 1:
        for name, size in (("global_size", d.global_size), ("local_size", d.local_size)):
            if size % m.patch_size:
                raise DinoError(
                    f"{name}={size} is not divisible by patch_size={m.patch_size}; "
                    "choose crop sizes that are multiples of the patch size"
                )
    if o.batch_size < 1:
        raise DinoError(f"batch_size must be at least 1, got {o.batch_size}")
    if o.epochs < 1:
        raise DinoError(f"epochs must be at least 1, got {o.epochs}")
    if d.local_crops < 0:
        raise DinoError(f"local_crops must be 0 or more, got {d.local_crops}")
    for name in ("global_scale", "local_scale", "blur_sigma"):
        lo_hi = getattr(d, name)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            raise DinoError(f"{name} must be two numbers 0 < min <= max, got {lo_hi}")
    for name in ("blur_p", "solarize_p"):
        if len(getattr(d, name)) != 3:
            raise DinoError(f"{name} needs 3 probabilities (global 1, global 2, local)")
    if r.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise DinoError(f"precision must be auto, bf16, fp16 or fp32, got {r.precision!r}")
    if d.augment not in ("auto", "pil", "tensor"):
        raise DinoError(f"augment must be auto, pil or tensor, got {d.augment!r}")
    if m.out_dim < 2:
        raise DinoError(f"out_dim must be at least 2, got {m.out_dim}")
    if r.max_bad_steps < 1:
        raise DinoError(f"max_bad_steps must be at least 1, got {r.max_bad_steps}")
    if r.keep < 0 or r.save_every < 0:
        raise DinoError("keep and save_every must be 0 or more")
    if not 0 <= d.max_bad_fraction <= 1:
        raise DinoError(f"max_bad_fraction must be between 0 and 1, got {d.max_bad_fraction}")
    if o.optimizer not in ("auto", "adamw", "sgd"):
        raise DinoError(f"optimizer must be auto, adamw or sgd, got {o.optimizer!r}")
    if m.init.startswith("timm:") and not m.init[5:]:
        raise DinoError("init timm: needs a model name, e.g. timm:vit_small_patch16_224")
