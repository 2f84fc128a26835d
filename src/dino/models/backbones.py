"""Backbones: the networks whose features DINO trains.

Every backbone built here maps a batch of normalized images ``[B, 3, H, W]`` to one feature
vector per image ``[B, D]`` and exposes ``embed_dim`` (``D``):

* our ViT names (``vit_tiny``, ``vit_small``, ``vit_base``) with any patch size, built with timm's
  :class:`~timm.models.vision_transformer.VisionTransformer` exactly as docs/recipe.md ("Networks")
  defines them (depth 12, MLP ratio 4, qkv bias, LayerNorm eps 1e-6); the feature is the [CLS]
  token after the final norm and the learned positional embedding is bicubic-interpolated to the
  patch grid of any input size as the reference code does (:mod:`dino.models.vit`), so one
  network takes both global and local crops; ``registers`` adds register tokens ("Vision
  Transformers Need Registers", Darcet et al. 2024): learned tokens after [CLS] that the blocks
  may use as scratch space, with no positional embedding and in no output (neither the feature
  nor the patch tokens nor the attention maps);
* torchvision convnets as ``tv:<name>`` (``tv:resnet50``), classifier replaced by identity; the
  ResNet names the reference code trains (``resnet50``, ``resnet18`` ...: :func:`canonical_arch`)
  are torchvision's too, as there (torchvision's initialization: no zero-initialized last BN of
  the residual blocks, unlike timm's ResNets);
* any other timm model name (``convnext_tiny``, ``vit_small_patch16_224`` ...), classifier removed.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from dino.errors import DinoError

#: (embedding dim, heads) of the ViT sizes of docs/recipe.md, "Networks".
VIT_SIZES: dict[str, tuple[int, int]] = {
    "vit_pico": (96, 3),  # not in the paper: for small images on a CPU
    "vit_nano": (128, 4),  # not in the paper: for small images on a CPU
    "vit_tiny": (192, 3),
    "vit_small": (384, 6),
    "vit_base": (768, 12),
}


def canonical_arch(arch: str) -> str:
    """``arch`` as the backbone records it: ``tv:<name>`` for the name of one of torchvision's
    ResNets (``resnet50``, ``wide_resnet50_2``, ``resnext50_32x4d`` ...), which the reference
    code's ``--arch`` builds from torchvision; any other name unchanged (``timm:resnet50`` still
    asks for timm's)."""
    import torchvision

    resnets = torchvision.models.list_models(include=["resnet*", "resnext*", "wide_resnet*"])
    return f"tv:{arch}" if arch in resnets else arch


def vit(
    arch: str = "vit_small",
    patch_size: int = 16,
    img_size: int = 224,
    depth: int = 12,
    drop_path_rate: float = 0.0,
    registers: int = 0,
) -> nn.Module:
    """A DINO ViT (timm implementation): [CLS] after the final norm is the output feature.

    With ``registers`` > 0 neither [CLS] nor the registers get a positional embedding (timm's
    ``no_embed_class``, as timm holds DINOv2's register models): DINOv2 adds one to [CLS] and none
    to the registers, and a learned [CLS] plus a learned constant is again a learned [CLS].
    Without registers the network is the one of the DINO paper.
    """
    from dino.models.vit import DINOVisionTransformer

    if arch not in VIT_SIZES:
        raise DinoError(f"unknown ViT size {arch!r}; choose one of {', '.join(VIT_SIZES)}")
    dim, heads = VIT_SIZES[arch]
    model = DINOVisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        global_pool="token",
        dynamic_img_size=True,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        **({"reg_tokens": registers, "no_embed_class": True} if registers else {}),
    )
    for block in model.blocks:
        # On CPUs the fused attention kernel's backward is slower than the explicit one for
        # the short sequences of small crops; on GPUs the fused kernel wins.
        block.attn.fused_attn = torch.cuda.is_available()
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.trunc_normal_(model.cls_token, std=0.02)
    model.embed_dim = dim
    return model


class _TorchvisionTrunk(nn.Module):
    """A torchvision classifier with its last classification layer replaced by identity."""

    def __init__(self, name: str) -> None:
        super().__init__()
        import torchvision

        try:
            net = torchvision.models.get_model(name, weights=None)
        except ValueError as exc:
            raise DinoError(
                f"unknown torchvision model {name!r}; see torchvision.models.list_models()"
            ) from exc
        for attr in ("fc", "classifier", "head", "heads"):
            if hasattr(net, attr):
                setattr(net, attr, nn.Identity())
                break
        self.net = net
        with torch.no_grad():
            was_training = net.training
            net.eval()
            self.embed_dim = int(net(torch.zeros(1, 3, 64, 64)).shape[-1])
            net.train(was_training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_backbone(
    arch: str,
    patch_size: int = 16,
    img_size: int = 224,
    depth: int = 12,
    drop_path_rate: float = 0.0,
    registers: int = 0,
) -> nn.Module:
    """Build a backbone by name (see the module docstring); its output is ``[B, embed_dim]``."""
    arch = canonical_arch(arch)
    if arch in VIT_SIZES:
        if img_size % patch_size:
            raise DinoError(
                f"the crop size {img_size} is not divisible by the patch size {patch_size}; "
                "choose sizes that are multiples of the patch size"
            )
        return vit(arch, patch_size, img_size, depth, drop_path_rate, registers)
    if registers:
        raise DinoError(
            f"register tokens are for our ViTs ({', '.join(VIT_SIZES)}), not {arch}; "
            "drop --registers or choose one of them"
        )
    if arch.startswith("tv:"):
        return _TorchvisionTrunk(arch[3:])
    import timm

    name = arch.removeprefix("timm:")
    if not timm.is_model(name):
        raise DinoError(
            f"unknown arch {arch!r}: use vit_tiny, vit_small, vit_base, a timm model name "
            "(timm.list_models()) or tv:<torchvision model>"
        )
    kwargs: dict = {"num_classes": 0, "drop_path_rate": drop_path_rate}
    if "vit" in name or "deit" in name:
        kwargs["dynamic_img_size"] = True
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.embed_dim = int(model.num_features)
    return model


def vit_tokens(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The [CLS] feature ``[B, D]`` (what ``model(images)`` returns) and the patch tokens
    ``[B, N, D]`` (row-major) of one of our ViTs, both after the final norm; register tokens are
    in neither.

    ``masks`` ``[B, N]`` (bool): the embeddings of those patches are replaced by ``mask_token``
    ``[1, D]`` before the positional embedding is added (DINOv2's masked-image input).
    """
    x = model.patch_embed(images)  # [B, H/p, W/p, D] (dynamic image size)
    if masks is not None:
        if mask_token is None:
            raise ValueError("masks need a mask_token")
        keep = masks.reshape(*x.shape[:-1], 1)
        x = torch.where(keep, mask_token.to(x.dtype).reshape(1, 1, 1, -1), x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    if getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled():
        from timm.models import checkpoint_seq

        x = checkpoint_seq(model.blocks, x)  # --checkpoint-activations, as forward() does
    else:
        x = model.blocks(x)
    x = model.norm(x)
    return x[:, 0], x[:, model.num_prefix_tokens :]


def has_batchnorm(module: nn.Module) -> bool:
    """True when ``module`` has a BatchNorm layer: convnet backbones, a head with BN (they get
    synchronized BN under DDP, and a head with BN sees all views in one batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
