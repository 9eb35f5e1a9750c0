"""biomass.models, losses, schedulers: every registered component, timm backbones, weights files, the built model."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from biomass.config.load import load_experiment
from biomass.constants import TARGET_WEIGHTS
from biomass.data.scalers import Scaler
from biomass.errors import ConfigError
from biomass.metrics import r2_weighted_rows
from biomass.weights import read_state_dict
from biomass.models.backbones import TimmBackbone
from biomass.models.spec import FeatureSpec
from biomass.models.heads import FusionHead
from biomass.engine.build import build_stage_model
from biomass.models.model import TargetSpace
from biomass.stages import AUX, MAIN
from biomass.models.poolings import HybridTexturePooling
from biomass.registry import BACKBONES, HEADS, LOSSES, POOLINGS, SCHEDULERS

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"


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


def test_freeze_fraction_follows_named_parameters_order_for_cnns():
    bb = BACKBONES.build("timm", (32, 32), model_name="test_resnet", freeze_fraction=0.5)
    frozen = [not p.requires_grad for _, p in bb.model.named_parameters()]
    n = len(frozen)
    assert frozen == [True] * (n // 2) + [False] * (n - n // 2)


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


# ------------------------------------------------------------------------------------------------------- poolings
def _pool(name: str, spec: FeatureSpec) -> nn.Module:
    return POOLINGS.get(name)(spec)


def _expected_dim(name: str, spec: FeatureSpec) -> int:
    if name == "multi_stat":
        return 4 * spec.dim  # mean, max, min, GeM
    return 2 * spec.grid[1] * spec.patch_size if name == "hybrid_texture" else spec.dim


@pytest.mark.parametrize("name", POOLINGS.names())
@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_pooling_shape_and_gradient(name, prefix):
    spec = FeatureSpec(dim=8, num_prefix_tokens=prefix, patch_size=2, grid=(2, 3))
    if name == "cls" and prefix == 0:
        with pytest.raises(ConfigError, match="`cls` needs a backbone with a class token"):
            _pool(name, spec)
        return
    torch.manual_seed(0)
    pool = _pool(name, spec)
    tokens = (torch.rand(3, prefix + 6, 8) + 0.1).requires_grad_(True)
    out = pool(tokens)
    assert out.shape == (3, pool.out_dim) and pool.out_dim == _expected_dim(name, spec)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    for p in pool.parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all()
    # prefix tokens are read by `cls` only
    changed = tokens.detach().clone()
    changed[:, :prefix] += 5.0
    if prefix and name != "cls":
        assert torch.allclose(pool(changed), out.detach())
    elif prefix:
        assert not torch.allclose(pool(changed), out.detach())


def test_gap_and_cls_values():
    spec = FeatureSpec(dim=4, num_prefix_tokens=2, patch_size=16, grid=(1, 3))
    tokens = torch.randn(2, 5, 4)
    assert torch.allclose(POOLINGS.get("gap")(spec)(tokens), tokens[:, 2:].mean(dim=1))
    assert torch.equal(POOLINGS.get("cls")(spec)(tokens), tokens[:, 0])


def test_gem_values():
    spec = FeatureSpec(dim=4, num_prefix_tokens=1, patch_size=16, grid=(2, 2))
    tokens = torch.rand(2, 5, 4) + 0.05
    gem3 = POOLINGS.build("gem", spec, p=3.0, learn_p=False)
    expected = tokens[:, 1:].pow(3).mean(dim=1).pow(1 / 3)
    assert torch.allclose(gem3(tokens), expected, atol=1e-6)
    assert not gem3.p.requires_grad and POOLINGS.build("gem", spec).p.requires_grad
    assert torch.allclose(POOLINGS.build("gem", spec, p=1.0)(tokens), POOLINGS.get("gap")(spec)(tokens), atol=1e-6)


def test_gap_equals_timm_avg_pool_on_dinov3():
    size = (32, 48)
    torch.manual_seed(0)
    bb = BACKBONES.build("timm", size, model_name="vit_small_patch16_dinov3").eval()
    assert bb.spec.num_prefix_tokens == 5 and bb.model.global_pool == "avg"
    pool = POOLINGS.get("gap")(bb.spec)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = pool(bb(x))
        theirs = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
        with_prefix = bb(x).mean(dim=1)
    assert ours.shape == (2, 384)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, with_prefix, atol=1e-4)  # the comparison can tell prefix tokens apart


def _hybrid_reference(tokens_proj: np.ndarray, gh: int, gw: int, p: int) -> np.ndarray:
    """Per-column mean of the documented pixel map, built pixel by pixel: token (r, c) fills the p x p block at rows
    r*p.., columns c*p..; within it, pixel (i, j) carries projection values [(i*p + j)*2 + k] for k in (0, 1) in
    adjacent columns, so the map is (gh*p, gw*p*2)."""
    b = tokens_proj.shape[0]
    pix = np.zeros((b, gh * p, gw * p * 2))
    for r in range(gh):
        for c in range(gw):
            vec = tokens_proj[:, r * gw + c]
            for i in range(p):
                for j in range(p):
                    for k in range(2):
                        pix[:, r * p + i, (c * p + j) * 2 + k] = vec[:, (i * p + j) * 2 + k]
    return pix.mean(axis=1)


@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("grid", [(2, 2), (2, 3), (3, 2), (1, 4)])
def test_hybrid_texture_hand_built(prefix, grid):
    gh, gw = grid
    p = 2
    spec = FeatureSpec(dim=1, num_prefix_tokens=prefix, patch_size=p, grid=grid)
    pool = HybridTexturePooling(spec)
    assert pool.out_dim == 2 * gw * p
    bias = torch.arange(2 * p * p, dtype=torch.float32)
    with torch.no_grad():
        pool.projection.weight.zero_()
        pool.projection.bias.copy_(bias)
    tokens = torch.randn(2, prefix + gh * gw, 1)
    out = pool(tokens).detach().numpy()
    # constant projection: column (c, j, k) averages (i*p + j)*2 + k over i, for every grid column c
    col = np.array([(p * (p - 1) / 2 + j) * 2 + k for j in range(p) for k in range(2)])
    np.testing.assert_allclose(out, np.tile(np.tile(col, gw), (2, 1)), atol=1e-6)
    # token-dependent projection: token (r, c) carries 10*r + c (prefix tokens a poison value)
    with torch.no_grad():
        pool.projection.weight.fill_(1.0)
    values = torch.tensor([10.0 * r + c for r in range(gh) for c in range(gw)])
    tokens = torch.cat([torch.full((prefix,), 1e6), values]).view(1, -1, 1).repeat(2, 1, 1)
    tokens[1, prefix:] *= -1
    out = pool(tokens).detach().numpy()
    proj = (tokens[:, prefix:, 0:1] + bias).numpy()  # (B, gh*gw, 2p^2)
    np.testing.assert_allclose(out, _hybrid_reference(proj, gh, gw, p), atol=1e-4)


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_hybrid_texture_random_projection_matches_reference(prefix):
    spec = FeatureSpec(dim=6, num_prefix_tokens=prefix, patch_size=3, grid=(2, 5))
    torch.manual_seed(1)
    pool = HybridTexturePooling(spec)
    tokens = torch.randn(2, prefix + 10, 6)
    with torch.no_grad():
        proj = pool.projection(tokens[:, prefix:]).numpy()
        out = pool(tokens).numpy()
    np.testing.assert_allclose(out, _hybrid_reference(proj, 2, 5, 3), atol=1e-5)


@pytest.mark.parametrize("height, width", [(800, 800), (400, 800), (800, 480)])
def test_hybrid_texture_out_dim_is_twice_the_width(height, width):
    spec = FeatureSpec(dim=32, num_prefix_tokens=5, patch_size=16, grid=(height // 16, width // 16))
    pool = POOLINGS.get("hybrid_texture")(spec)
    assert pool.out_dim == 2 * width
    with torch.no_grad():
        out = pool(torch.randn(1, 5 + spec.grid[0] * spec.grid[1], 32))
    assert out.shape == (1, 2 * width)
    if (height, width) == (800, 800):
        assert pool.out_dim == 1600


def test_hybrid_texture_wrong_token_count():
    pool = HybridTexturePooling(FeatureSpec(dim=4, num_prefix_tokens=1, patch_size=2, grid=(2, 3)))
    with pytest.raises(ValueError, match="expected 2x3 patch tokens, got 5"):
        pool(torch.randn(1, 6, 4))


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


# --------------------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("name", LOSSES.names())
@pytest.mark.parametrize("n_targets", [5, 2])
def test_loss_finite_scalar_with_gradient(name, n_targets):
    loss = LOSSES.build(name, n_targets)
    if hasattr(loss, "bind"):  # interval bins come from the model's target space (build_stage_model binds it)
        loss.bind(TargetSpace(n_targets, bins=loss.bins))
    k = loss.outputs_per_target
    torch.manual_seed(0)
    raw = torch.randn(6, n_targets * k, requires_grad=True)
    target = torch.randn(6, n_targets)
    value = loss(raw, target)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0
    assert loss.point(raw).shape == (6, n_targets)
    expected_w = TARGET_WEIGHTS if n_targets == 5 else (1.0,) * n_targets
    assert torch.allclose(loss.weights, torch.tensor(expected_w))


@pytest.mark.parametrize("name", LOSSES.names())
def test_loss_weight_count_checked(name):
    with pytest.raises(ConfigError, match="3 values for 5 targets"):
        LOSSES.build(name, 5, weights=(1.0, 1.0, 1.0))


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_smooth_l1_equals_torch(beta):
    pred, target = torch.randn(8, 5) * 2, torch.randn(8, 5)
    loss = LOSSES.build("weighted_smooth_l1", 5, weights=(1.0,) * 5, beta=beta)
    torch.testing.assert_close(loss(pred, target), F.smooth_l1_loss(pred, target, beta=beta))


def test_mse_equals_torch():
    pred, target = torch.randn(8, 2) * 2, torch.randn(8, 2)
    torch.testing.assert_close(LOSSES.build("mse", 2, weights=(1.0, 1.0))(pred, target), F.mse_loss(pred, target))


@pytest.mark.parametrize("name, elementwise", [
    ("weighted_smooth_l1", lambda p, t: F.smooth_l1_loss(p, t, reduction="none")),
    ("mse", lambda p, t: (p - t) ** 2),
    ("log_cosh", lambda p, t: torch.log(torch.cosh(p - t))),
])
def test_weighting_is_mean_of_weighted_terms(name, elementwise):
    torch.manual_seed(1)
    pred, target = torch.randn(7, 5) * 2, torch.randn(7, 5)
    w = torch.tensor([0.3, 0.0, 1.0, 2.0, 0.5])
    got = LOSSES.build(name, 5, weights=tuple(w.tolist()))(pred, target)
    torch.testing.assert_close(got, (elementwise(pred, target) * w).sum() / pred.numel())
    default = LOSSES.build(name, 5)(pred, target)  # the metric's weights by default
    torch.testing.assert_close(default, (elementwise(pred, target) * torch.tensor(TARGET_WEIGHTS)).mean())


def test_log_cosh_matches_definition():
    x = torch.linspace(-6, 6, 49).view(7, 7)
    loss = LOSSES.build("log_cosh", 7, weights=(1.0,) * 7)
    torch.testing.assert_close(loss.elementwise(x, torch.zeros_like(x)), torch.log(torch.cosh(x)), rtol=1e-5,
                               atol=1e-6)
    big = torch.tensor([[200.0, -300.0]])
    value = LOSSES.build("log_cosh", 2)(big, torch.zeros_like(big))
    assert torch.isfinite(value)  # torch.log(torch.cosh(300)) overflows; the stable form does not
    torch.testing.assert_close(value, torch.tensor((200 + 300 - 2 * math.log(2)) / 2))


def test_quantile_point_is_the_median_column():
    loss = LOSSES.build("quantile", 5, quantiles=(0.1, 0.5, 0.9))
    assert loss.outputs_per_target == 3
    raw = torch.arange(2 * 15, dtype=torch.float32).view(2, 15)  # per target: (q0.1, q0.5, q0.9) side by side
    assert torch.equal(loss.point(raw), raw[:, 1::3])
    loss2 = LOSSES.build("quantile", 2, quantiles=(0.5, 0.25))
    assert torch.equal(loss2.point(raw[:, :4]), raw[:, [0, 2]])


def test_pinball_hand_computation():
    qs = (0.1, 0.5, 0.9)
    w = (1.0, 3.0)
    loss = LOSSES.build("quantile", 2, weights=w, quantiles=qs)
    raw = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.0, 4.0], [3.0, 3.0, 3.0, 0.5, 1.5, 2.5]])
    target = torch.tensor([[1.5, 2.0], [1.0, 0.5]])
    total = 0.0
    for b in range(2):
        for j in range(2):
            per_q = []
            for m, q in enumerate(qs):
                d = float(target[b, j] - raw[b, j * 3 + m])
                per_q.append(q * d if d >= 0 else (q - 1) * d)
            total += w[j] * sum(per_q) / len(qs)
    torch.testing.assert_close(loss(raw, target), torch.tensor(total / 4))


def test_quantiles_must_include_the_median():
    with pytest.raises(ConfigError, match="include 0.5"):
        LOSSES.build("quantile", 5, quantiles=(0.1, 0.9))
    with pytest.raises(ConfigError, match="lie in"):
        LOSSES.build("quantile", 5, quantiles=(0.0, 0.5))


@pytest.mark.parametrize("weights", [None, (1.0,) * 5, (0.5, 1.0, 0.1, 2.0, 0.3)])
def test_r2_loss_is_one_minus_weighted_r2(weights):
    torch.manual_seed(2)
    target = torch.randn(9, 5) * 3
    pred = target + torch.randn(9, 5)
    loss = LOSSES.build("r2", 5, weights=weights)
    w = np.broadcast_to(np.asarray(weights or TARGET_WEIGHTS), (9, 5))
    expected = 1.0 - r2_weighted_rows(target.numpy(), pred.numpy(), w)
    assert float(loss(pred, target)) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------- schedulers
@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_scheduler_builds_and_steps(name):
    param = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=1e-3)
    sched = SCHEDULERS.build(name, opt, 10)  # a 10-epoch stage, 3 epochs in
    for epoch in range(3):
        opt.zero_grad()
        param.square().sum().backward()
        opt.step()
        sched.step(1.0) if name == "plateau" else sched.step()
    lr = opt.param_groups[0]["lr"]
    assert 0 < lr <= 1e-3 and math.isfinite(lr)


def test_plateau_reduces_on_a_flat_loss():
    opt = torch.optim.AdamW([nn.Parameter(torch.ones(1))], lr=1e-3)
    sched = SCHEDULERS.build("plateau", opt, 4, factor=0.5, patience=2)
    for _ in range(4):
        sched.step(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_cosine_warm_restarts_reproduces_torch():
    def lrs(make):
        opt = torch.optim.AdamW([nn.Parameter(torch.ones(1))], lr=5e-5)
        sched = make(opt)
        out = []
        for _ in range(20):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: SCHEDULERS.build("cosine_warm_restarts", o, 20))  # defaults are the seed's 10, 2, 1e-6
    theirs = lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2, eta_min=1e-6))
    assert ours == theirs
    closed = [1e-6 + (5e-5 - 1e-6) * (1 + math.cos(math.pi * (e if e < 10 else e - 10) / (10 if e < 10 else 20))) / 2
              for e in range(20)]
    np.testing.assert_allclose(ours, closed, rtol=1e-9)


def test_cosine_spans_the_stage_epochs():
    # one cycle over train.epochs: the same per-epoch lrs as warm restarts with T_0 = epochs, T_mult = 1
    def lrs(make, epochs=12):
        opt = torch.optim.AdamW([nn.Parameter(torch.ones(1))], lr=3e-3)
        sched = make(opt)
        out = []
        for _ in range(epochs):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: SCHEDULERS.build("cosine", o, 12, eta_min=1e-5))
    restarts = lrs(lambda o: SCHEDULERS.build("cosine_warm_restarts", o, 12, T_0=12, T_mult=1, eta_min=1e-5))
    np.testing.assert_allclose(ours, restarts, rtol=1e-9)
    assert ours[0] == 3e-3 and ours[-1] < ours[len(ours) // 2] < ours[0]


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
