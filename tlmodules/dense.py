"""A convolutional backbone as a spatial trunk for dense prediction (semantic segmentation, per-pixel masks).

The pieces, used together by a multi-task model:

- :func:`plan_stages` finds, once, where in a backbone's body the multi-scale feature maps are: the
  ordered stages (submodule paths) and after which of them a map is taken ("taps"), with each map's
  channels and stride. The result, a :class:`StagePlan`, is plain data: it names submodules of the body
  and registers none, so the model keeps a single copy of the backbone.
- :func:`multi_scale_features` runs a body's stages on images and returns the tapped maps, fine → coarse.
- :class:`FPNDecoder` merges them into one map at the finest tap's resolution: a Feature Pyramid Network
  (Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017) followed by the semantic
  segmentation branch of Panoptic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019).
- :class:`DenseHead` turns the merged map into per-pixel logits at the requested output size.
- :func:`pooled_features` averages the coarsest map into one vector per image, for per-image heads
  sharing the same trunk.

Shapes: images ``(B, C_in, H, W)``; tap ``i`` gives ``(B, C_i, ~H/s_i, ~W/s_i)`` (the exact size is whatever
the network's padding gives for odd inputs, e.g. 45×60, 23×30, 12×15, 6×8 for a 180×240 input to a ResNet-18).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tlmodules.errors import ConfigError

MIN_STRIDE = 4  # taps finer than this are dropped (too costly and too shallow to help, as in FPN's P2-P5)
MAX_TAPS = 4  # at most the 4 coarsest taps (FPN's C2-C5)

# Top-level children that end the convolutional part of a body: global pooling, flattening, classifier.
_HEAD_TYPES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear, nn.Identity, nn.Dropout)
# Children names that are heads in timm and torchvision models, whatever their class.
_HEAD_NAMES = frozenset({"avgpool", "global_pool", "fc", "head", "classifier", "pre_logits", "fc_norm"})


def _no_feature_map(reason: str) -> ConfigError:
    return ConfigError(
        f"the backbone gives no 2-D feature map for dense prediction ({reason}); use a convolutional backbone "
        "such as torchvision:resnet18, torchvision:mobilenet_v3_small, torchvision:efficientnet_b0 or builtin:lenet"
    )


@dataclass(frozen=True)
class StagePlan:
    """Where a body's multi-scale feature maps are.

    Attributes:
        paths: submodule names relative to the body (``body.get_submodule(path)``), run one after the other
            from the images.
        taps: indices into ``paths`` after which a feature map is taken, fine → coarse (increasing).
        channels: ``C_i``, the channels of each tapped map.
        strides: ``s_i``, each tapped map's downsampling relative to the input (rounded to an integer).
        clone: the taps whose map the following stage would modify in place (an in-place activation at its
            start); :func:`multi_scale_features` copies those maps before running on.
    """

    paths: tuple[str, ...]
    taps: tuple[int, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    clone: tuple[int, ...] = ()


def _is_head(name: str, module: nn.Module) -> bool:
    """Whether a top-level child is global pooling, a flatten or classifier-like (the end of the trunk)."""
    if isinstance(module, _HEAD_TYPES) or name in _HEAD_NAMES:
        return True
    kind = type(module).__name__.lower()
    if "adaptivepool" in kind or "globalpool" in kind:  # timm's SelectAdaptivePool2d, ...
        return True
    return isinstance(module, nn.Sequential) and any(isinstance(m, nn.Linear) for m in module.modules())


def _stage_list(body: nn.Module) -> list[tuple[str, nn.Module]]:
    """The body's stages, input side first: ``features``'s children when it is an ``nn.Sequential``
    (torchvision MobileNet, EfficientNet, VGG, ConvNeXt, DenseNet), else the top-level children up to the
    first head-like one (ResNet-style ``conv1, bn1, relu, maxpool, layer1 … layer4``), auxiliary classifiers
    (``aux1``, ``AuxLogits``) skipped."""
    features = getattr(body, "features", None)
    if isinstance(features, nn.Sequential):
        return [(f"features.{name}", child) for name, child in features.named_children()]
    stages: list[tuple[str, nn.Module]] = []
    for name, child in body.named_children():
        if name.lower().startswith("aux"):  # GoogLeNet's aux1/aux2, Inception's AuxLogits: training side heads
            continue
        if _is_head(name, child):
            break
        stages.append((name, child))
    return stages


def _spatial(x: object, path: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise _no_feature_map(f"stage {path!r} outputs {shape}, not a (B, C, H, W) map")
    return x


def _run_stage(path: str, module: nn.Module, x: Tensor) -> Tensor:
    try:
        out = module(x)
    except Exception as err:  # noqa: BLE001 - any failure means this is not a conv trunk we can split
        raise _no_feature_map(f"stage {path!r} fails on a {tuple(x.shape)} image batch: {err}") from err
    return _spatial(out, path)


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _stride(probe_height: int, map_: Tensor) -> int:
    """A map's downsampling relative to the probe image, rounded to an integer."""
    return max(1, round(probe_height / max(1, int(map_.shape[-2]))))


def _probe(path: str, module: nn.Module, x: Tensor, probe_height: int) -> list[tuple[str, Tensor, Tensor]]:
    """Run one stage; ``[(path, input, output)]`` per (sub)stage. A plain ``nn.Sequential`` whose children
    downsample to more than one new stride (RegNet's ``trunk_output``, timm's EfficientNet ``blocks``) is split
    into them, recursively, so that each resolution gets its own tap."""
    if _is_plain_sequential(module) and len(module) > 1:
        steps: list[tuple[str, Tensor, Tensor]] = []
        current = x
        try:
            for name, child in module.named_children():
                out = _spatial(child(current), f"{path}.{name}")
                steps.append((f"{path}.{name}", current, out))
                current = out
        except Exception:  # noqa: BLE001 - the children alone do not work: keep the stage whole
            steps = []
        new_strides = {_stride(probe_height, out) for _, _, out in steps} - {_stride(probe_height, x)}
        if len(new_strides) > 1:
            children = dict(module.named_children())
            return [
                step
                for child_path, child_input, _ in steps
                for step in _probe(child_path, children[child_path.rpartition(".")[2]], child_input, probe_height)
            ]
        if steps:
            return [(path, x, steps[-1][2])]
    return [(path, x, _run_stage(path, module, x))]


def _check_layout(path: str, out: Tensor, probe_size: tuple[int, int]) -> None:
    """A ``(B, C, H, W)`` map keeps the probe's aspect ratio; a channels-last ``(B, H, W, C)`` one (Swin) does not."""
    height, width = int(out.shape[-2]), int(out.shape[-1])
    expected = height * probe_size[1] / probe_size[0]
    if abs(width - expected) > max(2.0, 0.5 * expected):
        raise _no_feature_map(
            f"stage {path!r} outputs {tuple(out.shape)} for a {probe_size[0]}×{probe_size[1]} image: "
            "not a channels-first (B, C, H, W) map"
        )


def plan_stages(body: nn.Module, in_channels: int = 3, probe_size: tuple[int, int] = (64, 64)) -> StagePlan:
    """Find a convolutional body's multi-scale feature maps by running a dummy image through its stages.

    The stages are ``body.features``'s children when ``features`` is an ``nn.Sequential``, else the body's
    top-level children up to the first global pooling, flatten or classifier-like one (see
    :func:`_stage_list`); a plain ``nn.Sequential`` stage spanning several resolutions is split into its
    children. A zero image ``(1, in_channels, *probe_size)`` runs through them under ``torch.no_grad()``
    with every module in eval mode (restored after: no parameter or BatchNorm statistic changes). A tap is
    the last stage producing each spatial size; taps of stride ≥ 4 are kept (the coarsest one alone when
    none is), at most the 4 coarsest (FPN's C2-C5, Lin et al., CVPR 2017).

    Args:
        body: the backbone's network (``Backbone.body``), e.g. a torchvision ResNet without its classifier.
        in_channels: the image channels the body reads.
        probe_size: ``(H, W)`` of the dummy image; large enough for the body's coarsest stage.

    Raises:
        ConfigError: the body has no stage list (a text encoder, an MLP), a stage fails on an image batch
            or gives something other than a ``(B, C, H, W)`` map.
    """
    stages = _stage_list(body)
    if not stages:
        raise _no_feature_map(f"{type(body).__name__} has no convolutional stages before its head")
    parameter = next(body.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    modes = {module: module.training for module in body.modules()}
    try:
        body.eval()
        with torch.no_grad():
            steps: list[tuple[str, Tensor, Tensor]] = []
            x = torch.zeros(1, in_channels, *probe_size, device=device, dtype=dtype)
            for path, module in stages:
                steps.extend(_probe(path, module, x, probe_size[0]))
                x = steps[-1][2]
            for path, _, out in steps:
                _check_layout(path, out, probe_size)
            sizes = [tuple(out.shape[-2:]) for _, _, out in steps]
            taps = [i for i in range(len(steps)) if i == len(steps) - 1 or sizes[i + 1] != sizes[i]]
            strides = {i: _stride(probe_size[0], steps[i][2]) for i in taps}
            kept = ([i for i in taps if strides[i] >= MIN_STRIDE] or taps[-1:])[-MAX_TAPS:]
            # a tap whose map the next stage changes in place (one starting with an in-place activation)
            clone = tuple(i for i in kept[:-1] if _overwrites(body.get_submodule(steps[i + 1][0]), steps[i][2]))
    finally:
        for module, training in modes.items():
            module.training = training
    last = kept[-1]
    return StagePlan(
        paths=tuple(path for path, _, _ in steps[: last + 1]),
        taps=tuple(kept),
        channels=tuple(int(steps[i][2].shape[1]) for i in kept),
        strides=tuple(strides[i] for i in kept),
        clone=clone,
    )


def _overwrites(stage: nn.Module, x: Tensor) -> bool:
    """Whether ``stage`` modifies its input ``x`` in place (its version counter moves)."""
    x = x.clone()
    version = x._version
    stage(x)
    return x._version != version


def multi_scale_features(body: nn.Module, plan: StagePlan, images: Tensor) -> list[Tensor]:
    """Run ``body``'s stages of ``plan`` on ``images`` ``(B, C_in, H, W)``.

    Returns the tapped maps ``[(B, C_i, ~H/s_i, ~W/s_i)]``, fine → coarse; the stages after the last tap
    are not run.
    """
    taps = set(plan.taps)
    clone = set(plan.clone)
    maps: list[Tensor] = []
    x = images
    for index, path in enumerate(plan.paths):
        x = body.get_submodule(path)(x)
        if index in taps:
            maps.append(x.clone() if index in clone else x)
    return maps


def pooled_features(maps: Sequence[Tensor]) -> Tensor:
    """The per-image feature vector ``(B, C_last)``: the global average of the coarsest map
    ``(B, C_last, h, w)`` (for a ResNet, what its classification body returns)."""
    return maps[-1].mean(dim=(2, 3))


class FPNDecoder(nn.Module):
    """Multi-scale maps → one map at the finest tap's resolution.

    The lateral 1×1 and top-down path of a Feature Pyramid Network (Lin et al., "Feature Pyramid Networks
    for Object Detection", CVPR 2017; ``torchvision.ops.FeaturePyramidNetwork``), then the semantic
    segmentation branch of Panoptic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019):
    each level through a 3×3 conv + BatchNorm + ReLU, upsampled bilinearly to the finest level's size, and
    the levels summed.

    Args:
        in_channels: ``C_i`` of the maps, fine → coarse (``StagePlan.channels``).
        channels: ``D``, the width of the pyramid and of the output.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 64) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        if not in_channels:
            raise ConfigError("FPNDecoder needs at least one feature map (in_channels is empty)")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.channels = int(channels)
        self.fpn = FeaturePyramidNetwork(list(self.in_channels), self.channels)
        self.semantic = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(self.channels, self.channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(self.channels),
                nn.ReLU(inplace=True),
            )
            for _ in self.in_channels
        )

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """``maps`` ``[(B, C_i, H_i, W_i)]`` fine → coarse → ``(B, channels, H_0, W_0)``."""
        if len(maps) != len(self.in_channels):
            raise ValueError(f"FPNDecoder expects {len(self.in_channels)} maps, got {len(maps)}")
        pyramid = self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
        size = maps[0].shape[-2:]
        out: Tensor | None = None
        for level, block in zip(pyramid.values(), self.semantic):
            y = block(level)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            out = y if out is None else out + y
        assert out is not None
        return out


class DenseHead(nn.Module):
    """Per-pixel logits: a 1×1 conv ``(B, D, h, w) → (B, num_outputs, h, w)``, upsampled bilinearly to the
    requested size ``(B, num_outputs, H, W)`` (as Panoptic FPN's semantic branch, Kirillov et al., CVPR 2019).

    Args:
        channels: ``D``, the decoder's width.
        num_outputs: logits per pixel (classes, or 1 for a binary mask).
    """

    def __init__(self, channels: int, num_outputs: int) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(channels, num_outputs, kernel_size=1)
        self.num_classes = num_outputs  # as ClassificationHead names its output width

    def forward(self, decoded: Tensor, size: tuple[int, int]) -> Tensor:
        """``decoded`` ``(B, D, h, w)`` → logits ``(B, num_outputs, *size)``."""
        logits = self.classifier(decoded)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits
