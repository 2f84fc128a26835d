"""Self-attention maps (dino.viz.attention) and ``dino attention``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dino.cli import main
from dino.errors import DinoError
from dino.eval.attention import attention_masks, cls_attention
from dino.models.backbones import vit
from dino.viz.attention import save_attention_maps
from dino.viz.drawing import prepare_image

torch.set_num_threads(1)


def tiny_vit(patch: int = 8, depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    model = vit("vit_pico", patch, 32, depth).eval()
    with torch.no_grad():  # sharper attention than the near-uniform random init
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8.0)
    return model


def photo(width: int = 61, height: int = 43, mode: str = "RGB") -> Image.Image:
    """A picture with structure: a bright disc on a gradient."""
    yy, xx = np.mgrid[0:height, 0:width]
    r = np.hypot(xx - width * 0.6, yy - height * 0.4)
    rgb = np.stack(
        [255 * (r < min(width, height) / 4), 255 * xx / width, 255 * yy / height], -1
    ).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    if mode == "I;16":
        return Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    return img.convert(mode)


def test_explicit_attention_matches_timm_attention() -> None:
    """The [CLS] row of softmax(QK^T/sqrt(d)) equals what timm's unfused path computes."""
    model = tiny_vit(patch=4, depth=3)
    last = model.blocks[-1].attn
    last.fused_attn = False
    seen = {}
    hook = last.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("attn", o))
    x = torch.randn(2, 3, 24, 36)
    with torch.no_grad():
        model(x)
    hook.remove()
    want = seen["attn"][:, :, 0, 1:].reshape(2, last.num_heads, 6, 9)
    got = cls_attention(model, x)
    assert got.shape == (2, 3, 6, 9)
    assert float((got - want).abs().max()) <= 1e-5
    assert torch.all(got.sum((-2, -1)) <= 1 + 1e-6)  # the rest goes to [CLS] itself


def test_masks_keep_the_threshold_mass_with_fewest_patches() -> None:
    torch.manual_seed(0)
    att = torch.rand(4, 5, 7) ** 4
    att = att / att.sum((-2, -1), keepdim=True)
    for threshold in (0.3, 0.6, 0.9):
        masks = attention_masks(att, threshold)
        for a, m in zip(att, masks, strict=True):
            kept = a[m]
            assert kept.sum() >= threshold - 1e-6
            assert kept.sum() - kept.min() < threshold  # dropping one falls short
            assert kept.min() >= a[~m].max() if (~m).any() else True


def test_prepare_image_crops_to_multiples_of_the_patch() -> None:
    x, pic = prepare_image(photo(61, 43), 8, None, [0.5] * 3, [0.5] * 3)
    assert x.shape == (1, 3, 40, 56) and pic.size == (56, 40)
    x, pic = prepare_image(photo(61, 43), 8, 64, [0.5] * 3, [0.5] * 3)
    assert x.shape[-2] == 64 and x.shape[-1] % 8 == 0
    with pytest.raises(DinoError, match="larger --image-size"):
        prepare_image(photo(5, 5), 8, None, [0.5] * 3, [0.5] * 3)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16", "CMYK"])
def test_save_attention_maps_any_mode(tmp_path, mode: str) -> None:
    model = tiny_vit()
    src = tmp_path / f"in-{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
    photo(mode=mode).save(src)
    res = save_attention_maps(model, src, tmp_path / "out", threshold=0.6)
    heads = model.blocks[-1].attn.num_heads
    assert res["attention"].shape == (heads, 5, 7)
    for name in ["overview.png", "attn-mean.png", "image.png", "attention.npy"] + [
        f"{kind}-head{i}.png" for kind in ("attn", "mask") for i in range(heads)
    ]:
        assert (tmp_path / "out" / name).is_file(), name
    mask = np.asarray(Image.open(tmp_path / "out" / "mask-head0.png"))
    assert mask.shape == (40, 56) and 0 < (mask > 0).mean() < 1


def assert_not_blank(path) -> None:
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 20 and img.shape[1] > 100
    assert img.std() > 10
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20


def test_attention_command(tmp_path, capsys) -> None:
    model = tiny_vit()
    torch.save(model.state_dict(), tmp_path / "vit.pth")  # reference backbone-only format
    photo(70, 50, "RGBA").save(tmp_path / "a.png")
    photo(33, 90, "L").save(tmp_path / "b.png")
    rc = main([
        "attention", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--weights",
        str(tmp_path / "vit.pth"), "--output", str(tmp_path / "att"), "--image-size", "48",
    ])  # fmt: skip
    assert rc == 0
    for stem in ("a", "b"):
        assert_not_blank(tmp_path / "att" / stem / "overview.png")
    assert "overview.png" in capsys.readouterr().out


def test_attention_command_on_scikit_image_photos(tmp_path) -> None:
    data = pytest.importorskip("skimage.data")
    model = tiny_vit()
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    for name in ("astronaut", "chelsea", "camera"):
        Image.fromarray(getattr(data, name)()).save(tmp_path / f"{name}.png")
    rc = main(["attention", str(tmp_path), "--weights", str(tmp_path / "vit.pth"),
               "--output", str(tmp_path / "att"), "--image-size", "64"])  # fmt: skip
    assert rc == 0
    for name in ("astronaut", "chelsea", "camera"):
        assert_not_blank(tmp_path / "att" / name / "overview.png")


def test_attention_needs_a_vit(tmp_path, capsys) -> None:
    from dino.models.backbones import build_backbone

    net = build_backbone("tv:resnet18")
    torch.save(net.net.state_dict(), tmp_path / "r18.pth")
    photo().save(tmp_path / "a.png")
    rc = main(["attention", str(tmp_path / "a.png"), "--weights", str(tmp_path / "r18.pth"),
               "--output", str(tmp_path / "att")])  # fmt: skip
    assert rc == 2
    assert "dino: error: attention maps need a ViT" in capsys.readouterr().err
    rc = main(["attention", str(tmp_path / "missing.png"), "--weights", str(tmp_path / "r18.pth")])
    assert rc == 2
    assert "missing.png" in capsys.readouterr().err
