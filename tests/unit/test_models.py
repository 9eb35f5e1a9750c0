"""biomass.models, losses, schedulers: every registered component, timm backbones, weights files, the built model."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from helpers import DEMO

from biomass.config.load import load_experiment
from biomass.data.scalers import Scaler
from biomass.errors import ConfigError
from biomass.weights import read_state_dict
from biomass.models.backbones import TimmBackbone
from biomass.models.heads import FusionHead
from biomass.engine.build import build_stage_model
from biomass.models.model import TargetSpace
from biomass.stages import AUX, MAIN
from biomass.registry import BACKBONES, HEADS, LOSSES, POOLINGS, SCHEDULERS



def test_registries_filled():
    assert BACKBONES.names() == ["timm"]
    assert {"gap", "cls", "gem", "hybrid_texture"} <= set(POOLINGS.names())
    assert {"fusion", "image_only", "aux_mlp", "consistent"} <= set(HEADS.names())
    assert {"weighted_smooth_l1", "mse", "quantile", "log_cosh", "r2"} <= set(LOSSES.names())
    assert {"cosine_warm_restarts", "cosine", "plateau", "constant"} <= set(SCHEDULERS.names())


# ------------------------------------------------------------------------------------------------------ backbones
# (model, image size (h, w), expected prefix tokens, expected grid)
SHAPES = [
    ("test_vit", (32, 32), 1, (2, 2)),
    ("test_vit", (32, 64), 1, (2, 4)),
    ("test_vit", (48, 32), 1, (3, 2)),
    ("vit_small_patch16_dinov3", (48, 32), 5, (3, 2)),  # CLS + 4 registers; (32, 48) in the gap test below
    ("resnet18", (64, 64), 0, (2, 2)),
    ("resnet18", (40, 72), 0, (2, 3)),  # not a multiple of the stride: ceil
    ("test_resnet", (32, 96), 0, (1, 3)),
]


@pytest.mark.parametrize("name, size, prefix, grid", SHAPES)
def test_backbone_tokens_match_spec(name, size, prefix, grid):
    torch.manual_seed(0)
    bb = BACKBONES.build("timm", size, model_name=name)
    assert isinstance(bb, TimmBackbone)
    spec = bb.spec
    assert spec.num_prefix_tokens == prefix and spec.grid == grid
    assert spec.dim == bb.model.num_features
    assert spec.patch_size == (16 if "vit" in name else 32)
    bb.eval()
    with torch.no_grad():
        tokens = bb(torch.randn(2, 3, *size))
    assert tokens.shape == (2, prefix + grid[0] * grid[1], spec.dim)


def test_cnn_tokens_are_the_feature_map_row_major():
    bb = BACKBONES.build("timm", (64, 96), model_name="test_resnet").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        fmap = bb.model.forward_features(x)  # (1, C, 2, 3)
        tokens = bb(x)
    assert torch.equal(tokens[0, 4], fmap[0, :, 1, 1])  # row 1, column 1 of a 3-wide grid


def test_unknown_timm_model():
    with pytest.raises(ConfigError, match="unknown timm model 'resnet181'.*resnet18"):
        BACKBONES.build("timm", (32, 32), model_name="resnet181")


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.99, 1.0])
def test_freeze_fraction(fraction):
    bb = BACKBONES.build("timm", (32, 32), model_name="test_vit", freeze_fraction=fraction)
    params = list(bb.model.named_parameters())
    cut = int(len(params) * fraction)
    assert [not p.requires_grad for _, p in params] == [True] * cut + [False] * (len(params) - cut)


@pytest.mark.parametrize("blocks", [0, 1, 4])
def test_freeze_blocks(blocks):
    bb = BACKBONES.build("timm", (32, 32), model_name="test_vit", freeze_blocks=blocks)
    for name, p in bb.model.named_parameters():
        block = int(name.split(".")[1]) if name.startswith("blocks.") else None
        ahead = name in ("cls_token", "pos_embed") or name.startswith("patch_embed.") or (
            block is not None and block < blocks)
        assert p.requires_grad is not ahead, name


def test_freeze_argument_errors():
    with pytest.raises(ConfigError, match="needs a transformer with `blocks`"):
        BACKBONES.build("timm", (32, 32), model_name="test_resnet", freeze_blocks=1)
    with pytest.raises(ConfigError, match="freeze_fraction must be within"):
        BACKBONES.build("timm", (32, 32), model_name="test_vit", freeze_fraction=1.5)
    with pytest.raises(ConfigError, match="not both"):
        BACKBONES.build("timm", (32, 32), model_name="test_vit", freeze_fraction=0.5, freeze_blocks=1)


# ---------------------------------------------------------------------------------------------------- weights files
def _source_state(seed: int = 123, name: str = "test_vit", size=(32, 32), **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    if "vit" in name:
        kw["img_size"] = size
    return {k: v.clone() for k, v in timm.create_model(name, num_classes=0, **kw).state_dict().items()}


def _save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("fmt, wrap", [("safetensors", "module."), ("pth", "module."), ("bin", "module."),
                                       ("pth", "state_dict"), ("bin", "")])
def test_weights_from_local_file(tmp_path, fmt, wrap):
    src = _source_state()
    torch.manual_seed(7)
    plain = timm.create_model("test_vit", num_classes=0, img_size=(32, 32)).state_dict()
    assert any(not torch.equal(plain[k], v) for k, v in src.items())  # loading has something to prove
    if wrap == "state_dict":
        saved: dict = {"state_dict": {f"module.{k}": v for k, v in src.items()}, "epoch": 3}
    else:
        saved = {f"{wrap}{k}": v for k, v in src.items()}
    path = _save(saved, tmp_path / f"w.{fmt}")
    bb = BACKBONES.build("timm", (32, 32), model_name="test_vit", weights=path)
    got = bb.model.state_dict()
    assert set(got) == set(src)
    for k, v in src.items():
        assert torch.equal(got[k], v), k


def test_weights_with_classifier_are_accepted(tmp_path):
    torch.manual_seed(5)
    full = timm.create_model("test_vit", num_classes=10, img_size=(32, 32)).state_dict()
    assert "head.weight" in full
    path = _save(full, tmp_path / "cls.safetensors")
    bb = BACKBONES.build("timm", (32, 32), model_name="test_vit", weights=path)
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, full[k]), k


def test_mismatched_weights_file(tmp_path, capsys):
    path = _save(_source_state(name="test_resnet"), tmp_path / "resnet.safetensors")
    with pytest.raises(ConfigError, match=f"{path}.*do not match test_vit.*strict=false"):
        BACKBONES.build("timm", (32, 32), model_name="test_vit", weights=path)
    bb = BACKBONES.build("timm", (32, 32), model_name="test_vit", weights=path, strict=False)
    assert bb.spec.dim == bb.model.num_features
    assert "strict=false" in capsys.readouterr().out


def test_partly_matching_weights_non_strict(tmp_path):
    src = _source_state()
    other = dict(src)
    other["blocks.0.mlp.fc1.bias"] = torch.zeros(3)  # a tensor of another shape
    del other["norm.weight"]
    path = _save(other, tmp_path / "partly.pth")
    pattern = r"1 with the wrong shape \(e\.g\. blocks\.0\.mlp\.fc1\.bias.*1 missing \(e\.g\. norm\.weight"
    with pytest.raises(ConfigError, match=pattern):
        BACKBONES.build("timm", (32, 32), model_name="test_vit", weights=path)
    bb = BACKBONES.build("timm", (32, 32), model_name="test_vit", weights=path, strict=False)
    got = bb.model.state_dict()
    for k, v in other.items():
        if k != "blocks.0.mlp.fc1.bias":
            assert torch.equal(got[k], v), k


def test_a_position_grid_of_another_size_is_resampled_as_timm_does(tmp_path):
    # timm's own filter for the architecture resamples a hub file's position embedding to the model's grid
    other = _source_state(name="test_vit", size=(64, 64))
    path = _save(other, tmp_path / "grid.pth")
    bb = BACKBONES.build("timm", (32, 32), model_name="test_vit", weights=path)
    got = bb.model.state_dict()
    assert got["pos_embed"].shape != other["pos_embed"].shape
    assert torch.equal(got["norm.weight"], other["norm.weight"])


def test_missing_weights_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match=f"weights file not found: {path}"):
        BACKBONES.build("timm", (32, 32), model_name="test_vit", weights=path)


def test_pretrained_and_weights_together(tmp_path):
    with pytest.raises(ConfigError, match="either pretrained=true.*or weights=PATH"):
        BACKBONES.build("timm", (32, 32), model_name="test_vit", pretrained=True, weights=tmp_path / "w.pth")


LOADED: list[str] = []


def _record(tag: str) -> str:
    LOADED.append(tag)
    return tag


class Payload:
    """Unpickling this runs code: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (_record, ("payload ran",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickled_objects_are_rejected(tmp_path, monkeypatch, recwarn, writer):
    path = tmp_path / "evil.pth"
    payload = {"weight": torch.zeros(2), "extra": Payload()}
    if writer == "torch.save":
        torch.save(payload, path)
    else:  # a bare pickle saved as .pth: torch warns about the legacy format before failing
        import pickle

        path.write_bytes(pickle.dumps(payload))
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    with pytest.raises(ConfigError) as err:
        BACKBONES.build("timm", (32, 32), model_name="test_vit", weights=path)
    message = str(err.value)
    assert message.startswith(f"backbone weights {path}: not a plain tensor state dict"), message
    assert "weights_only" not in message and "False" not in message  # never hand the user the unsafe fix
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert LOADED == []
    assert not [w for w in recwarn.list if "torch" in str(w.filename)], [str(w.message) for w in recwarn.list]


def test_non_tensor_values_are_rejected(tmp_path):
    path = tmp_path / "mixed.bin"
    torch.save({"weight": torch.zeros(2), "step": 3}, path)
    with pytest.raises(ConfigError, match=f"{path}: not a tensor state dict"):
        read_state_dict(path)


def test_unreadable_weights_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ConfigError, match=f"{path}: cannot be read"):
        BACKBONES.build("timm", (32, 32), model_name="test_vit", weights=path)


# ---------------------------------------------------------------------------------------------------------- heads
def _fitted_space(log1p: bool = False, n: int = 60, seed: int = 0) -> tuple[TargetSpace, Scaler, np.ndarray]:
    rng = np.random.default_rng(seed)
    green, dead, clover = (rng.gamma(2.0, s, n) for s in (15.0, 8.0, 3.0))
    grams = np.stack([green, dead, clover, green + clover, green + dead + clover], axis=1)
    scaler = Scaler.fit(grams, log1p=log1p)
    space = TargetSpace(5)
    space.fit(scaler, scaler.transform(grams))
    return space, scaler, grams


def _head(name: str, in_features: int, n_tabular: int, n_outputs: int = 5) -> nn.Module:
    space = _fitted_space()[0] if name == "consistent" else TargetSpace(n_outputs)
    return HEADS.get(name)(in_features, n_tabular, n_outputs, space)


@pytest.mark.parametrize("name", HEADS.names())
@pytest.mark.parametrize("n_tabular", [2, 0])
def test_head_shapes(name, n_tabular):
    if name == "fusion" and n_tabular == 0:
        with pytest.raises(ConfigError, match="`fusion` needs tabular inputs"):
            _head(name, 32, 0)
        return
    torch.manual_seed(0)
    width = 5
    if name == "interval_aux":  # 5 regression outputs + 3 bin logits per target, bins in the target space
        width = 20
        head = HEADS.get(name)(32, n_tabular, width, TargetSpace(5, bins=3))
    else:
        head = _head(name, 32, n_tabular)
    feats = torch.randn(4, 32, requires_grad=True)
    tab = torch.randn(4, n_tabular) if n_tabular else None
    out = head(feats, tab)
    assert out.shape == (4, width) and torch.isfinite(out).all()
    out.sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    head.eval()
    with torch.no_grad():
        assert head(feats[:1], tab[:1] if tab is not None else None).shape == (1, width)


@pytest.mark.parametrize("name", ["fusion", "image_only", "aux_mlp"])
def test_head_other_output_counts(name):
    head = _head(name, 16, 2, n_outputs=15)
    assert head(torch.randn(3, 16), torch.randn(3, 2)).shape == (3, 15)


def test_consistent_head_needs_five_targets():
    with pytest.raises(ConfigError, match="five biomass targets"):
        HEADS.get("consistent")(16, 0, 2, TargetSpace(2))


def test_fusion_layer_widths():
    head = HEADS.get("fusion")(1024, 2, 5, TargetSpace(5))
    assert isinstance(head, FusionHead)
    linears = lambda seq: [(m.in_features, m.out_features) for m in seq if isinstance(m, nn.Linear)]  # noqa: E731
    assert linears(head.tabular) == [(2, 64), (64, 128)]
    assert linears(head.fusion) == [(1024 + 128, 512), (512, 256)]
    assert [(m.in_features, m.out_features) for m in head.outputs] == [(256, 1)] * 5
    assert [type(m) for m in head.tabular[:4]] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert [m.p for m in head.tabular if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    assert [m.p for m in head.fusion if isinstance(m, nn.Dropout)] == [0.4, 0.3]
    with pytest.raises(ConfigError, match="2 layer widths but 1 dropouts"):
        HEADS.get("fusion")(8, 2, 5, TargetSpace(5), tabular_dims=(4, 4), tabular_dropout=(0.1,))


@pytest.mark.parametrize("log1p", [False, True])
@pytest.mark.parametrize("n_tabular", [2, 0])
def test_consistent_head_mass_balance(log1p, n_tabular):
    space, scaler, grams = _fitted_space(log1p)
    torch.manual_seed(0)
    head = HEADS.get("consistent")(32, n_tabular, 5, space)
    feats = torch.randn(64, 32) * 3
    tab = torch.randn(64, n_tabular) if n_tabular else None
    out = head(feats, tab)  # train mode: gradients flow through the derived targets
    out.sum().backward()
    head.eval()
    with torch.no_grad():
        pred = scaler.inverse(head(feats, tab).double().numpy())
    g, d, c, gdm, total = pred.T
    assert (pred[:, :3] >= -1e-4).all()
    np.testing.assert_allclose(gdm, g + c, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(total, g + d + c, rtol=1e-4, atol=1e-3)
    assert np.ptp(g) > 0 and np.ptp(d) > 0  # not a constant output


def test_consistent_head_starts_at_the_component_means():
    """With the inner head's outputs at zero, each component is softplus(0) x its training mean grams."""
    space, scaler, grams = _fitted_space()
    head = HEADS.get("consistent")(8, 2, 5, space).eval()
    with torch.no_grad():
        for lin in head.inner.outputs:
            lin.weight.zero_()
            lin.bias.zero_()
        pred = scaler.inverse(head(torch.randn(3, 8), torch.randn(3, 2)).double().numpy())
    expected = math.log(2.0) * grams.mean(axis=0)[:3]
    np.testing.assert_allclose(pred[:, :3], np.tile(expected, (3, 1)), rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- build_model
def _stage(stage: str = "main", *overrides: str):
    # the aux stage rotates by 90 degrees (the seed's RandomRotate90), which only a square input survives
    base = [f"{stage}.image.size={'[32,32]' if stage == 'aux' else '[32,48]'}"]
    return getattr(load_experiment(DEMO, [*base, *[f"{stage}.{o}" for o in overrides]]).config, stage)


def _uint8(b: int, h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_build_model_demo_main_and_aux():
    torch.manual_seed(0)
    main = build_stage_model(MAIN, _stage("main"))[0]
    out = main(_uint8(3, 32, 48), torch.randn(3, 2))
    assert out.shape == (3, 5) and out.dtype == torch.float32 and torch.isfinite(out).all()
    aux = build_stage_model(AUX, _stage("aux"))[0]
    out = aux(_uint8(3, 32, 32), torch.zeros(3, 0))
    assert out.shape == (3, 2) and torch.isfinite(out).all()


def test_build_model_normalises_uint8_with_the_configured_stats():
    model = build_stage_model(MAIN, _stage("main"))[0].eval()
    img = _uint8(2, 32, 48)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.pooling(model.backbone((img.float() / 255 - mean) / std))
        torch.testing.assert_close(model.features(img), expected, rtol=1e-4, atol=1e-4)


def test_build_model_single_optimizer_step():
    torch.manual_seed(0)
    model = build_stage_model(MAIN, _stage("main"))[0]
    loss_fn = LOSSES.build("weighted_smooth_l1", 5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = loss_fn(model(_uint8(4, 32, 48), torch.randn(4, 2)), torch.randn(4, 5))
    loss.backward()
    before = model.head.outputs[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.head.outputs[0].weight)


@pytest.mark.parametrize("merge", ["concat", "mean"])
def test_build_model_halves(merge):
    torch.manual_seed(0)
    stage = _stage("main", "image.layout=halves", f"model.views_merge={merge}", "image.size=[32,32]")
    model = build_stage_model(MAIN, stage)[0]
    dim = model.pooling.out_dim
    first = next(m for m in model.head.fusion if isinstance(m, nn.Linear))
    assert first.in_features == (2 * dim if merge == "concat" else dim) + 128
    img = _uint8(2, 32, 64)  # (H, 2W): left and right halves side by side
    out = model(img, torch.randn(2, 2))
    assert out.shape == (2, 5)
    model.eval()
    with torch.no_grad():
        feats = model.features(img)
        model.layout = "whole"
        left, right = model.features(img[..., :32]), model.features(img[..., 32:])
    expected = torch.cat([left, right], dim=1) if merge == "concat" else (left + right) / 2
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-5)


def test_build_model_consistent_head():
    stage = _stage("main", "model.head.name=consistent")
    model = build_stage_model(MAIN, stage)[0]
    space, scaler, _ = _fitted_space()
    model.target_space.load_state_dict(space.state_dict())
    model.eval()
    with torch.no_grad():
        pred = scaler.inverse(model(_uint8(3, 32, 48), torch.randn(3, 2)).double().numpy())
    np.testing.assert_allclose(pred[:, 3], pred[:, 0] + pred[:, 2], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(pred[:, 4], pred[:, :3].sum(axis=1), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("k", [1, 3])
def test_scaled_sigmoid_bounds(k):
    torch.manual_seed(0)
    loss = ["loss={name: quantile, quantiles: [0.1, 0.5, 0.9]}"] if k == 3 else []
    stage = _stage("main", "targets.activation=scaled_sigmoid", *loss)
    model = build_stage_model(MAIN, stage)[0].eval()
    space, _, _ = _fitted_space()
    model.target_space.load_state_dict(space.state_dict())
    lo, hi = space.lo, space.hi
    assert (hi - lo).unique().numel() == 5  # every target has its own range
    img, tab = _uint8(4, 32, 48), torch.randn(4, 2)
    with torch.no_grad():
        out = model(img, tab).view(4, 5, k)
        assert ((out >= lo.view(1, 5, 1) - 1e-5) & (out <= hi.view(1, 5, 1) + 1e-5)).all()
        for sign, bound in ((50.0, hi), (-50.0, lo)):  # saturate the sigmoid both ways
            for lin in model.head.outputs:
                lin.bias.fill_(sign)
                lin.weight.zero_()
            out = model(img, tab).view(4, 5, k)
            torch.testing.assert_close(out, bound.view(1, 5, 1).expand(4, 5, k), rtol=0, atol=1e-5)
