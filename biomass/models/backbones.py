"""Backbones (registry `backbone`): any timm model as a token extractor, with offline weights and freezing.

A backbone maps a normalised image batch (B, 3, H, W) to tokens (B, N, C): ViTs give their prefix tokens (CLS,
registers) then the patch grid; CNNs give their last feature map flattened to a grid with no prefix. `FeatureSpec`
(models.spec) tells poolings how to read them.
"""
from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
from torch import nn

from biomass.errors import ConfigError
from biomass.models.spec import FeatureSpec
from biomass.registry import BACKBONES
from biomass.weights import load_into, weights_file



class _NoGrad:
    """Forward pre/post hooks that run one module under torch.no_grad() and then restore the caller's grad mode.

    Only when no tensor argument requires grad: the module's parameters are frozen (checked when the hooks are
    registered), so its output would not require grad either, and no_grad changes no value and no gradient. Each
    module is its own island, so whatever wraps the call (gradient checkpointing, torch.compile) sees its grad mode
    restored on return.
    """

    def __init__(self):
        self.saved: list[bool] = []

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.saved.append(torch.is_grad_enabled())
        if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values())):
            torch.set_grad_enabled(False)

    def exit(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self.saved:
            torch.set_grad_enabled(self.saved.pop())


def frozen_prefix(model: nn.Module) -> list[str]:
    """Submodules of a timm ViT (a model with `blocks`) that run before its first trainable parameter: the patch
    embedding (every child ahead of `blocks` that has parameters) and the leading blocks whose parameters are all
    frozen. Empty for models without `blocks`, or when anything ahead of the first block trains."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return []

    def frozen(m: nn.Module, recurse: bool = True) -> bool:
        return not any(p.requires_grad for p in m.parameters(recurse=recurse))

    ahead = []
    for name, child in model.named_children():
        if child is blocks:
            break
        if any(True for _ in child.parameters()):
            ahead.append(name)
    if not (frozen(model, recurse=False) and all(frozen(model.get_submodule(n)) for n in ahead)):
        return []  # cls/pos/register tokens or the patch embedding train: the first block's input needs grad
    names = list(ahead)
    for i, block in enumerate(blocks):
        if not frozen(block):
            break
        names.append(f"blocks.{i}")
    return names


class TimmBackbone(nn.Module):
    """A timm model as a token extractor. With `no_grad_prefix`, the frozen prefix of a ViT (patch embedding and
    the leading blocks whose parameters are all frozen) runs under torch.no_grad(): same outputs and gradients, and
    autograd records nothing for it (`no_grad_modules` names those submodules)."""

    def __init__(self, model: nn.Module, image_size: tuple[int, int], no_grad_prefix: bool = True,
                 out_indices: tuple[int, ...] | None = None, intermediate_norm: bool = True):
        super().__init__()
        self.model = model
        self.out_indices = list(out_indices) if out_indices else None
        self.intermediate_norm = intermediate_norm
        self.no_grad_modules = frozen_prefix(model) if no_grad_prefix else []
        for name in self.no_grad_modules:
            hooks = _NoGrad()
            sub = model.get_submodule(name)
            sub.register_forward_pre_hook(hooks.enter, with_kwargs=True)
            sub.register_forward_hook(hooks.exit, with_kwargs=True, always_call=True)
        self.is_vit = hasattr(model, "num_prefix_tokens") and hasattr(model, "patch_embed")
        if self.is_vit:
            patch = model.patch_embed.patch_size
            patch = patch[0] if isinstance(patch, tuple) else patch
            layers = len(self.out_indices) if self.out_indices else 1
            self.spec = FeatureSpec(model.num_features * layers, model.num_prefix_tokens, patch,
                                    (image_size[0] // patch, image_size[1] // patch), layers)
        else:
            stride = model.feature_info[-1]["reduction"]
            grid = (math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride))
            if self.out_indices:  # CNN stages: each map pooled to the last stage's grid, channels concatenated
                info = model.feature_info
                dims = [info[i]["num_chs"] for i in self.out_indices]
                stride = max(info[i]["reduction"] for i in self.out_indices)
                grid = (math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride))
                self.spec = FeatureSpec(sum(dims), 0, stride, grid, len(dims))
            else:
                self.spec = FeatureSpec(model.num_features, 0, stride, grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_indices:  # several blocks' tokens (prefix + patches), concatenated along channels
            kw = dict(output_fmt="NLC", return_prefix_tokens=True, norm=self.intermediate_norm) if self.is_vit else {}
            outs = self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True, **kw)
            if not self.is_vit:
                grid = self.spec.grid
                maps = [nn.functional.adaptive_avg_pool2d(m, grid) for m in outs]
                return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)
            return torch.cat([torch.cat([prefix, patches], dim=1) for patches, prefix in outs], dim=2)
        out = self.model.forward_features(x)
        if out.ndim == 4:  # CNN map (B, C, H, W) -> tokens (B, H*W, C)
            out = out.flatten(2).transpose(1, 2)
        return out


def freeze(model: nn.Module, fraction: float = 0.0, blocks: int | None = None) -> int:
    """Freeze the first `fraction` of parameter tensors in named_parameters() order (the seed's rule), or every
    parameter ahead of transformer block `blocks`. Returns the number of frozen tensors."""
    params = list(model.named_parameters())
    if blocks is not None:
        marker = f"blocks.{blocks}."
        names = [n for n, _ in params]
        if not any(".blocks." in f".{n}" or n.startswith("blocks.") for n in names):
            raise ConfigError("model.backbone.freeze_blocks needs a transformer with `blocks`; use freeze_fraction")
        cut = next((i for i, n in enumerate(names) if n.startswith(marker) or f".{marker}" in n), len(params))
    else:
        cut = int(len(params) * fraction)
    for _, p in params[:cut]:
        p.requires_grad_(False)
    freeze_batch_norms(model)
    return cut


def freeze_batch_norms(model: nn.Module) -> int:
    """A frozen BatchNorm layer keeps its statistics too (timm's FrozenBatchNorm2d): in train mode it would go on
    updating its running mean and variance from each batch, so the "frozen" half of a CNN would drift away from
    its pretrained features and differ between training and evaluation. ViTs have no BatchNorm. Returns the count."""
    from timm.layers import freeze_batch_norm_2d

    count = 0
    for name, module in list(model.named_modules()):
        if (name and isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) and module.affine
                and not any(p.requires_grad for p in module.parameters())):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, freeze_batch_norm_2d(module))
            count += 1
    return count


@BACKBONES.register("timm")
def timm_backbone(image_size: tuple[int, int], /, *, model_name: str, pretrained: bool = False,
                  weights: Path | None = None, strict: bool = True, freeze_fraction: float = 0.0,
                  freeze_blocks: int | None = None, grad_checkpointing: bool = False,
                  drop_path_rate: float | None = None, no_grad_prefix: bool = True,
                  out_indices: tuple[int, ...] | None = None, intermediate_norm: bool = True,
                  peft: dict | None = None, model_kwargs: dict = {}) -> TimmBackbone:  # noqa: B006
    """Any timm model by name, without classifier; weights from a local file (offline) or the hub if pretrained.
    `weights`: a file in timm's layout, behind wrapper prefixes or in the architecture's original release layout
    (timm's own converter), or `packaged:NAME` (biomass.weights.PACKAGED, converted once and cached).
    `no_grad_prefix`: run a ViT's frozen patch embedding and leading frozen blocks under torch.no_grad().
    `out_indices`: tokens of these blocks (timm forward_intermediates; final norm applied when
    `intermediate_norm`), concatenated along channels. `peft`: {method: lora|dora, r, alpha, dropout, blocks,
    targets} adapters from the peft library; the backbone's own weights freeze."""
    if pretrained and weights:
        raise ConfigError("model.backbone: set either pretrained=true (download) or weights=PATH (local), not both")
    if not 0.0 <= freeze_fraction <= 1.0:
        raise ConfigError(f"model.backbone.freeze_fraction must be within [0, 1], got {freeze_fraction}")
    if freeze_fraction and freeze_blocks is not None:
        raise ConfigError("model.backbone: set freeze_fraction or freeze_blocks, not both")
    if model_name not in timm.list_models() and model_name.split(".")[0] not in timm.list_models():
        from biomass.errors import suggest

        raise ConfigError(f"model.backbone.model_name: unknown timm model {model_name!r}"
                          f"{suggest(model_name, timm.list_models())}")
    kwargs = dict(model_kwargs)
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    try:  # ViTs size their position grid from img_size; CNNs take any size and reject the argument
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, img_size=tuple(image_size),
                                  **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
    if weights:  # a file in timm's, a wrapper's or the release's layout, or `packaged:NAME` (biomass.weights)
        load_into(model, weights_file(weights), strict, model_name)
    if peft is not None:
        if freeze_fraction or freeze_blocks is not None:
            raise ConfigError("model.backbone: peft freezes the whole backbone; drop freeze_fraction/freeze_blocks")
        model = add_adapters(model, **peft)
    else:
        freeze(model, freeze_fraction, freeze_blocks)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return TimmBackbone(model, tuple(image_size), no_grad_prefix, out_indices, intermediate_norm)


PEFT_METHODS = ("lora", "dora")


def add_adapters(model: nn.Module, method: str = "lora", r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 blocks: int | None = None, targets: tuple[str, ...] = ("qkv", "proj")) -> nn.Module:
    """LoRA / DoRA adapters (peft's LoraConfig, `use_dora` for DoRA) on the `targets` linear layers of the last
    `blocks` transformer blocks (all blocks when None; a CNN: every Linear/Conv2d of those names). Returns the timm
    model with the adapters injected (peft's base model, so timm's API stays); only adapter tensors require grad."""
    if method not in PEFT_METHODS:
        raise ConfigError(f"model.backbone.peft.method: {method!r} is not one of {', '.join(PEFT_METHODS)}")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("model.backbone.peft needs the peft library: pip install 'biomass[peft]'") from None
    n_blocks = len(getattr(model, "blocks", []))
    first = 0 if blocks is None else max(n_blocks - int(blocks), 0)

    def wanted(name: str, module: nn.Module) -> bool:
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or name.rsplit(".", 1)[-1] not in set(targets):
            return False
        if not n_blocks:  # a CNN: every layer of that name (`blocks` counts transformer blocks only)
            return True
        return name.startswith("blocks.") and int(name.split(".")[1]) >= first

    names = [n for n, m in model.named_modules() if wanted(n, m)]
    if not names:
        raise ConfigError(f"model.backbone.peft.targets: no linear or conv layer named {list(targets)}"
                          + (f" in the last {n_blocks - first} blocks" if n_blocks else ""))
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                        use_dora=method == "dora", bias="none")
    return get_peft_model(model, config).get_base_model()
