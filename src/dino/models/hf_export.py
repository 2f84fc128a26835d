"""Export a ViT backbone as a Hugging Face ``transformers`` model folder.

:func:`export_hf` writes ``config.json`` + ``model.safetensors`` (+ ``preprocessor_config.json``)
that ``transformers.AutoModel.from_pretrained(DIR)`` loads offline:

* a ViT without registers is a :class:`transformers.ViTModel` (the same blocks: pre-norm, exact
  GELU, biased qkv, LayerNorm eps 1e-6). Its pooler is saved as the identity with a linear
  activation, so ``pooler_output`` is our feature ([CLS] after the final norm), as is
  ``last_hidden_state[:, 0]``;
* a ViT with registers is a :class:`transformers.Dinov2WithRegistersModel` with layer scales of
  1 (ours has none) and a zero positional embedding for [CLS] (ours adds none to it);
  ``pooler_output`` is again our feature.

The positional embedding is saved on the grid of ``image_size``; at that size the outputs equal
ours (checked on a batch after writing: max abs difference under 1e-4). At other sizes
``transformers`` resamples it in its own way (``interpolate_pos_encoding``), close to ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino.atomic_files import write_json
from dino.errors import DinoError
from dino.models.vit import resample_pos_embed
from dino.models.weights import input_stats

#: Largest accepted ``|transformers - ours|`` of the features, relative to ``max(1, max |f|)``.
HF_TOLERANCE = 1e-4


def transformers_module() -> Any:
    try:
        import transformers
    except ImportError:
        raise DinoError(
            "--format hf needs transformers; install it with pip install 'dino[export]' "
            "(or pip install transformers)"
        ) from None
    return transformers


def _blocks(model: nn.Module, registers: bool) -> dict[str, torch.Tensor]:
    """The blocks' tensors under the names of ViTModel (``registers``: Dinov2's)."""
    out: dict[str, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        p = f"encoder.layer.{i}."
        q, k, v = block.attn.qkv.weight.chunk(3)
        qb, kb, vb = block.attn.qkv.bias.chunk(3)
        for name, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[f"{p}attention.attention.{name}.weight"] = w
            out[f"{p}attention.attention.{name}.bias"] = b
        out[f"{p}attention.output.dense.weight"] = block.attn.proj.weight
        out[f"{p}attention.output.dense.bias"] = block.attn.proj.bias
        norm1, norm2 = ("norm1", "norm2") if registers else ("layernorm_before", "layernorm_after")
        fc1, fc2 = ("mlp.fc1", "mlp.fc2") if registers else ("intermediate.dense", "output.dense")
        for hf, ours in ((norm1, block.norm1), (norm2, block.norm2)):
            out[f"{p}{hf}.weight"], out[f"{p}{hf}.bias"] = ours.weight, ours.bias
        out[f"{p}{fc1}.weight"], out[f"{p}{fc1}.bias"] = block.mlp.fc1.weight, block.mlp.fc1.bias
        out[f"{p}{fc2}.weight"], out[f"{p}{fc2}.bias"] = block.mlp.fc2.weight, block.mlp.fc2.bias
        if registers:
            dim = block.norm1.weight.shape[0]
            for ls in ("layer_scale1", "layer_scale2"):
                out[f"{p}{ls}.lambda1"] = torch.ones(dim)
    return out


def hf_model_files(model: nn.Module, size: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json contents, state dict)`` of the transformers model equal to ``model``."""
    if not (hasattr(model, "blocks") and hasattr(model, "patch_embed")):
        arch = getattr(getattr(model, "weights_info", None), "arch", type(model).__name__)
        raise DinoError(f"--format hf exports ViTs, and {arch} is not one; use --format timm")
    block = model.blocks[0]
    if not isinstance(block.ls1, nn.Identity) or block.attn.qkv.bias is None:
        raise DinoError("--format hf: this ViT's blocks (layer scale, no qkv bias) are not ours")
    patch = int(model.patch_embed.patch_size[0])
    if size % patch:
        raise DinoError(
            f"--image-size {size} is not a multiple of the patch size {patch}; pass one that is"
        )
    grid = (size // patch, size // patch)
    dim = int(model.embed_dim)
    registers = int(getattr(model, "num_reg_tokens", 0) or 0)
    n_embedded = 0 if model.no_embed_class else int(model.num_prefix_tokens)
    pos = resample_pos_embed(model.pos_embed, grid, tuple(model.patch_embed.grid_size), n_embedded)
    common = {
        "hidden_size": dim,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": int(block.attn.num_heads),
        "hidden_act": "gelu",
        "layer_norm_eps": float(block.norm1.eps),
        "image_size": size,
        "patch_size": patch,
        "num_channels": 3,
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    state: dict[str, torch.Tensor] = {
        "embeddings.cls_token": model.cls_token,
        "embeddings.patch_embeddings.projection.weight": model.patch_embed.proj.weight,
        "embeddings.patch_embeddings.projection.bias": model.patch_embed.proj.bias,
        "layernorm.weight": model.norm.weight,
        "layernorm.bias": model.norm.bias,
        **_blocks(model, registers > 0),
    }
    if registers:
        config = {
            **common,
            "model_type": "dinov2_with_registers",
            "architectures": ["Dinov2WithRegistersModel"],
            "mlp_ratio": int(block.mlp.fc1.weight.shape[0]) // dim,
            "layerscale_value": 1.0,
            "use_swiglu_ffn": False,
            "num_register_tokens": registers,
        }
        state["embeddings.register_tokens"] = model.reg_token
        state["embeddings.mask_token"] = torch.zeros(1, dim)
        state["embeddings.position_embeddings"] = torch.cat([torch.zeros(1, 1, dim), pos], 1)
    else:
        config = {
            **common,
            "model_type": "vit",
            "architectures": ["ViTModel"],
            "intermediate_size": int(block.mlp.fc1.weight.shape[0]),
            "pooler_act": "linear",
        }
        state["embeddings.position_embeddings"] = pos
        state["pooler.dense.weight"] = torch.eye(dim)
        state["pooler.dense.bias"] = torch.zeros(dim)
    return config, {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def check_hf(output_dir: Path, model: nn.Module, size: int) -> float:
    """Largest ``|transformers - ours|`` of the features of a random batch, loading the export
    with ``AutoModel.from_pretrained``; a DinoError beyond the tolerance."""
    transformers = transformers_module()
    loaded = transformers.AutoModel.from_pretrained(str(output_dir), local_files_only=True).eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x).float()
        out = loaded(pixel_values=x)
    diff = max(
        float((out.pooler_output - want).abs().max()),
        float((out.last_hidden_state[:, 0] - want).abs().max()),
    )
    if not diff <= HF_TOLERANCE * max(1.0, float(want.abs().max())):
        raise DinoError(f"the transformers model differs from ours by {diff:.3g}; please report it")
    return diff


def export_hf(
    model: nn.Module, output_dir: str | Path, size: int, verify: bool = True
) -> dict[str, Any]:
    """Write ``model`` (a ViT from :func:`dino.load_backbone`) as a transformers folder;
    returns ``{"model_type", "files", "max_abs_diff"}``."""
    transformers_module()
    from safetensors.torch import save_file

    config, state = hf_model_files(model.cpu().eval(), size)
    info = model.weights_info
    config["dino"] = {"source": info.source, "arch": info.arch, "feature": "pooler_output"}
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", config)
    mean, std = input_stats(model)
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
    }
    write_json(out / "preprocessor_config.json", processor)
    res: dict[str, Any] = {
        "model_type": config["model_type"],
        "files": {n: str(out / n) for n in ("config.json", "model.safetensors")},
    }
    if verify:
        res["max_abs_diff"] = check_hf(out, model, size)
    return res
