"""ResNet-18/34/50/101 backbones whose 3x3 convs can be made deformable by configuration.

Names of parameters and buffers are torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, ...,
`layerN.0.downsample.{0,1}`), so a torchvision ImageNet state dict loads by name with
`load_torchvision_weights`. Bottlenecks carry the stride on their 3x3 conv (torchvision's
"ResNet v1.5"); there is no avgpool/fc. Stages res2..res5 are the modules layer1..layer4.

Deformable placement: `deform_blocks` maps a stage to "all" or to block indices, negative
ones counting from the end. Those blocks' `conv2` (the 3x3 conv of a Bottleneck, stride
included; in a BasicBlock (18/34) its second 3x3 conv, stride 1, as in mmdetection) becomes
the layer of `deform_kind`:

    "dcnv1"            detkit.ops.DeformConv2d (deformable conv); weight keeps the name
                       `conv2.weight`, `conv2.offset_branch.*` is new
    "dcnv2"            the same, modulated (a sigmoid mask per sampling point)
    "dcnv3"            detkit.ops.DCNv3 (InternImage's layer; channels in = out)
    "dcnv4"            detkit.ops.DCNv4 (FlashInternImage's layer; channels in = out)
    "offset_sampling"  detkit.ops.OffsetSampling (per-channel offsets, the Keras layer) in
                       front of the 3x3 conv: `conv2.0.offset_branch.*`, `conv2.1.weight`

`deform_groups` is the number of groups with their own sampling points (offset groups of
DCNv1/v2, `group` of DCNv3/v4; OffsetSampling has one per channel and takes none), one count
or one per stage (InternImage-T's 16 channels per group: {res3: 4, res4: 8, res5: 16} at
64/128/256 channels), and
`deform_options` the layer's own options (DCNv3: offset_scale, dw_kernel_size, act_layer,
norm_layer, center_feature_scale; DCNv4: offset_scale, dw_kernel_size, remove_center,
center_feature_scale, output_bias, without_pointwise). The DCN papers' rows read:

    DCNv1, last 3 layers of res5:    {"res5": "all"}
    DCNv1, 6 layers (res5 + res4):   {"res5": "all", "res4": [-3, -2, -1]}
    DCNv2, conv3-conv5 everywhere:   {"res3": "all", "res4": "all", "res5": "all"}

(`last_blocks(50, {"res4": 3})` gives the same indices counted from the start.)
"""
from __future__ import annotations

import operator
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detkit.ops import DCNv3, DCNv4, DeformConv2d, OffsetSampling, offset_branch_parameters

STAGE_NAMES = ("res2", "res3", "res4", "res5")
#: Stage -> the name of the ResNet submodule holding it (torchvision's names).
STAGE_MODULES = {stage: f"layer{i + 1}" for i, stage in enumerate(STAGE_NAMES)}
FEATURE_NAMES = ("stem",) + STAGE_NAMES
NORMS = ("frozen_bn", "bn", "gn")
_ARCH = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
         50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}

NormFactory = Callable[[int], nn.Module]


def block_counts(depth: int) -> dict[str, int]:
    """Number of residual blocks per stage, e.g. {"res2": 3, "res3": 4, "res4": 6, "res5": 3} for 50."""
    if depth not in _ARCH:
        raise ValueError(f"ResNet depth must be one of {sorted(_ARCH)}, got {depth!r}")
    return dict(zip(STAGE_NAMES, _ARCH[depth][1]))


def last_blocks(depth: int, counts: Mapping[str, int]) -> dict[str, list[int]]:
    """Indices (from the start) of the last `counts[stage]` blocks of each stage, for `deform_blocks`.

    last_blocks(50, {"res5": 3, "res4": 3}) == {"res5": [0, 1, 2], "res4": [3, 4, 5]}.
    """
    available = block_counts(depth)
    out: dict[str, list[int]] = {}
    for stage, n in counts.items():
        if stage not in available:
            raise ValueError(f"unknown stage {stage!r}; valid stages are {list(available)}")
        if not 0 <= n <= available[stage]:
            raise ValueError(f"{stage} of ResNet-{depth} has {available[stage]} blocks; cannot take the last {n}")
        out[stage] = list(range(available[stage] - n, available[stage]))
    return out


def _resolve_deform_blocks(spec: Mapping[str, str | Sequence[int]] | None,
                           counts: Mapping[str, int]) -> dict[str, set[int]]:
    """deform_blocks -> {stage: set of non-negative block indices}, validated."""
    placement: dict[str, set[int]] = {}
    for stage, which in (spec or {}).items():
        if stage not in counts:
            raise ValueError(f"deform_blocks: unknown stage {stage!r}; valid stages are {list(counts)}")
        n = counts[stage]
        if isinstance(which, str) or not isinstance(which, Iterable):
            if which != "all":
                raise ValueError(f"deform_blocks[{stage!r}] must be 'all' or a list of block indices "
                                 f"({stage} has {n} blocks), got {which!r}")
            placement[stage] = set(range(n))
            continue
        chosen: set[int] = set()
        for raw in which:
            try:
                if isinstance(raw, bool):
                    raise TypeError
                i = operator.index(raw)
            except TypeError:
                raise ValueError(f"deform_blocks[{stage!r}]: block indices must be integers, got {raw!r}") from None
            if not -n <= i < n:
                raise ValueError(f"deform_blocks[{stage!r}]: block index {i} is out of range; {stage} has "
                                 f"{n} blocks (valid indices {-n}..{n - 1})")
            if i % n in chosen:
                raise ValueError(f"deform_blocks[{stage!r}]: block {i % n} is listed twice "
                                 f"({stage} has {n} blocks; {i} counts as {i % n})")
            chosen.add(i % n)
        placement[stage] = chosen
    return placement


def _groups_per_stage(groups: int | Mapping[str, int], placement: Mapping[str, set[int]]) -> dict[str, int]:
    """deform_groups (one count, or {stage: count} naming every stage with deformable blocks)
    -> {stage: count} for the stages in `placement`."""
    if not isinstance(groups, Mapping):
        return {stage: groups for stage in placement}
    unknown = sorted(set(groups) - set(STAGE_NAMES))
    missing = sorted(stage for stage in placement if placement[stage] and stage not in groups)
    if unknown or missing:
        raise ValueError(f"deform_groups as a mapping must name stages among {list(STAGE_NAMES)}, every stage "
                         f"with deformable blocks included; unknown {unknown}, missing {missing}")
    return {stage: groups[stage] for stage in placement if stage in groups}


def _make_norm(kind: str, channels: int, gn_groups: int) -> nn.Module:
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(gn_groups, channels)


DEFORM_KINDS = ("dcnv1", "dcnv2", "dcnv3", "dcnv4", "offset_sampling")
_LAYER_OPTIONS = {"dcnv1": (), "dcnv2": (), "offset_sampling": (),
                  "dcnv3": ("offset_scale", "dw_kernel_size", "act_layer", "norm_layer", "center_feature_scale"),
                  "dcnv4": ("offset_scale", "dw_kernel_size", "remove_center", "center_feature_scale",
                            "output_bias", "without_pointwise")}


class DeformSpec:
    """Which deformable layer replaces a block's 3x3 conv, and its settings (the module
    docstring lists the kinds); checked when made, so a bad option fails before any layer is
    built. Called with (in_c, out_c, stride, dilation), it returns the layer."""

    def __init__(self, kind: str = "dcnv1", groups: int = 1, options: Mapping[str, object] | None = None) -> None:
        if kind not in DEFORM_KINDS:
            raise ValueError(f"deform_kind must be one of {list(DEFORM_KINDS)}, got {kind!r}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"deform_groups must be an int >= 1, got {groups!r}")
        if kind == "offset_sampling" and groups != 1:
            raise ValueError("deform_groups must be 1 for deform_kind 'offset_sampling' "
                             f"(it samples every channel at its own offsets), got {groups}")
        options = dict(options or {})
        unknown = sorted(set(options) - set(_LAYER_OPTIONS[kind]))
        if unknown:
            allowed = list(_LAYER_OPTIONS[kind]) or "none"
            raise ValueError(f"deform_options {unknown} do not apply to deform_kind {kind!r} "
                             f"(its options: {allowed})")
        self.kind, self.groups, self.options = kind, groups, options

    def __call__(self, in_c: int, out_c: int, stride: int, dilation: int) -> nn.Module:
        if self.kind in ("dcnv1", "dcnv2"):
            return DeformConv2d(in_c, out_c, 3, stride, padding=dilation, dilation=dilation, bias=False,
                                offset_groups=self.groups, modulated=self.kind == "dcnv2")
        if self.kind == "offset_sampling":
            return nn.Sequential(OffsetSampling(in_c), _conv3x3(in_c, out_c, stride, dilation, None))
        if in_c != out_c:
            raise ValueError(f"deform_kind {self.kind!r} keeps the channel count, but this conv maps "
                             f"{in_c} to {out_c} channels")
        layer = DCNv3 if self.kind == "dcnv3" else DCNv4
        return layer(in_c, kernel_size=3, stride=stride, pad=dilation, dilation=dilation, group=self.groups,
                     **self.options)

    def __repr__(self) -> str:
        return f"DeformSpec(kind={self.kind!r}, groups={self.groups}, options={self.options})"


def _conv3x3(in_c: int, out_c: int, stride: int, dilation: int, deform: DeformSpec | None) -> nn.Module:
    """3x3 conv keeping the size at stride 1 (padding = dilation); the `deform` layer when given."""
    if deform is None:
        return nn.Conv2d(in_c, out_c, 3, stride, padding=dilation, dilation=dilation, bias=False)
    return deform(in_c, out_c, stride, dilation)


class _Block(nn.Module):
    downsample: nn.Module | None

    def _shortcut_for(self, in_c: int, out_c: int, stride: int, norm: NormFactory) -> None:
        needed = stride != 1 or in_c != out_c
        self.downsample = (nn.Sequential(nn.Conv2d(in_c, out_c, 1, stride, bias=False), norm(out_c))
                           if needed else None)

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)


class BasicBlock(_Block):
    """Two 3x3 convs (stride on the first); [B, C_in, H, W] -> [B, planes, H/s, W/s]."""

    expansion = 1

    def __init__(self, in_c: int, planes: int, stride: int, dilation: int, norm: NormFactory,
                 deform: DeformSpec | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_c, planes, stride, dilation, None)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation, deform)
        self.bn2 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self._shortcut_for(in_c, planes, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(_Block):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels); [B, C_in, H, W] -> [B, 4*planes, H/s, W/s]."""

    expansion = 4

    def __init__(self, in_c: int, planes: int, stride: int, dilation: int, norm: NormFactory,
                 deform: DeformSpec | None) -> None:
        super().__init__()
        out_c = planes * self.expansion
        self.conv1 = nn.Conv2d(in_c, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation, deform)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, out_c, 1, bias=False)
        self.bn3 = norm(out_c)
        self.relu = nn.ReLU(inplace=True)
        self._shortcut_for(in_c, out_c, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet backbone returning the features named in `out_features`.

    Args:
        depth: 18, 34 (BasicBlock) or 50, 101 (Bottleneck).
        norm: "frozen_bn" (torchvision FrozenBatchNorm2d: statistics and affine fixed, for
            pretrained runs), "bn" (trainable nn.BatchNorm2d, for runs from scratch) or "gn"
            (nn.GroupNorm(gn_groups, C); its weight/bias are named like BN's, but it has no
            running statistics, so ImageNet BN checkpoints only load into "bn"/"frozen_bn").
        freeze_at: 0 freezes nothing, 1 the stem, 2 stem and res2, ..., 5 everything.
            Frozen parameters (offset branches included) get requires_grad=False, and the
            frozen parts stay in eval mode through `train()` (matters for norm="bn").
        out_features: any of "stem" (after the max-pool, stride 4), "res2".."res5".
            Stages after the last requested one are built (checkpoints load) but not run.
        dilate_res5: res5 without its stride 2 (first block's 3x3 conv and downsample at
            stride 1) and every 3x3 conv of res5 at dilation 2, padding 2: output stride 16.
        deform_blocks: {stage: "all" | block indices}; those blocks' conv2 becomes the layer
            of `deform_kind` (see the module docstring; "dcnv2": a fresh layer's mask is
            sigmoid(0) = 0.5, so it starts as half its plain conv), with `deform_groups`
            groups of sampling points and the layer's own `deform_options`.
        width: channels of the stem and of res2's 3x3 convs; doubled per stage.

    Attributes:
        out_channels: {name: C} for the names in out_features.
        strides: {name: stride} for all of "stem", "res2".."res5".

    Shapes: x [B, 3, H, W] -> {name: [B, out_channels[name], ceil(H/strides[name]), ...]}.
    """

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", gn_groups: int = 32, freeze_at: int = 2,
                 out_features: Sequence[str] = ("res2", "res3", "res4", "res5"), dilate_res5: bool = False,
                 deform_blocks: Mapping[str, str | Sequence[int]] | None = None, deform_kind: str = "dcnv1",
                 deform_groups: int | Mapping[str, int] = 1, deform_options: Mapping[str, object] | None = None,
                 width: int = 64) -> None:
        super().__init__()
        counts = block_counts(depth)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not 0 <= freeze_at <= len(FEATURE_NAMES):
            raise ValueError(f"freeze_at must be in 0..{len(FEATURE_NAMES)}, got {freeze_at!r}")
        out_features = (out_features,) if isinstance(out_features, str) else tuple(out_features)
        unknown = [f for f in out_features if f not in FEATURE_NAMES]
        if unknown or not out_features or len(set(out_features)) != len(out_features):
            raise ValueError(f"out_features must be distinct names among {list(FEATURE_NAMES)}, "
                             f"got {list(out_features)}")
        placement = _resolve_deform_blocks(deform_blocks, counts)
        deform = {stage: DeformSpec(deform_kind, groups, deform_options)
                  for stage, groups in _groups_per_stage(deform_groups, placement).items()}
        self.depth, self.norm, self.freeze_at, self.out_features = depth, norm, freeze_at, out_features

        def make_norm(channels: int) -> nn.Module:
            return _make_norm(norm, channels, gn_groups)

        block_cls = BasicBlock if _ARCH[depth][0] == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = make_norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels, strides, in_c = {"stem": width}, {"stem": 4}, width
        for i, stage in enumerate(STAGE_NAMES):
            dilation = 2 if stage == "res5" and dilate_res5 else 1
            stride = 1 if i == 0 or dilation > 1 else 2
            blocks = []
            for b in range(counts[stage]):
                blocks.append(block_cls(in_c, width * 2 ** i, stride if b == 0 else 1, dilation, make_norm,
                                        deform[stage] if b in placement.get(stage, ()) else None))
                in_c = width * 2 ** i * block_cls.expansion
            self.add_module(STAGE_MODULES[stage], nn.Sequential(*blocks))
            channels[stage], strides[stage] = in_c, strides[FEATURE_NAMES[i]] * stride
        self.out_channels = {f: channels[f] for f in out_features}
        self.strides = strides
        self._init_weights()
        for name in FEATURE_NAMES[:freeze_at]:
            for part in self._parts(name):
                part.requires_grad_(False)
        self.train()

    def _parts(self, name: str) -> list[nn.Module]:
        """The modules making up "stem" or a stage "resN"."""
        if name == "stem":
            return [self.conv1, self.bn1]
        return [getattr(self, STAGE_MODULES[name])]

    def _init_weights(self) -> None:
        # He init (fan_out) for convs, norms at weight 1 / bias 0 (their defaults); offset
        # branches keep their own init (zero heads), DCNv3/v4 their projections' (xavier).
        offset_branch = {id(p) for _, _, p in offset_branch_parameters(self)}
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, DeformConv2d)) and id(m.weight) not in offset_branch:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def train(self, mode: bool = True) -> ResNet:
        """Set train/eval mode, keeping the frozen stem/stages (`freeze_at`) in eval mode."""
        super().train(mode)
        for name in FEATURE_NAMES[:self.freeze_at]:
            for part in self._parts(name):
                part.eval()
        return self

    def stage_of(self, name: str) -> str | None:
        """The stage ("res2".."res5") holding the submodule `name`, qualified from this ResNet
        ("layer4.0.conv2" -> "res5"); None for the stem and for names outside the stages."""
        head = name.split(".", 1)[0]
        return next((stage for stage, module in STAGE_MODULES.items() if module == head), None)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x [B, 3, H, W] normalised image -> {name: [B, out_channels[name], H/stride, W/stride]}."""
        last = max(FEATURE_NAMES.index(f) for f in self.out_features)
        feats = {"stem": self.maxpool(self.relu(self.bn1(self.conv1(x))))}
        x = feats["stem"]
        for stage in STAGE_NAMES[:last]:
            x = feats[stage] = getattr(self, STAGE_MODULES[stage])(x)
        return {f: feats[f] for f in self.out_features}


DEFORMABLE_LAYERS = (DeformConv2d, DCNv3, DCNv4, OffsetSampling)


def deformable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every deformable conv layer (DeformConv2d, DCNv3, DCNv4,
    OffsetSampling) in `model`, in forward order for a ResNet."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DEFORMABLE_LAYERS)]


def _preview(keys: list[str], limit: int = 10) -> str:
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} {keys[:limit]}{more}"


def load_torchvision_weights(model: ResNet, path: str | os.PathLike) -> None:
    """Load a torchvision ImageNet ResNet state dict file (or a dict holding it under
    "state_dict" or "model") into `model`, ignoring its `fc.*` keys.

    Strict apart from the keys deformable blocks change and BN `num_batches_tracked` counters
    (which FrozenBatchNorm2d does not have either). In deformable blocks: offset branches are
    new and keep their zero init; DCNv1/v2 layers take the 3x3 weight; OffsetSampling blocks
    take it as `conv2.1.weight`; DCNv3/DCNv4 layers have no 3x3 weight, so they keep their
    own init and the checkpoint's `conv2.weight` of those blocks is not used. Raises
    FileNotFoundError for a missing
    file, and ValueError for any other missing or unexpected key, a shape mismatch, or BN
    statistics offered to a GroupNorm model (ImageNet BN checkpoints cannot initialise GN).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(ckpt, Mapping) and isinstance(ckpt.get(key), Mapping):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, Mapping) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors")
    state = {k: v for k, v in ckpt.items() if not k.startswith("fc.")}
    if getattr(model, "norm", None) == "gn" and any(k.endswith((".running_mean", ".running_var")) for k in state):
        raise ValueError(f"{path!r} holds BatchNorm statistics (running_mean/running_var), which cannot be "
                         "loaded into a GroupNorm ResNet; load ImageNet BN checkpoints into norm='frozen_bn' "
                         "or 'bn' models, or train the GN model from scratch")
    own = model.state_dict()
    fresh: set[str] = {name for _, name, _ in offset_branch_parameters(model)}  # keep their init
    for name, layer in deformable_layers(model):
        if isinstance(layer, (DCNv3, DCNv4)):
            fresh.update(f"{name}.{k}" for k in layer.state_dict())
            state.pop(f"{name}.weight", None)
        elif isinstance(layer, OffsetSampling) and name.endswith(".0"):
            conv = name[:-2]
            if f"{conv}.weight" in state:
                state[f"{conv}.1.weight"] = state.pop(f"{conv}.weight")
    missing = [k for k in own if k not in state and k not in fresh and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.endswith(".num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not match the model: missing keys {_preview(missing)}; "
                         f"unexpected keys {_preview(unexpected)}")
    for k, v in state.items():
        if k in own and v.shape != own[k].shape:
            raise ValueError(f"checkpoint {path!r}: {k} has shape {tuple(v.shape)} in the checkpoint but "
                             f"{tuple(own[k].shape)} in the model")
    model.load_state_dict(state, strict=False)
