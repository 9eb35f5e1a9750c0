"""biomass.models.poolings: every registered pooling on timm backbones' feature layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from biomass.errors import ConfigError
from biomass.models.spec import FeatureSpec
from biomass.models.poolings import HybridTexturePooling
from biomass.registry import BACKBONES, POOLINGS


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
