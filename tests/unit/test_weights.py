"""Weights from any layout, offline: the packaged ImageNet file, Meta's DINOv3 naming, positional pairing."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import timm
import torch

from biomass.config.load import load_experiment
from biomass.errors import ConfigError
from biomass.registry import BACKBONES
from biomass.weights import PACKAGED, file_metadata, import_weights, packaged_source, positional, \
    reference_model, weights_file
from biomass.weights.__main__ import main as weights_cli

LITE0 = PACKAGED["efficientnet_lite0.imagenet"]
# ImageNet-1k classes: tabby 281, tiger cat 282, Egyptian cat 285; espresso 967; military uniform 652
CAT, ESPRESSO, UNIFORM = {281, 282, 285}, 967, 652


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "lite0.safetensors"
    return import_weights(packaged_source(LITE0), LITE0.model, out, LITE0.mapping, sha256=LITE0.sha256)


def _photos() -> dict[str, np.ndarray]:
    """Real photos under free licences that installed packages ship (scikit-image: CC0; matplotlib: public
    domain), RGB uint8."""
    import matplotlib.cbook
    import skimage.data

    hopper = cv2.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return {"chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee(),
            "hopper": cv2.cvtColor(hopper, cv2.COLOR_BGR2RGB)}


def test_the_packaged_imagenet_file_classifies_real_photos(lite0_file):
    meta = file_metadata(lite0_file)
    assert meta["source_sha256"] == LITE0.sha256 and meta["model"] == LITE0.model
    assert meta["mapping"] == "positional" and meta["created"][:4].isdigit()
    model = timm.create_model(LITE0.model).eval()  # with its classifier: the ImageNet classes are the proof
    weights_cli(["check", str(lite0_file), "--model", LITE0.model])  # complete: exit status 0
    from biomass.weights import load_into

    load_into(model, lite0_file, strict=True, model_name=LITE0.model)
    top = {}
    for name, rgb in _photos().items():
        x = cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        x = torch.from_numpy((x - 0.5) / 0.5).permute(2, 0, 1)[None]
        with torch.no_grad():
            top[name] = model(x).softmax(-1)[0].topk(3).indices.tolist()
    assert set(top["chelsea"]) == CAT, top  # tabby / tiger cat / Egyptian cat
    assert top["coffee"][0] == ESPRESSO, top
    assert top["hopper"][0] == UNIFORM, top


def test_a_random_model_does_not_classify_them():
    # the classification test has something to prove: the same network without the file gets them wrong
    torch.manual_seed(0)
    model = timm.create_model(LITE0.model).eval()
    x = cv2.resize(_photos()["coffee"], (224, 224)).astype(np.float32) / 255
    with torch.no_grad():
        assert model(torch.from_numpy((x - 0.5) / 0.5).permute(2, 0, 1)[None]).argmax().item() != ESPRESSO


def test_a_packaged_reference_converts_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOMASS_CACHE", str(tmp_path / "cache"))
    first = weights_file("packaged:efficientnet_lite0.imagenet")
    assert first.is_file() and first.parent == tmp_path / "cache" / "weights"
    stamp = first.stat().st_mtime_ns
    assert weights_file("packaged:efficientnet_lite0.imagenet") == first and first.stat().st_mtime_ns == stamp
    bb = BACKBONES.build("timm", (64, 64), model_name=LITE0.model, weights="packaged:efficientnet_lite0.imagenet")
    assert torch.equal(bb.model.state_dict()["conv_stem.weight"],
                       torch.load(packaged_source(LITE0), weights_only=True)["_conv_stem.weight"])


def test_a_config_keeps_a_packaged_reference_as_it_is(tmp_path):
    (tmp_path / "e.yaml").write_text("base: " + str(__import__("biomass").__path__[0]) + "/configs/demo.yaml\n"
                                     "main: {model: {backbone: {weights: 'packaged:efficientnet_lite0.imagenet'}}}\n")
    cfg = load_experiment(tmp_path / "e.yaml").config
    assert cfg.main.model.backbone["weights"] == "packaged:efficientnet_lite0.imagenet"


def test_unknown_packaged_weights_are_named():
    with pytest.raises(ConfigError, match=r"packaged:efficientnet_lite1: no such packaged weights.*known: "):
        weights_file("packaged:efficientnet_lite1")


def test_a_file_that_is_not_the_packaged_one_is_refused(tmp_path):
    fake = tmp_path / "lite0.pth"
    data = packaged_source(LITE0).read_bytes()
    fake.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ConfigError, match=r"sha256 [0-9a-f]{64} is not the expected 5793442"):
        import_weights(fake, LITE0.model, tmp_path / "out.safetensors", "positional", sha256=LITE0.sha256)
    assert not (tmp_path / "out.safetensors").exists()


def test_positional_pairing_names_the_first_pair_that_does_not_fit():
    model = reference_model("test_resnet")
    state = {f"other.{i}": torch.empty(v.shape) for i, v in enumerate(model.state_dict().values())}
    assert list(positional(state, model)) == list(model.state_dict())
    bad = dict(state)
    key = list(bad)[3]
    bad[key] = torch.empty(7, 7)
    with pytest.raises(ConfigError, match=rf"pair 3 does not fit: file {key} \(7, 7\) -> model "):
        positional(bad, model)
    with pytest.raises(ConfigError, match=r"has \d+ tensors, the model \d+"):
        positional(dict(list(state.items())[:-1]), model)


def _meta_dinov3_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm DINOv3 state dict renamed as Meta's release names it: register tokens as `storage_tokens`, layer
    scales as `lsN.gamma`, one `qkv.bias` (q, zero k, v) with its `bias_mask`, plus the RoPE periods and the
    pretraining mask token that timm drops."""
    out = {"mask_token": torch.zeros(1, timm_state["cls_token"].shape[-1]), "rope_embed.periods": torch.ones(16)}
    for k, v in timm_state.items():
        if k.endswith("attn.q_bias"):
            v_bias = timm_state[k.replace("q_bias", "v_bias")]
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros_like(v), v_bias])
            out[k.replace("q_bias", "qkv.bias_mask")] = torch.ones(3 * v.numel())
        elif not k.endswith("attn.v_bias"):
            k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
            out[k] = v
    return out


def test_dinov3_in_metas_release_layout_loads_through_timms_converter(tmp_path):
    name, kwargs = "vit_small_patch16_dinov3_qkvb", {"depth": 2}
    torch.manual_seed(3)
    source = timm.create_model(name, num_classes=0, img_size=(32, 32), **kwargs).state_dict()
    meta = _meta_dinov3_layout(source)
    assert "storage_tokens" in meta and "blocks.0.ls1.gamma" in meta and "reg_token" not in meta
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save({k: v.clone() for k, v in meta.items()}, path)
    bb = BACKBONES.build("timm", (32, 32), model_name=name, weights=path, model_kwargs=kwargs)
    got = bb.model.state_dict()
    assert set(got) == set(source)
    for k, v in source.items():
        assert torch.equal(got[k], v), k
