"""Configuration: one typed dataclass tree, loadable from YAML, overridable from the command line.

The dataclass defaults are the reference code's recipe (ViT-S/16 on ImageNet-sized images,
docs/recipe.md). Presets in ``dino/presets/*.yaml`` override some of them; ``fashion-mnist`` is the
built-in CPU run. Every leaf field has a unique name, which is also its command-line flag
(``patch_size`` -> ``--patch-size``) and its help text is the field's ``help`` metadata.

This module holds the schema only; :mod:`dino.config_load` reads YAML and overrides into it,
:mod:`dino.config_checks` checks it, :mod:`dino.value_checks` declares and checks valid values.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dino.devices import DEVICE_CHOICES
from dino.imagenet import IMAGENET_MEAN, IMAGENET_STD
from dino.value_checks import setting

#: The weighted k-NN protocol's k values and vote temperature (the reference's): the defaults of
#: the training run's k-NN, of ``dino knn`` and of :func:`dino.eval.neighbors.weighted_knn`.
KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
#: The paper's headline k-NN setting: k = 20 neighbours vote.
KNN_HEADLINE_K = 20
#: Declares a field: default, help text and valid values (the name keeps the schema short).
_f = setting


@dataclass
class ModelConfig:
    arch: str = _f(
        "vit_small",
        "backbone: vit_pico, vit_nano (96 and 128 wide, for small images), vit_tiny, vit_small, "
        "vit_base (with --patch-size), any timm model name, or tv:<torchvision model> (resnet50 "
        "and the reference's other ResNet names are torchvision's, as there). Larger ViTs learn "
        "better features but cost more per step.",
        on_resume="fixed",
    )
    patch_size: int = _f(
        16,
        "ViT patch size in pixels. Smaller patches give better features at a quadratic cost in "
        "tokens; crop sizes must be multiples of it.",
        range="[1, inf)",
        on_resume="fixed",
    )
    depth: int = _f(
        12,
        "number of transformer blocks of our ViTs (12 in the paper).",
        range="[1, inf)",
        on_resume="fixed",
    )
    drop_path_rate: float = _f(
        0.1, "stochastic depth rate of the student (the teacher uses none).", range="[0, 1)"
    )
    registers: int = _f(
        0,
        "register tokens of our ViTs (0: none; DINOv2's register models have 4): learned tokens "
        "beside [CLS] that the blocks can use as scratch space instead of taking over patch "
        "tokens. They are in no output: not the feature, the patch tokens or attention maps.",
        range="[0, inf)",
        on_resume="fixed",
    )
    out_dim: int = _f(
        65536,
        "K, the number of prototypes of the DINO head. 65536 for ImageNet; small datasets need "
        "far fewer. Increase it if the teacher entropy saturates near log K.",
        range="[2, inf)",
        on_resume="fixed",
    )
    head_hidden_dim: int = _f(
        2048, "width of the head's hidden layers.", range="[1, inf)", on_resume="fixed"
    )
    head_bottleneck_dim: int = _f(
        256,
        "size of the L2-normalized bottleneck of the head.",
        range="[1, inf)",
        on_resume="fixed",
    )
    norm_last_layer: bool = _f(
        True,
        "freeze the weight norm of the head's last layer. False learns faster (ViT-S) but can be "
        "unstable; set it true if training diverges.",
        on_resume="fixed",
    )
    use_bn_in_head: bool = _f(
        False,
        "BatchNorm in the head's hidden layers (off in the reference, for convnets too).",
        on_resume="fixed",
    )
    init: str = _f(
        "",
        "start the student and teacher backbones from these weights instead of a random "
        "initialization: a published name (dino_vits16, dino_vitb16, dino_resnet50 ...), a run "
        "folder or checkpoint file, or timm:<name> for timm's pretrained weights "
        "(timm:vit_small_patch16_224.augreg_in21k). Use it to continue pretraining on your own "
        "images; lower --lr and --warmup-epochs then. Empty: random initialization.",
        on_resume="fixed",
    )
    new_head: bool = _f(
        False,
        "with --init of a full checkpoint (a run folder, ours or the reference's full "
        "checkpoint): start a new random DINO head and loss center instead of loading the "
        "checkpoint's (loaded by default when their shapes fit).",
        on_resume="fixed",
    )


@dataclass
class DataConfig:
    data: str = _f(
        "fashion-mnist",
        "a folder of images (nested class folders or flat; labels are not needed) or the "
        "built-in dataset 'fashion-mnist'.",
    )
    global_size: int = _f(
        224, "side of the 2 global crops (the teacher sees only these).", range="[1, inf)"
    )
    local_size: int = _f(96, "side of the local crops.", range="[1, inf)")
    local_crops: int = _f(
        8,
        "number of local crops per image; 0 disables multi-crop (then widen global_scale).",
        range="[0, inf)",
    )
    global_scale: list[float] = _f(
        [0.4, 1.0],
        "RandomResizedCrop area range of the global crops (min max).",
        range="(0, 1]",
        length=2,
        increasing=True,
    )
    local_scale: list[float] = _f(
        [0.05, 0.4],
        "RandomResizedCrop area range of the local crops (min max).",
        range="(0, 1]",
        length=2,
        increasing=True,
    )
    brightness: float = _f(0.4, "color jitter brightness strength.", range="[0, inf)")
    contrast: float = _f(0.4, "color jitter contrast strength.", range="[0, inf)")
    saturation: float = _f(0.2, "color jitter saturation strength.", range="[0, inf)")
    hue: float = _f(0.1, "color jitter hue strength.", range="[0, 0.5]")
    color_jitter_p: float = _f(0.8, "probability of applying the color jitter.", range="[0, 1]")
    grayscale_p: float = _f(0.2, "probability of converting a view to grayscale.", range="[0, 1]")
    blur_sigma: list[float] = _f(
        [0.1, 2.0],
        "Gaussian blur sigma range in pixels (min max); scale it with the image size.",
        range="(0, inf)",
        length=2,
        increasing=True,
    )
    blur_p: list[float] = _f(
        [1.0, 0.1, 0.5],
        "blur probability of global view 1, global view 2 and local views.",
        range="[0, 1]",
        length=3,
    )
    solarize_p: list[float] = _f(
        [0.0, 0.2, 0.0],
        "solarization probability of global view 1, global view 2, local views.",
        range="[0, 1]",
        length=3,
    )
    mean: list[float] = _f(
        list(IMAGENET_MEAN), "normalization mean (RGB).", range="[0, 1]", length=3
    )
    std: list[float] = _f(
        list(IMAGENET_STD), "normalization std (RGB).", range="(0, inf)", length=3
    )
    eval_resize: int = _f(
        256, "evaluation transform: resize the shorter side to this (bicubic).", range="[1, inf)"
    )
    eval_crop: int = _f(224, "evaluation transform: then center-crop to this.", range="[1, inf)")
    augment: str = _f(
        "auto",
        "augmentation path: 'tensor' (batched on the training device; for a folder, DataLoader "
        "workers decode and crop each image and the color operations run batched), 'pil' (all "
        "per image with PIL in DataLoader workers; folders only) or 'auto' (tensor).",
        choices=("auto", "pil", "tensor"),
    )
    num_workers: int = _f(
        -1,
        "DataLoader workers per process; -1 picks from the core count.",
        range="[-1, inf)",
        on_resume="free",
    )
    subset: int = _f(
        0,
        "use only the first N images of the training data and of each k-NN split (0: all); "
        "for quick trials.",
        range="[0, inf)",
    )
    max_bad_fraction: float = _f(
        0.01,
        "stop the run when more than this fraction of the images cannot be decoded (each one is "
        "replaced by another image and listed in bad_files.txt). Check a folder first with "
        "`dino check-data`; raise it to train on a known-dirty folder.",
        range="[0, 1]",
        on_resume="free",
    )


@dataclass
class LossConfig:
    student_temp: float = _f(0.1, "student softmax temperature tau_s.", range="(0, inf)")
    teacher_temp: float = _f(
        0.04,
        "final teacher temperature tau_t (0.04-0.07). Lower sharpens more; try lowering it if "
        "the teacher entropy drifts up toward log K (uniform collapse).",
        range="(0, inf)",
    )
    warmup_teacher_temp: float = _f(
        0.04,
        "initial teacher temperature; lower it if the loss does not decrease at first.",
        range="(0, inf)",
    )
    warmup_teacher_temp_epochs: float = _f(
        0,
        "epochs of the linear teacher-temperature warm-up (30 in the improved recipe).",
        range="[0, inf)",
    )
    center_momentum: float = _f(0.9, "EMA momentum of the teacher center.", range="[0, 1]")
    centering: str = _f(
        "ema",
        "how the teacher's outputs become targets: ema (subtract the EMA center, the DINO paper) "
        "or sinkhorn (3 Sinkhorn-Knopp iterations over the global batch, DINOv2's option, which "
        "spreads the batch over all prototypes; --center-momentum is then unused).",
        choices=("ema", "sinkhorn"),
    )
    koleo_weight: float = _f(
        0.0,
        "weight of the KoLeo regularizer (DINOv2: 0.1; 0: off): minus the mean log distance of "
        "each student [CLS] feature of a global view to its nearest neighbour in the batch, "
        "which spreads the features apart.",
        range="[0, inf)",
    )
    ibot_weight: float = _f(
        0.0,
        "weight of iBOT's masked-patch loss (DINOv2: 1.0; 0: off; our ViTs only): blocks of "
        "patches of some global views are masked for the student, which must predict the "
        "teacher's (centered) patch outputs there. Costs a patch forward through the head.",
        range="[0, inf)",
    )
    ibot_mask_ratio: list[float] = _f(
        [0.1, 0.5],
        "range of the fraction of patches masked in a masked global view (min max; DINOv2's).",
        range="[0, 1]",
        length=2,
        increasing=True,
    )
    ibot_mask_probability: float = _f(
        0.5, "fraction of the global views that get a mask (DINOv2: 0.5).", range="[0, 1]"
    )
    ibot_separate_head: bool = _f(
        False,
        "iBOT's patch outputs from a head of their own (shaped as the DINO head) instead of the "
        "DINO head; DINOv2 shares the head by default, its large models use a separate one.",
        on_resume="fixed",
    )


@dataclass
class OptimConfig:
    epochs: int = _f(100, "number of training epochs.", range="[1, inf)")
    min_steps: int = _f(
        0,
        "train at least this many optimizer steps: when --epochs of the data make fewer (a small "
        "dataset), the run gets more epochs, and its warm-ups, last-layer freeze and evaluation "
        "period in epochs grow by the same factor, so the schedules keep their shape in steps. "
        "0: never; --subset trials are never lengthened.",
        range="[0, inf)",
    )
    batch_size: int = _f(
        64,
        "images per process per forward pass (the global batch is this x --accumulate x "
        "processes).",
        range="[1, inf)",
    )
    accumulate: int = _f(
        1,
        "gradient accumulation: each optimizer step sums the gradients of this many batches of "
        "--batch-size (the teacher, the center, the schedules and clipping advance once per "
        "step), so 2 x 16 trains as one batch of 32 with the activations of 16 (KoLeo is per "
        "batch of --batch-size). Measured on a ViT-S/16 step (2x224 + 8x96 views): 16 x 2 peaks "
        "at 0.56x the memory of 32 x 1 in fp32, 0.63x in bf16 (docs/memory.md).",
        range="[1, inf)",
    )
    lr: float = _f(
        0.0005,
        "peak learning rate for a global batch of 256; it is scaled linearly with the global "
        "batch. Lower it if the loss is unstable.",
        range="(0, inf)",
    )
    min_lr: float = _f(1e-6, "final learning rate of the cosine decay.", range="[0, inf)")
    warmup_epochs: float = _f(
        10, "epochs of linear learning-rate warm-up from 0.", range="[0, inf)"
    )
    weight_decay: float = _f(
        0.04, "initial weight decay (biases and norms get none).", range="[0, inf)"
    )
    weight_decay_end: float = _f(
        0.4, "final weight decay of the cosine schedule.", range="[0, inf)"
    )
    momentum_teacher: float = _f(
        0.996,
        "initial EMA momentum of the teacher, cosine to 1. Use 0.9995 with small batches (256).",
        range="[0, 1]",
    )
    clip_grad: float = _f(
        3.0, "maximum gradient norm of each parameter; 0 disables clipping.", range="[0, inf)"
    )
    freeze_last_layer: float = _f(
        1,
        "epochs during which the head's last layer is not updated; raise it if training fails.",
        range="[0, inf)",
    )
    optimizer: str = _f(
        "auto",
        "adamw (the reference's default, for every backbone; auto is adamw) or sgd (momentum "
        "0.9). sgd needs its own --lr and a constant weight decay (--weight-decay 1e-4 "
        "--weight-decay-end 1e-4 --lr 0.03 for ResNet-50: the resnet50 preset).",
        choices=("auto", "adamw", "sgd"),
    )


@dataclass
class RunConfig:
    output_dir: str = _f("", "run folder; default runs/<timestamp>.", on_resume="free")
    seed: int = _f(
        0,
        "seed of all randomness (data order, augmentations, initialization).",
        range="[0, 4294967295]",
    )
    device: str = _f(
        "auto",
        "cpu, cuda, cuda:N, mps (Apple GPUs), or auto (CUDA when available).",
        choices=DEVICE_CHOICES,
        on_resume="free",
    )
    precision: str = _f(
        "auto",
        "bf16, fp16, fp32 or auto (bf16 where supported, else fp16 with loss scaling on CUDA). "
        "Use fp32 for exact reproducibility or if the loss goes NaN.",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    eval_every: int = _f(
        1,
        "weighted k-NN every this many epochs when the data has labels (0: only at the end).",
        range="[0, inf)",
        on_resume="free",
    )
    knn_k: list[int] = _f(
        list(KNN_KS),
        "k values of the weighted k-NN evaluation.",
        range="[1, inf)",
        length=(1, math.inf),
    )
    knn_temp: float = _f(
        KNN_TEMPERATURE, "temperature of the weighted k-NN votes.", range="(0, inf)"
    )
    log_every: int = _f(
        10, "iterations between two lines of metrics.jsonl.", range="[1, inf)", on_resume="free"
    )
    save_every: int = _f(
        0,
        "iterations between two checkpoints (0: at the end of each epoch only).",
        range="[0, inf)",
        on_resume="free",
    )
    keep: int = _f(
        1, "number of past checkpoints kept besides the latest.", range="[0, inf)", on_resume="free"
    )
    max_bad_steps: int = _f(
        20,
        "stop the run after this many consecutive steps with a non-finite loss or gradient "
        "(each is skipped; the last checkpoint is kept). Raise it for fp16 runs whose loss "
        "scale needs many steps to settle; lower it to fail fast.",
        range="[1, inf)",
        on_resume="free",
    )
    stop_on_collapse: bool = _f(
        False,
        "end the run (exit code 2, last checkpoint kept) when the collapse monitor detects a "
        "uniform or single-dimension collapse, instead of only warning. Use it for unattended "
        "runs and hyperparameter sweeps.",
        on_resume="free",
    )
    compile: bool = _f(
        False, "torch.compile the networks (faster steps after a slow start).", on_resume="free"
    )
    checkpoint_activations: bool = _f(
        False,
        "activation checkpointing of the student's transformer blocks (timm backbones): their "
        "activations are recomputed in the backward pass instead of kept: the same results for "
        "one more forward of the blocks. Measured on a ViT-S/16 step (2x224 + 8x96 views, batch "
        "16 or 32): 0.19-0.23x the peak memory in fp32, 0.30-0.39x in bf16; try it before "
        "lowering --batch-size (docs/memory.md).",
        on_resume="free",
    )
    tensorboard: bool = _f(
        True,
        "write TensorBoard events if tensorboard is installed, beside metrics.jsonl in the run "
        "folder (view them with `tensorboard --logdir runs`); false: metrics.jsonl only.",
        on_resume="free",
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
        from dino.atomic_files import write_text  # (torch is not imported to read a config)

        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


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
