"""Networks (docs/recipe.md, "Networks"), optimizer parameter groups, teacher EMA and clipping."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dino.config_load import load_config
from dino.errors import DinoError
from dino.models.backbones import build_backbone, vit
from dino.models.head import DINOHead
from dino.models.multicrop import MultiCropNet
from dino.training.networks import build_networks
from dino.training.optim import build_optimizer, param_groups
from dino.training.step import clip_per_parameter, ema_update, student_parts

PATCH, GLOBAL, LOCAL = 4, 28, 12


def tiny_vit(depth: int = 1) -> nn.Module:
    return vit("vit_pico", patch_size=PATCH, img_size=GLOBAL, depth=depth).eval()


def effective_last_weight(head: DINOHead) -> torch.Tensor:
    return head.last_layer.weight  # the parametrization computes g * v / ||v||


# ------------------------------------------------------------------ DINOHead


def test_head_default_sizes_are_the_papers() -> None:
    params = inspect.signature(DINOHead).parameters
    assert params["out_dim"].default == 65536
    assert params["hidden_dim"].default == 2048
    assert params["bottleneck_dim"].default == 256
    assert params["nlayers"].default == 3
    assert params["use_bn"].default is False
    assert params["norm_last_layer"].default is True


def test_head_layer_structure() -> None:
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8)
    layers = list(head.mlp)
    kinds = [type(m) for m in layers]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    shapes = [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)]
    assert shapes == [(12, 16), (16, 16), (16, 8)]
    last = head.last_layer
    assert (last.in_features, last.out_features) == (8, 20)
    assert last.bias is None


def test_head_with_batchnorm() -> None:
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8, use_bn=True)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [
        nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear
    ]  # fmt: skip


def test_head_init_truncated_normal_002_and_zero_bias() -> None:
    head = DINOHead(256, out_dim=64, hidden_dim=256, bottleneck_dim=64)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for m in linears:  # 256x256, 256x256, 64x256
        w = m.weight.detach()
        # nn.Linear's own init is uniform with std 1 / sqrt(3 * 256) = 0.036: the std and the
        # shape tell them apart (a normal holds 68.3 % of its mass within one std, a uniform
        # of the same std 57.7 %)
        assert w.std().item() == pytest.approx(0.02, rel=0.05)
        assert w.mean().abs().item() < 0.001
        within_one_std = (w.abs() <= 0.02).float().mean().item()
        assert within_one_std == pytest.approx(0.683, abs=0.02)
        assert torch.count_nonzero(m.bias) == 0


def test_head_last_layer_keeps_the_linear_default_init() -> None:
    """The reference code creates the weight-normed last layer after initializing the MLP, so its
    directions ``v`` keep nn.Linear's init: uniform on [-1/sqrt(in), 1/sqrt(in)], std
    1 / sqrt(3 in), 57.7 % of the mass within one std (a truncated normal 0.02 has std 0.02)."""
    head = DINOHead(64, out_dim=4096, hidden_dim=64, bottleneck_dim=256)
    v = head.last_layer.parametrizations.weight.original1.detach()  # [4096, 256]
    bound = 1 / 256**0.5
    assert v.abs().max().item() <= bound
    assert v.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)
    within_one_std = (v.abs() <= bound / 3**0.5).float().mean().item()
    assert within_one_std == pytest.approx(0.577, abs=0.01)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_last_layer_weight_norm(norm_last_layer: bool) -> None:
    head = DINOHead(
        12, out_dim=20, hidden_dim=16, bottleneck_dim=8, norm_last_layer=norm_last_layer
    )
    g = head.last_layer.parametrizations.weight.original0
    torch.testing.assert_close(g, torch.ones_like(g))  # starts at 1 either way
    assert g.requires_grad is (not norm_last_layer)
    # row norms of the effective weight are g = 1
    norms = effective_last_weight(head).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(20))


def test_head_frozen_norm_stays_one_after_training_steps() -> None:
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8, norm_last_layer=True)
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        (head(torch.randn(4, 12)) ** 2).sum().backward()
        opt.step()
    g = head.last_layer.parametrizations.weight.original0
    torch.testing.assert_close(g, torch.ones_like(g))
    torch.testing.assert_close(effective_last_weight(head).norm(dim=1), torch.ones(20))


def test_head_trainable_norm_changes_when_not_frozen() -> None:
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    (head(torch.randn(4, 12)) ** 2).sum().backward()
    opt.step()
    g = head.last_layer.parametrizations.weight.original0
    assert not torch.allclose(g, torch.ones_like(g))


def test_head_forward_is_normalized_bottleneck_times_unit_rows() -> None:
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8).eval()
    x = torch.randn(5, 12)
    z = head.mlp(x)
    z = z / z.norm(dim=1, keepdim=True)
    v = head.last_layer.parametrizations.weight.original1
    w = v / v.norm(dim=1, keepdim=True)  # g = 1
    out = head(x)
    torch.testing.assert_close(out, z @ w.T)
    # unit vector times unit rows: cosine similarities
    assert out.abs().max().item() <= 1.0 + 1e-5
    # scaling the MLP output does not matter (it is L2-normalized)
    with torch.no_grad():
        head.mlp[-1].weight.mul_(7.0)
        head.mlp[-1].bias.mul_(7.0)
    torch.testing.assert_close(head(x), out)


# ------------------------------------------------------------------ ViT backbone


def test_vit_cls_feature_shape_and_definition() -> None:
    net = tiny_vit()
    x = torch.randn(3, 3, GLOBAL, GLOBAL)
    with torch.no_grad():
        f = net(x)
        tokens = net.forward_features(x)  # after the final norm
    assert f.shape == (3, 96)
    assert net.embed_dim == 96
    assert tokens.shape == (3, 1 + (GLOBAL // PATCH) ** 2, 96)
    torch.testing.assert_close(f, tokens[:, 0])


def test_vit_recipe_hyperparameters() -> None:
    net = vit("vit_small", patch_size=16, img_size=32, depth=2)
    assert net.embed_dim == 384
    blk = net.blocks[0]
    assert blk.attn.num_heads == 6
    assert blk.mlp.fc1.out_features == 4 * 384
    assert blk.attn.qkv.bias is not None
    assert net.norm.eps == pytest.approx(1e-6)
    assert len(net.blocks) == 2


def test_vit_accepts_global_and_local_sizes() -> None:
    net = tiny_vit()
    with torch.no_grad():
        assert net(torch.randn(2, 3, GLOBAL, GLOBAL)).shape == (2, 96)
        assert net(torch.randn(2, 3, LOCAL, LOCAL)).shape == (2, 96)


def _fixed_size_copy(net: nn.Module, img_size: int, pos_embed: torch.Tensor) -> nn.Module:
    """A timm ViT without dynamic resizing, with ``net``'s weights and the given pos-embed."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    ref = VisionTransformer(
        img_size=img_size, patch_size=PATCH, embed_dim=96, depth=len(net.blocks), num_heads=3,
        mlp_ratio=4.0, qkv_bias=True, num_classes=0, global_pool="token",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()  # fmt: skip
    state = {k: v for k, v in net.state_dict().items() if k != "pos_embed"}
    state["pos_embed"] = pos_embed
    ref.load_state_dict(state)
    for blk in ref.blocks:
        blk.attn.fused_attn = False
    for blk in net.blocks:
        blk.attn.fused_attn = False
    return ref


def test_vit_native_size_interpolation_is_identity() -> None:
    net = tiny_vit(depth=2)
    ref = _fixed_size_copy(net, GLOBAL, net.pos_embed.detach().clone())
    x = torch.randn(2, 3, GLOBAL, GLOBAL)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x))


def test_vit_pos_embed_is_interpolated_for_small_crops() -> None:
    """A constant patch-grid pos-embed stays constant under bicubic interpolation, so the 12-px
    features equal those of a fixed 12-px ViT with that constant (and the [CLS] entry kept)."""
    net = tiny_vit()
    cls_pe = torch.randn(1, 1, 96)
    patch_pe = torch.randn(1, 1, 96)
    with torch.no_grad():
        net.pos_embed.copy_(torch.cat([cls_pe, patch_pe.expand(1, (GLOBAL // PATCH) ** 2, 96)], 1))
    small = torch.cat([cls_pe, patch_pe.expand(1, (LOCAL // PATCH) ** 2, 96)], 1)
    ref = _fixed_size_copy(net, LOCAL, small)
    x = torch.randn(2, 3, LOCAL, LOCAL)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), atol=1e-5, rtol=1e-4)


def test_vit_pos_embed_resampled_as_the_reference_code() -> None:
    """For another patch grid the reference's ``interpolate_pos_encoding`` resamples the learned
    grid bicubically with scale factor (new + 0.1) / old and no antialiasing; timm's default
    (antialiased, sized new / old) gives other values when shrinking 7x7 to 3x3."""
    from timm.layers import resample_abs_pos_embed

    net = tiny_vit()
    old, new, dim = GLOBAL // PATCH, LOCAL // PATCH, net.embed_dim
    with torch.no_grad():
        net.pos_embed.normal_()
        grid = net.pos_embed[:, 1:].reshape(1, old, old, dim).permute(0, 3, 1, 2)
        scale = (new + 0.1) / old
        expected = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic")
        expected = expected.permute(0, 2, 3, 1).reshape(1, new * new, dim)
        tokens = net._pos_embed(torch.zeros(1, new, new, dim))  # [CLS] + patches, no input
        timm_default = resample_abs_pos_embed(net.pos_embed, [new, new], [old, old])
    assert tokens.shape == (1, 1 + new * new, dim)
    torch.testing.assert_close(tokens[:, 1:], expected)
    torch.testing.assert_close(tokens[:, 0], (net.cls_token + net.pos_embed[:, 0])[:, 0])
    assert not torch.allclose(timm_default[:, 1:], expected, atol=1e-3)


def test_vit_small_crops_use_the_positional_embedding() -> None:
    net = tiny_vit()
    x = torch.randn(1, 3, LOCAL, LOCAL)
    with torch.no_grad():
        before = net(x)
        net.pos_embed.add_(torch.randn_like(net.pos_embed))
        after = net(x)
    assert not torch.allclose(before, after)


def test_build_backbone_vit_and_errors() -> None:
    net = build_backbone("vit_pico", patch_size=PATCH, img_size=GLOBAL, depth=1)
    assert net.embed_dim == 96
    with pytest.raises(DinoError):
        build_backbone("definitely_not_a_model", patch_size=PATCH, img_size=GLOBAL, depth=1)
    with pytest.raises(DinoError):
        build_backbone("tv:definitely_not_a_model")
    with pytest.raises(DinoError, match="divisible"):
        build_backbone("vit_pico", patch_size=5, img_size=GLOBAL, depth=1)


def test_build_backbone_drop_path_rate() -> None:
    from timm.layers import DropPath

    net = build_backbone("vit_pico", patch_size=PATCH, img_size=GLOBAL, depth=2, drop_path_rate=0.1)
    assert any(isinstance(m, DropPath) for m in net.modules())
    net0 = build_backbone("vit_pico", patch_size=PATCH, img_size=GLOBAL, depth=2)
    assert not any(isinstance(m, DropPath) for m in net0.modules())


# ------------------------------------------------------------------ MultiCropNet


def test_multicrop_net_matches_per_view_forward() -> None:
    backbone = tiny_vit()
    head = DINOHead(96, out_dim=10, hidden_dim=16, bottleneck_dim=8).eval()
    net = MultiCropNet(backbone, head).eval()
    b = 2
    views = [torch.randn(b, 3, GLOBAL, GLOBAL) for _ in range(2)]
    views += [torch.randn(b, 3, LOCAL, LOCAL) for _ in range(3)]
    with torch.no_grad():
        out = net(views)
        expected = torch.cat([head(backbone(v)) for v in views])
    assert out.shape == (5 * b, 10)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_multicrop_net_keeps_view_order_for_interleaved_sizes() -> None:
    backbone = tiny_vit()
    head = DINOHead(96, out_dim=10, hidden_dim=16, bottleneck_dim=8).eval()
    net = MultiCropNet(backbone, head).eval()
    views = [
        torch.randn(2, 3, GLOBAL, GLOBAL),
        torch.randn(2, 3, LOCAL, LOCAL),
        torch.randn(2, 3, GLOBAL, GLOBAL),
    ]
    with torch.no_grad():
        out = net(views)
        expected = torch.cat([head(backbone(v)) for v in views])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ setup: networks, groups


def tiny_cfg(**overrides):
    base = {
        "depth": 1,
        "out_dim": 16,
        "head_hidden_dim": 32,
        "head_bottleneck_dim": 8,
        "drop_path_rate": 0.1,
        "norm_last_layer": True,
    }
    base.update(overrides)
    return load_config("fashion-mnist", base)


def test_build_networks_teacher_is_copy_without_grad() -> None:
    # depth 2: the drop-path rate rises linearly over the blocks from 0, so depth 1 has none
    student, teacher = build_networks(tiny_cfg(depth=2))
    s_state, t_state = student.state_dict(), teacher.state_dict()
    assert s_state.keys() == t_state.keys()
    for k in s_state:
        torch.testing.assert_close(s_state[k], t_state[k], rtol=0, atol=0)
    assert all(not p.requires_grad for p in teacher.parameters())
    g = student.head.last_layer.parametrizations.weight.original0
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert len(trainable) == len(list(student.parameters())) - 1  # only g frozen
    assert all(p is not g for p in trainable)
    # stochastic depth in the student only
    from timm.layers import DropPath

    assert any(isinstance(m, DropPath) for m in student.modules())
    assert not any(isinstance(m, DropPath) for m in teacher.modules())
    # same function in eval mode
    student.eval()
    teacher.eval()
    views = [torch.randn(2, 1, GLOBAL, GLOBAL).expand(-1, 3, -1, -1) for _ in range(2)]
    with torch.no_grad():
        torch.testing.assert_close(student(views), teacher(views))


def test_param_groups_small_module() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2, bias=False))
    frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    model.register_parameter("frozen", frozen)
    decay, no_decay = param_groups(model)
    assert decay["apply_wd"] is True and no_decay["apply_wd"] is False
    assert no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}
    assert ids(decay["params"]) == {id(model[0].weight), id(model[2].weight)}
    assert ids(no_decay["params"]) == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


@pytest.mark.parametrize("arch", ["vit_small", "tv:resnet50"])
def test_optimizer_auto_is_adamw_for_every_backbone(arch: str) -> None:
    """``--optimizer`` defaults to AdamW as the reference's ``--optimizer adamw`` does, convnets
    with BatchNorm included (SGD with AdamW's lr and weight decay would be far off); SGD only
    when asked for, as the resnet50 preset does with its own lr and weight decay."""
    convnet = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(4))
    cfg = load_config(None, {"arch": arch})
    assert cfg.optim.optimizer == "auto"
    assert type(build_optimizer(convnet, cfg, torch.device("cpu"))) is torch.optim.AdamW
    preset = load_config("resnet50")
    assert preset.optim.optimizer == "sgd" and preset.optim.lr == 0.03
    assert type(build_optimizer(convnet, preset, torch.device("cpu"))) is torch.optim.SGD


def test_param_groups_on_dino_student() -> None:
    student, _ = build_networks(tiny_cfg())
    decay, no_decay = param_groups(student)
    d, nd = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert not d & nd
    names = dict((id(p), n) for n, p in student.named_parameters())
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    assert d | nd == trainable  # frozen (the last layer's g) excluded
    for i in nd:
        p = dict(student.named_parameters())[names[i]]
        assert p.ndim <= 1 or names[i].endswith(".bias")
    for i in d:
        p = dict(student.named_parameters())[names[i]]
        assert p.ndim >= 2 and not names[i].endswith(".bias")
    assert id(student.backbone.norm.weight) in nd
    assert id(student.backbone.blocks[0].attn.qkv.bias) in nd
    assert id(student.backbone.blocks[0].attn.qkv.weight) in d


# ------------------------------------------------------------------ EMA and clipping


@pytest.mark.parametrize("m", [0.0, 0.5, 0.996, 1.0])
def test_ema_update_formula(m: float) -> None:
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    teacher = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_()
    t0 = [p.detach().clone() for p in teacher.parameters()]
    s0 = [p.detach().clone() for p in student.parameters()]
    ema_update(teacher, student, m)
    for pt, a, b in zip(teacher.parameters(), t0, s0, strict=True):
        torch.testing.assert_close(pt, m * a + (1 - m) * b, atol=1e-6, rtol=1e-6)
    for ps, b in zip(student.parameters(), s0, strict=True):  # the student is untouched
        torch.testing.assert_close(ps, b, atol=0, rtol=0)


def test_ema_update_on_dino_networks() -> None:
    student, teacher = build_networks(tiny_cfg())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for pt, b, ps in zip(teacher.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(pt, 0.9 * b + 0.1 * ps.detach(), atol=1e-6, rtol=1e-5)


def test_clip_per_parameter() -> None:
    big = nn.Parameter(torch.zeros(3))
    small = nn.Parameter(torch.zeros(2, 2))
    nograd = nn.Parameter(torch.zeros(2))
    big.grad = torch.tensor([6.0, 8.0, 0.0])  # norm 10
    small.grad = torch.tensor([[0.3, 0.4], [0.0, 0.0]])  # norm 0.5
    clip_per_parameter([big, small, nograd], max_norm=3.0)
    torch.testing.assert_close(big.grad, torch.tensor([1.8, 2.4, 0.0]), atol=1e-5, rtol=1e-5)
    assert big.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(small.grad, torch.tensor([[0.3, 0.4], [0.0, 0.0]]), atol=0, rtol=0)
    assert nograd.grad is None


def test_clip_per_parameter_is_not_global() -> None:
    """Two parameters each of norm 2 with max_norm 2.5: a global clip would scale both (global
    norm 2.83); per-parameter clipping leaves both unchanged."""
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([2.0]), torch.tensor([-2.0])
    clip_per_parameter([a, b], max_norm=2.5)
    assert a.grad.item() == 2.0 and b.grad.item() == -2.0
    # and F.normalize-like direction is kept when clipping happens
    c = nn.Parameter(torch.zeros(2))
    c.grad = torch.tensor([3.0, -4.0])
    clip_per_parameter([c], max_norm=1.0)
    torch.testing.assert_close(
        c.grad, F.normalize(torch.tensor([3.0, -4.0]), dim=0), atol=1e-5, rtol=0
    )


def test_convnets_run_channels_last_and_compute_the_same() -> None:
    """Convnet students and teachers keep their weights and inputs NHWC (faster convolutions);
    the outputs and gradients are those of the default layout, and ViTs are left alone."""
    cfg = load_config(None, {"arch": "tv:resnet18", "out_dim": 32, "head_hidden_dim": 16})
    torch.manual_seed(0)
    student, teacher = build_networks(cfg)
    assert student.channels_last and teacher.channels_last
    conv = student.backbone.net.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    plain = MultiCropNet(
        build_backbone("tv:resnet18"),
        DINOHead(512, 32, 16, use_bn=False, norm_last_layer=True),
    )
    plain.load_state_dict(student.state_dict())
    views = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)]
    student.eval(), plain.eval()  # batch statistics of 2 images would amplify rounding
    out, ref = student(views), plain(views)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(
        student.backbone.net.conv1.weight.grad, plain.backbone.net.conv1.weight.grad,
        atol=1e-3, rtol=1e-3,
    )  # fmt: skip
    vit_student, _ = build_networks(load_config(None, {"arch": "vit_pico", "depth": 1}))
    assert not vit_student.channels_last


def test_training_step_backpropagates_one_resolution_at_a_time(tmp_path) -> None:
    """Views are split into runs of one size (globals, locals); a head with BatchNorm, whose
    statistics cover all views, keeps them together."""
    from dino.training import Trainer

    base = {"arch": "vit_pico", "patch_size": 4, "depth": 1, "global_size": 8, "local_size": 4}
    base |= {"out_dim": 16, "head_hidden_dim": 8, "batch_size": 4, "subset": 16, "local_crops": 3}
    views = [torch.zeros(4, 3, 8, 8)] * 2 + [torch.zeros(4, 3, 4, 4)] * 3
    trainer = Trainer(load_config(None, {**base, "output_dir": str(tmp_path / "a")}))
    assert student_parts(trainer.learner, views) == [(0, 2), (2, 5)]
    cfg = load_config(None, {**base, "use_bn_in_head": True, "output_dir": str(tmp_path / "b")})
    assert student_parts(Trainer(cfg).learner, views) == [(0, 5)]
