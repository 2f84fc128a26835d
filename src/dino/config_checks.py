"""Checks of a whole :class:`~dino.config.Config` before anything is written: each field against
its declared valid values, then the fields that depend on each other; and what a ``--resume``
would change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dino.config import Config, leaf_fields
from dino.errors import DinoError
from dino.value_checks import check_spec


def run_folder(resume: str | Path) -> Path:
    """The run folder that ``--resume`` names (the folder itself, or one of its checkpoints)."""
    run_dir = Path(resume)
    if run_dir.is_file():
        run_dir = run_dir.parent
    if not (run_dir / "config.yaml").exists():
        raise DinoError(
            f"{resume} is not a run folder (no config.yaml); pass the folder that `dino train` "
            "wrote"
        )
    return run_dir


def resume_changes(saved: Config, new: Config) -> dict[str, tuple[str, Any, Any]]:
    """The fields whose values differ between a run's config ``saved`` and ``new``:
    ``name -> (on_resume kind, saved value, new value)``."""
    out = {}
    for name, (section, f, _typ) in leaf_fields().items():
        a, b = getattr(getattr(saved, section), name), getattr(getattr(new, section), name)
        if a != b:
            out[name] = (f.metadata.get("on_resume", "change"), a, b)
    return out


def validate(cfg: Config) -> None:
    """Reject impossible configurations with one clear sentence: first each field against its
    declared valid values (``range``, ``length``, ``choices`` of its declaration), then the fields
    that depend on each other."""
    for name, (section, f, _typ) in leaf_fields().items():
        check_spec(name, getattr(getattr(cfg, section), name), f.metadata)
    m, d, o = cfg.model, cfg.data, cfg.optim
    for name in ("arch", "data"):
        if not str(getattr(m if name == "arch" else d, name)).strip():
            raise DinoError(f"{name} (--{name}) is empty; name a backbone or a data folder")
    if m.arch.startswith("vit_") and m.arch.count("_") == 1:
        for name, size in (("global_size", d.global_size), ("local_size", d.local_size)):
            if size % m.patch_size:
                raise DinoError(
                    f"{name}={size} is not divisible by patch_size={m.patch_size}; "
                    "choose crop sizes that are multiples of the patch size"
                )
    if d.eval_crop > d.eval_resize:
        raise DinoError(
            f"eval_crop={d.eval_crop} is larger than eval_resize={d.eval_resize}; the center "
            "crop must fit in the resized image: raise --eval-resize or lower --eval-crop"
        )
    # warm-ups longer than --epochs are shortened by the trainer, with a warning
    if o.accumulate > 1 and cfg.loss.ibot_weight:
        raise DinoError(
            f"accumulate={o.accumulate} does not work with iBOT (ibot_weight="
            f"{cfg.loss.ibot_weight}) yet; set --accumulate 1 or --ibot-weight 0"
        )
    our_vit = m.arch.startswith("vit_") and m.arch.count("_") == 1
    for name, value in (("registers", m.registers), ("ibot_weight", cfg.loss.ibot_weight)):
        if value and not our_vit:
            raise DinoError(
                f"{name}={value} needs one of our ViTs (vit_pico ... vit_base), not "
                f"arch={m.arch}; choose one or set --{name.replace('_', '-')} 0"
            )
    if cfg.loss.ibot_weight and m.use_bn_in_head:
        raise DinoError(
            "ibot_weight needs a head without BatchNorm (the patch tokens would enter its "
            "statistics); set --use-bn-in-head false or --ibot-weight 0"
        )
    if m.init.startswith("timm:") and not m.init[5:]:
        raise DinoError("init timm: needs a model name, e.g. timm:vit_small_patch16_224")
