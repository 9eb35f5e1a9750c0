"""A ViT's frozen prefix (patch embedding + leading frozen blocks) runs under torch.no_grad(): the same outputs and
the same gradients as without, for timm's VisionTransformer and Eva (DINOv3, gold's family), with drop-path,
gradient checkpointing and torch.compile; CNNs keep the plain forward."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

from biomass.models.backbones import frozen_prefix
from biomass.registry import BACKBONES

SIZE = (32, 48)
# A small Eva with RoPE, CLS and 4 register tokens: DINOv3's structure at test size.
EVA = ("vit_small_patch16_dinov3", {"depth": 4, "embed_dim": 64, "num_heads": 2})
VIT = ("test_vit", {})


def build(model, no_grad_prefix=True, grad_checkpointing=False, **freeze):
    name, kwargs = model
    torch.manual_seed(0)
    return BACKBONES.build("timm", SIZE, model_name=name, model_kwargs=kwargs, drop_path_rate=0.2,
                           no_grad_prefix=no_grad_prefix, grad_checkpointing=grad_checkpointing, **freeze).train()


def step(bb, fn=None, x_requires_grad=False):
    """One training forward + backward with fixed input, loss weights and dropout/drop-path draws."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *SIZE, generator=g).requires_grad_(x_requires_grad)
    torch.manual_seed(5)
    out = (bb if fn is None else fn)(x)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    grads = {n: p.grad for n, p in bb.named_parameters() if p.requires_grad}
    return out.detach(), grads, x.grad


def assert_same(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
    assert (a[2] is None) == (b[2] is None) and (a[2] is None or torch.equal(a[2], b[2]))


CASES = [(VIT, {"freeze_blocks": 2}, ["patch_embed", "blocks.0", "blocks.1"]),
         (VIT, {"freeze_fraction": 0.5}, ["patch_embed", "blocks.0", "blocks.1"]),  # cuts inside block 2
         (EVA, {"freeze_fraction": 0.5}, ["patch_embed", "blocks.0"]),
         (EVA, {"freeze_blocks": 3}, ["patch_embed", "blocks.0", "blocks.1", "blocks.2"]),
         (EVA, {"freeze_blocks": 0}, ["patch_embed"])]


@pytest.mark.parametrize("grad_checkpointing", [False, True])
@pytest.mark.parametrize("model, freeze, expected", CASES)
def test_same_outputs_and_gradients(model, freeze, expected, grad_checkpointing):
    on = build(model, True, grad_checkpointing, **freeze)
    off = build(model, False, grad_checkpointing, **freeze)
    assert on.no_grad_modules == expected and off.no_grad_modules == []
    assert on.state_dict().keys() == off.state_dict().keys()
    assert_same(step(on), step(off))


@pytest.mark.parametrize("model", [VIT, EVA])
def test_prefix_runs_without_grad_and_the_rest_with(model):
    bb = build(model, freeze_blocks=2)
    seen = {}
    for name, module in bb.model.named_modules():
        if name in ("patch_embed", "norm") or name.count(".") == 1 and name.startswith("blocks."):
            # pre-hooks run in registration order, so this one sees the mode the module runs in
            module.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, [torch.is_grad_enabled()]))
            module.register_forward_hook(lambda m, a, o, name=name: seen[name].append(o.requires_grad))
    out = bb(torch.randn(2, 3, *SIZE))
    seen = {k: tuple(v) for k, v in seen.items()}
    n = len(bb.model.blocks)
    assert seen["patch_embed"] == (False, False) and seen["blocks.0"] == seen["blocks.1"] == (False, False)
    assert all(seen[f"blocks.{i}"] == (True, True) for i in range(2, n)) and seen["norm"] == (True, True)
    assert out.requires_grad and torch.is_grad_enabled()  # the caller's mode is back
    with torch.no_grad():
        assert not bb(torch.randn(2, 3, *SIZE)).requires_grad and not torch.is_grad_enabled()
    with torch.inference_mode():
        bb(torch.randn(2, 3, *SIZE))
    assert torch.is_grad_enabled()


def test_grad_mode_restored_after_an_error():
    bb = build(VIT, freeze_blocks=2)

    def boom(x):
        raise RuntimeError("boom")

    bb.model.blocks[1].forward = boom
    with pytest.raises(RuntimeError, match="boom"):
        bb(torch.randn(2, 3, *SIZE))
    assert torch.is_grad_enabled()


def test_an_input_that_needs_grad_is_not_cut():
    """Gradients with respect to the image (saliency) still flow: the prefix only drops grad when nothing needs it."""
    on, off = build(VIT, freeze_blocks=2), build(VIT, False, freeze_blocks=2)
    a, b = step(on, x_requires_grad=True), step(off, x_requires_grad=True)
    assert a[2] is not None and a[2].abs().sum() > 0
    assert_same(a, b)


@pytest.mark.parametrize("model, freeze, expected", [
    (VIT, {"freeze_fraction": 0.0}, []),  # nothing frozen
    (VIT, {"freeze_fraction": 0.01}, []),  # only cls_token frozen: pos_embed trains, the first block's input needs grad
    (VIT, {"freeze_fraction": 1.0}, ["patch_embed"] + [f"blocks.{i}" for i in range(6)]),
    (("test_resnet", {}), {"freeze_fraction": 0.5}, []),  # no `blocks`: the plain forward
])
def test_which_modules(model, freeze, expected):
    bb = build(model, **freeze)
    assert bb.no_grad_modules == expected == frozen_prefix(bb.model)
    if not expected:  # nothing hooked
        assert not any(m._forward_pre_hooks for m in bb.modules())


def test_deepcopy_keeps_working():
    bb = build(EVA, freeze_fraction=0.5)
    twin = copy.deepcopy(bb)
    assert_same(step(bb), step(twin))
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_under_torch_compile(backend):
    torch._dynamo.reset()
    on, off = build(VIT, freeze_blocks=2), build(VIT, False, freeze_blocks=2)
    assert_same(step(on, torch.compile(on, backend=backend)), step(off, torch.compile(off, backend=backend)))
    assert torch.is_grad_enabled()


def test_freeze_fraction_follows_named_parameters_order_for_cnns():
    names = [n for n, _ in timm.create_model("test_resnet", num_classes=0).named_parameters()]
    bb = BACKBONES.build("timm", (32, 32), model_name="test_resnet", freeze_fraction=0.5)
    params = dict(bb.model.named_parameters())
    half = len(names) // 2
    # the first half is frozen: a parameter that no longer trains, or a frozen BatchNorm's buffer now
    assert all(n not in params or not params[n].requires_grad for n in names[:half])
    assert any(n not in params for n in names[:half])  # whole BatchNorm layers froze (FrozenBatchNorm2d)
    assert all(params[n].requires_grad for n in names[half:])


def test_a_frozen_cnn_half_keeps_its_batchnorm_statistics():
    # freeze_fraction freezes parameters; a BatchNorm in train mode would still move its running statistics
    torch.manual_seed(0)
    bb = BACKBONES.build("timm", (32, 32), model_name="test_resnet", freeze_fraction=0.5)
    bb.train()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    bb(torch.randn(4, 3, 32, 32) * 3 + 1)
    moved = {k for k, v in bb.state_dict().items() if not torch.equal(v, before[k])}
    bn = {n: m for n, m in bb.named_modules() if "BatchNorm" in type(m).__name__}
    frozen = [n for n, m in bn.items() if "Frozen" in type(m).__name__]
    trainable = [n for n in bn if n not in frozen]
    assert frozen and trainable
    assert not [k for k in moved if any(k.startswith(f"{n}.") for n in frozen)], moved
    assert all(f"{n}.running_mean" in moved for n in trainable)
