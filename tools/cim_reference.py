"""Reference implementation of cimsweep's network family and its CIM numerics, in PyTorch/numpy.

It exists so that the C++ simulator can be checked against something written independently:

* `ResNetCifar` builds the `resnet-cifar` family with exactly the tensor names of
  docs/model-format.md, so a trained `state_dict` is a valid cimsweep model file.
* `quantised_digital_forward` computes what a CIM chip with no conductance variation (σ = 0) and an
  ideal ADC must output (docs/cim-model.md §5: "the CIM layer equals the digital layer with ŵ and A
  quantised"), in float64 with exact integer accumulation.
* `cim_layer_forward` computes one CIM layer at any σ read by read (cell levels, the chip's
  conductances from a given z per cell, look-up-order float32 partial sums, every ADC mode,
  recombination in the contract's order): bit for bit what the CPU backend computes on a `device`
  chip (tests/test_cim_reference.cpp); `calibrated_full_scale` the `calibrated` ADC's range.
* `calibrate_input_ranges` measures every CIM layer's input clipping range `a_max`.
* `save_model` writes the safetensors file with cimsweep's metadata. The `safetensors` package is
  not a dependency, so `write_safetensors` implements the (small) format directly.
"""

import copy
import json
import math
import struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BN_EPS = 1e-5


class BasicBlock(nn.Module):
    """Two k×k convs with BN and ReLU plus a shortcut (the ResNet-CIFAR basic block).

    Shortcut "A" (parameter-free): `x[:, :, ::2, ::2]` when the block strides, then zero channels
    split evenly before and after the existing ones (`F.pad(..., (0, 0, 0, 0, e // 2, e - e // 2))`
    with e = C_out − C_in), as the widely used CIFAR ResNet of Y. Idelbayev does, so that its
    pre-trained weights load unchanged. Shortcut "B": a 1×1 projection conv (no bias, same stride)
    + BN, named `shortcut.conv` / `shortcut.bn`. Either applies only where the shape or the
    stride changes; elsewhere the shortcut is the identity.
    """

    def __init__(self, in_channels, out_channels, kernel, stride, shortcut):
        super().__init__()
        padding = kernel // 2
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel, 1, padding, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.projects = stride != 1 or in_channels != out_channels
        self.stride = stride
        self.extra_channels = out_channels - in_channels
        self.shortcut_kind = shortcut
        if self.projects and shortcut == "B":
            self.shortcut = nn.Module()
            self.shortcut.conv = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)
            self.shortcut.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if not self.projects:
            residual = x
        elif self.shortcut_kind == "B":
            residual = self.shortcut.bn(self.shortcut.conv(x))
        else:
            residual = F.pad(x[:, :, :: self.stride, :: self.stride],
                             (0, 0, 0, 0, self.extra_channels // 2,
                              self.extra_channels - self.extra_channels // 2))
        return F.relu(out + residual)


class ExitHead(nn.Module):
    """Early-exit head of the default `exit_head` type "conv": 3×3 conv, stride 2, padding 1
    (channels = the stage's width), BN, ReLU, global average pool, FC."""

    def __init__(self, channels, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


class ResNetCifar(nn.Module):
    """The `resnet-cifar` family of docs/model-format.md (depth 6n+2, stages w, 2w, 4w).

    Module names equal cimsweep's tensor names without the `.weight`/`.bias` suffix. Convs have no
    bias and padding `kernel // 2`; block 0 of stages 2 and 3 strides by 2. Shortcut "A" splits
    its zero channels evenly before and after the existing ones (see `BasicBlock`). Early exit
    e ∈ `exits` (1, 2) reads the output of stage e. `forward` returns the list of logits in exit
    order, the final head last: `[exit1, exit2, final]`, or `[final]` without exits.
    """

    def __init__(self, depth, kernel=3, width=16, in_channels=1, num_classes=10, shortcut="A",
                 exits=()):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if not set(exits) <= {1, 2}:
            raise ValueError(f"exits must be a subset of [1, 2], got {list(exits)}")
        self.depth, self.kernel, self.width = depth, kernel, width
        self.in_channels, self.num_classes = in_channels, num_classes
        self.shortcut, self.exits = shortcut, sorted(exits)
        blocks_per_stage = (depth - 2) // 6

        self.conv1 = nn.Conv2d(in_channels, width, kernel, 1, kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=BN_EPS)
        channels = width
        for stage in (1, 2, 3):
            stage_width = width * 2 ** (stage - 1)
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if stage > 1 and block == 0 else 1
                blocks.append(BasicBlock(channels, stage_width, kernel, stride, shortcut))
                channels = stage_width
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            if stage in self.exits:
                setattr(self, f"exit{stage}", ExitHead(stage_width, num_classes))
        self.fc = nn.Linear(channels, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        logits = []
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in (1, 2, 3):
            x = getattr(self, f"layer{stage}")(x)
            if stage in self.exits:
                logits.append(getattr(self, f"exit{stage}")(x))
        logits.append(self.fc(x.mean(dim=(2, 3))))
        return logits

    def arch(self, input_size):
        """The `cimsweep.arch` metadata object for images of `input_size` = (height, width)."""
        return {
            "family": "resnet-cifar",
            "depth": self.depth,
            "kernel": self.kernel,
            "width": self.width,
            "in_channels": self.in_channels,
            "input_size": [int(input_size[0]), int(input_size[1])],
            "num_classes": self.num_classes,
            "shortcut": self.shortcut,
            "exits": self.exits,
            "exit_head": {"type": "conv", "kernel": 3, "stride": 2, "channels": 0},
        }


def cim_layers(model):
    """(name, module) of every CIM layer (every conv and linear), in forward order."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear))]


def _as_image_tensor(images_or_batches):
    """One uint8 tensor [N, C, H, W] from a tensor or from an iterable of batches (a batch may be
    an (images, labels) pair), so that callers can pass a DataLoader or a plain tensor."""
    if torch.is_tensor(images_or_batches):
        images = images_or_batches
    else:
        images = torch.cat([batch[0] if isinstance(batch, (tuple, list)) else batch
                            for batch in images_or_batches])
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images


@torch.no_grad()
def calibrate_input_ranges(model, loader_or_tensor, percentile=99.99, batch_size=500):
    """Input clipping range `a_max` of every CIM layer, keyed by layer name.

    `a_max` is the `percentile` (numpy's linear interpolation) of all values entering the layer
    over the given uint8 images (use ≥ 2000 training images), read with forward hooks on the model
    in eval mode; `conv1` reads pixel/255 and gets exactly 1.0 (cim-model.md §3). Storing every
    activation of thousands of images would take gigabytes, so each layer keeps only its largest
    values: the percentile of N values depends on the top `N − floor(q/100·(N−1))` of them alone.
    """
    images = _as_image_tensor(loader_or_tensor)
    was_training = model.training
    model.eval()
    layers = cim_layers(model)
    q = percentile / 100.0
    device = next(model.parameters()).device  # images go where the model is (CPU or a GPU)

    per_image = {}
    probe_hooks = [module.register_forward_pre_hook(
        lambda module, inputs, name=name: per_image.__setitem__(name, inputs[0][0].numel()))
        for name, module in layers]
    model(images[:1].to(device).float() / 255.0)
    for hook in probe_hooks:
        hook.remove()

    total = {name: per_image[name] * images.shape[0] for name, _ in layers}
    keep = {name: total[name] - math.floor(q * (total[name] - 1)) for name in total}
    top = {name: torch.empty(0, dtype=torch.float64, device=device) for name in total}

    def record(module, inputs, name):
        values = torch.cat([top[name], inputs[0].detach().reshape(-1).double()])
        top[name] = torch.topk(values, min(keep[name], values.numel())).values

    hooks = [module.register_forward_pre_hook(
        lambda module, inputs, name=name: record(module, inputs, name)) for name, module in layers]
    try:
        for start in range(0, images.shape[0], batch_size):
            model(images[start:start + batch_size].to(device).float() / 255.0)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)

    ranges = {}
    for name, _ in layers:
        position = q * (total[name] - 1)
        fraction = position - math.floor(position)
        descending = top[name]  # descending[keep-1] has ascending rank floor(position)
        value = descending[-1].item()
        if fraction > 0:
            value += fraction * (descending[-2].item() - value)
        if value <= 0:
            raise ValueError(f"layer {name}: input range {value} is not positive (dead layer?)")
        ranges[name] = value
    ranges["conv1"] = 1.0
    return ranges


def _quantised_weight(weight, weight_bits):
    """(s, 2D − (2^wb − 1)) of cim-model.md §1: s = max|W| and ŵ = W/s in float32 as stored, the
    level D = round((2^wb − 1)/2 · (ŵ + 1)) (half to even) in float64. The signed levels are
    integers, so the layer's sum can be computed exactly."""
    weight = weight.detach().float()
    scale = weight.abs().max()
    w_hat = (weight / scale).double()
    levels = torch.round((2 ** weight_bits - 1) / 2 * (w_hat + 1.0))
    return scale.item(), 2.0 * levels - (2 ** weight_bits - 1)


@torch.no_grad()
def quantised_digital_forward(model, images_uint8, input_ranges, weight_bits=8, input_bits=8,
                              batch_size=500, remainder=torch.float32):
    """The exact σ = 0, ideal-ADC CIM logits (cim-model.md §5) of uint8 images [N, C, H, W], as
    cimsweep computes them: bit for bit what `cimsweep eval MODEL --sigma 0 --adc ideal` (both its
    clean row and its trial at σ = 0) gets on the CPU.

    Returns a list (one entry per exit, final last) of numpy arrays [N, num_classes] of dtype
    `remainder`.

    The network reads what a model file holds: weights, BN statistics and input ranges `a_max` as
    float32 (cimsweep reads `cimsweep.input_ranges` as float32). Every conv and linear layer
    (first, last, shortcut and exit layers included) computes, in float64,
    `A = round((2^ab − 1)·clip(a, 0, a_max)/a_max)` (ties to even) and the exact integer sum
    `Σ (2D − (2^wb − 1))·A` (products and sums of these integers stay far below 2^53, so any
    summation order gives the same), then `y = s·a_max/((2^wb−1)(2^ab−1))·Σ + bias`, rounded once
    to `remainder`. The digital remainder — batch norm folded to `x·scale + shift` with
    `scale = weight/sqrt(var + 1e-5)` and `shift = bias − mean·scale`, ReLU, residual additions —
    runs in `remainder` one rounded operation at a time, the way networks/resnet.cpp does it;
    global average pooling sums a plane in float64 in row order, divides by its size and rounds
    once. The first layer reads `pixel · fl(1/255)` (in `remainder`).

    `remainder=torch.float32` is the contract (cim-model.md §5: "run in float32"); float64 is the
    same formulas without the float32 roundings, for checking quantisers written with other
    operation orders (tests/python/test_train_cifar_qat.py).
    """
    weight_levels = 2 ** weight_bits - 1
    input_levels = 2 ** input_bits - 1
    layer_names = {id(module): name for name, module in cim_layers(model)}
    layers = {}
    for name, module in cim_layers(model):
        a_max = float(np.float32(input_ranges[name]))
        weight_scale, signed_levels = _quantised_weight(module.weight, weight_bits)
        output_scale = weight_scale * a_max / (weight_levels * input_levels)
        bias = (module.bias.detach().float().double() if module.bias is not None else None)
        layers[id(module)] = (a_max, signed_levels, output_scale, bias)

    def as_stored(tensor):  # what the model file holds (float32), in the remainder's precision
        return tensor.detach().float().to(remainder)

    def cim_layer(module, x):
        a_max, signed_levels, output_scale, bias = layers[id(module)]
        levels = torch.round(input_levels * x.double().clamp(0.0, a_max) / a_max)
        if isinstance(module, nn.Conv2d):
            total = F.conv2d(levels, signed_levels, None, module.stride, module.padding)
        else:
            total = F.linear(levels, signed_levels)
        out = output_scale * total
        if bias is not None:
            out = out + (bias.view(1, -1, 1, 1) if out.dim() == 4 else bias)
        return out.to(remainder)

    def batch_norm(bn, x):
        eps = torch.tensor(BN_EPS, dtype=remainder)
        scale = as_stored(bn.weight) / torch.sqrt(as_stored(bn.running_var) + eps)
        shift = as_stored(bn.bias) - as_stored(bn.running_mean) * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    def conv_norm(conv, bn, x, relu):
        y = batch_norm(bn, cim_layer(conv, x))
        return torch.clamp_min(y, 0.0) if relu else y

    def average_pool(x):
        planes = x.double().reshape(x.shape[0], x.shape[1], -1)
        total = torch.zeros(planes.shape[:2], dtype=torch.float64)
        for position in range(planes.shape[2]):  # row order, one addition at a time
            total = total + planes[:, :, position]
        return (total / planes.shape[2]).to(remainder)

    def block_forward(block, x):
        y = conv_norm(block.conv2, block.bn2, conv_norm(block.conv1, block.bn1, x, True), False)
        if not block.projects:
            skip = x
        elif block.shortcut_kind == "B":
            skip = conv_norm(block.shortcut.conv, block.shortcut.bn, x, False)
        else:
            skip = F.pad(x[:, :, :: block.stride, :: block.stride],
                         (0, 0, 0, 0, block.extra_channels // 2,
                          block.extra_channels - block.extra_channels // 2))
        return torch.clamp_min(y + skip, 0.0)

    def forward(x):
        logits = []
        x = conv_norm(model.conv1, model.bn1, x, True)
        for stage in (1, 2, 3):
            for block in getattr(model, f"layer{stage}"):
                x = block_forward(block, x)
            if stage in model.exits:
                head = getattr(model, f"exit{stage}")
                features = conv_norm(head.conv, head.bn, x, True)
                logits.append(cim_layer(head.fc, average_pool(features)))
        logits.append(cim_layer(model.fc, average_pool(x)))
        return logits

    assert len(layer_names) == len(layers)
    pixel_scale = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(255.0, dtype=torch.float32)
    logits = None
    for start in range(0, images_uint8.shape[0], batch_size):
        batch = images_uint8[start:start + batch_size].to(remainder) * pixel_scale.to(remainder)
        outputs = [out.numpy() for out in forward(batch)]
        logits = outputs if logits is None else [np.concatenate(pair) for pair in
                                                 zip(logits, outputs)]
    return logits


def load_model(path):
    """(ResNetCifar with the file's tensors, input ranges, class names, metadata) of a cimsweep
    model file of the `resnet-cifar` family that `ResNetCifar` builds (shortcut padding "split",
    the default conv exit head); ValueError for others."""
    with open(path, "rb") as file:
        blob = file.read()
    length = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + length])
    metadata = header.pop("__metadata__", {})
    arch = json.loads(metadata["cimsweep.arch"])
    if arch.get("family") != "resnet-cifar" or arch.get("shortcut_padding", "split") != "split":
        raise ValueError(f"{path}: only the resnet-cifar family with split shortcut padding")
    head = arch.get("exit_head", {"type": "conv", "kernel": 3, "stride": 2, "channels": 0})
    if head != {"type": "conv", "kernel": 3, "stride": 2, "channels": 0}:
        raise ValueError(f"{path}: only the default conv exit head ({head} given)")
    model = ResNetCifar(arch["depth"], arch["kernel"], arch["width"], arch["in_channels"],
                        arch["num_classes"], arch.get("shortcut", "A"), arch.get("exits", []))
    dtypes = {"F32": "<f4", "F64": "<f8", "F16": "<f2"}
    data = blob[8 + length:]
    state = {}
    for name, entry in header.items():
        if entry["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        array = np.frombuffer(data[begin:end], dtype=dtypes[entry["dtype"]])
        state[name] = torch.from_numpy(array.astype(np.float32).reshape(entry["shape"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors missing {missing}, unexpected {unexpected}")
    ranges = json.loads(metadata["cimsweep.input_ranges"])
    classes = json.loads(metadata.get("cimsweep.class_names", "[]"))
    return model.eval(), ranges, classes, metadata


def write_safetensors(path, tensors, metadata):
    """Writes float32 tensors (name → array) and a string→string metadata map as safetensors: an
    8-byte little-endian header length, the JSON header (padded with spaces to a multiple of 8),
    then the raw little-endian data, tensors in name order with contiguous offsets."""
    header = {"__metadata__": dict(metadata)}
    blobs, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(np.asarray(tensors[name], dtype="<f4"))
        if not np.all(np.isfinite(array)):
            raise ValueError(f"tensor {name} has non-finite values")
        blob = array.tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for blob in blobs:
            file.write(blob)


def save_model(path, model, arch_dict, input_ranges, class_names, provenance):
    """Writes `model` as a cimsweep model file: every state_dict entry as float32 except BN's
    `num_batches_tracked` counters, plus the `cimsweep.*` metadata as JSON strings."""
    missing = [name for name, _ in cim_layers(model) if name not in input_ranges]
    if missing:
        raise ValueError(f"input ranges missing for CIM layers {missing}")
    tensors = {name: value.detach().cpu().float().numpy()
               for name, value in model.state_dict().items()
               if not name.endswith("num_batches_tracked")}
    metadata = {
        "cimsweep.arch": json.dumps(arch_dict),
        "cimsweep.input_ranges": json.dumps({name: float(value)
                                             for name, value in input_ranges.items()}),
        "cimsweep.class_names": json.dumps(list(class_names)),
        "cimsweep.provenance": json.dumps(provenance),
    }
    write_safetensors(path, tensors, metadata)


# ------------------------------------------------------------------------------------------------
# One CIM layer at σ ≥ 0, read by read (cim-model.md §1-§5), in numpy. Written from the contract,
# not from the C++: every value that decides an ADC code is computed with the contract's
# roundings (float32 conductances and partial sums in the look-up order of §4, float64 ADC and
# recombination in the order of §5), so that a `device` chip gives the CPU backend's outputs bit
# for bit. numpy has no Philox4x32-10, so the chip's z comes in explicitly.

def subarray_rows(in_channels, kernel_h, kernel_w, rows, mapping):
    """The logical rows k = (c, i, j) row-major of every sub-array, in read order (§4): mapping
    `kernel` takes the kernel positions in row-major order and cuts each one's channels into
    blocks of `rows`; `dense` cuts k = 0 … K − 1 into consecutive blocks."""
    taps = kernel_h * kernel_w
    if mapping == "kernel":
        return [np.array([c * taps + tap for c in range(c0, min(in_channels, c0 + rows))])
                for tap in range(taps) for c0 in range(0, in_channels, rows)]
    total = in_channels * taps
    return [np.arange(r0, min(total, r0 + rows)) for r0 in range(0, total, rows)]


def _weight_levels(weight, weight_bits):
    """(s, D[o, k]) of §1 with `maxabs` scaling: ŵ = W/s in float32, D rounded in float64."""
    weight = np.asarray(weight, dtype=np.float32)
    scale = np.float32(np.abs(weight).max())
    w_hat = (weight / scale).astype(np.float64)
    levels = np.rint((2 ** weight_bits - 1) / 2 * (w_hat + 1.0))
    return float(scale), levels.reshape(weight.shape[0], -1).astype(np.int64)


def _input_columns(x, a_max, input_bits, kernel_h, kernel_w, stride, pad):
    """A[position, k] of §3 (positions (n, oy, ox) row-major, k = (c, i, j)), and the output
    shape (n, oh, ow). Padding reads level 0."""
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    a_max = float(np.float32(a_max))
    levels = np.rint((2 ** input_bits - 1) * np.clip(x, 0.0, a_max) / a_max).astype(np.int64)
    n, c, h, w = levels.shape
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=np.int64)
    padded[:, :, pad:pad + h, pad:pad + w] = levels
    oh, ow = (h + 2 * pad - kernel_h) // stride + 1, (w + 2 * pad - kernel_w) // stride + 1
    columns = np.empty((n, oh, ow, c, kernel_h, kernel_w), dtype=np.int64)
    for i in range(kernel_h):
        for j in range(kernel_w):
            columns[:, :, :, :, i, j] = padded[:, :, i:i + stride * oh:stride,
                                               j:j + stride * ow:stride].transpose(0, 2, 3, 1)
    return columns.reshape(n * oh * ow, -1), (n, oh, ow)


def _lookup_sum(conductances, bits):
    """Σ_k g[k, …]·b[position, k] in float32, in §4's order: per group of 4 consecutive rows the
    set rows' conductances added in ascending order from 0, then the groups' sums added in
    ascending order from group 0's. conductances: float32 [rows, …]; bits: bool [positions, rows]."""
    extra = (1,) * (conductances.ndim - 1)
    total = None
    for first in range(0, bits.shape[1], 4):
        group = np.zeros((bits.shape[0],) + conductances.shape[1:], dtype=np.float32)
        for k in range(first, min(first + 4, bits.shape[1])):
            group = np.where(bits[:, k].reshape((-1,) + extra), group + conductances[k], group)
        total = group if total is None else total + group
    return total


class _Adc:
    """One read's ADC of §4 as an affine map of its code k: Q(x) = offset + step·k.
    `code(x, noisy)`: at σ > 0 (noisy) the value is multiplied by 1/step rounded once, a
    noise-free value is divided by step (§4, "ADC codes")."""

    def __init__(self, mode, adc_bits, values=None, full_scale=None):
        self.top = float(2 ** adc_bits - 1)
        self.mode = mode
        if mode == "dynamic":
            lo, hi = float(values.min()), float(values.max())
            self.identity = hi - lo == 0.0
            self.offset = 0.0 if self.identity else lo
            self.step = 1.0 if self.identity else (hi - lo) / float(2 ** adc_bits)
        elif mode in ("fixed", "calibrated"):
            self.identity = False
            self.offset, self.step = 0.0, full_scale / self.top
        else:
            self.identity, self.offset, self.step = True, 0.0, 1.0
        self.inverse = 1.0 / self.step

    def code(self, x, noisy):
        if self.identity:
            return x
        if self.mode == "dynamic":
            scaled = (x - self.offset) * self.inverse if noisy else (x - self.offset) / self.step
            return np.clip(np.floor(scaled), 0.0, self.top)
        scaled = x * self.inverse if noisy else x / self.step
        return np.clip(np.rint(scaled), 0.0, self.top)

    def level(self, code):
        return self.offset + self.step * code

    def spread(self, x, error):
        """How far this read's contribution Q(x)/gain-weight can move when x, and the values that
        set a `dynamic` range, move by up to `error`: whole codes that may flip, and for `dynamic`
        the shift of its offset and step."""
        if self.identity:
            return error
        if self.mode != "dynamic":
            return self.step * (self.code(x + error, True) - self.code(x - error, True))
        largest = float(np.max(error))
        # The range's ends move by up to `largest`: its offset by as much, its step by 2/2^N of it.
        delta = 2 * largest / (self.top + 1)
        ends = [np.clip(np.floor((x + moved - self.offset - shift) / step), 0.0, self.top)
                for moved in (-error, error) for shift in (-largest, largest)
                for step in (self.step - delta, self.step + delta)]
        codes = np.max(ends, axis=0) - np.min(ends, axis=0)
        return self.step * codes + largest + delta * self.top


def cim_layer_forward(weight, bias, a_max, x, sigma, weight_z=None, reference_z=None,
                      weight_bits=8, cell_bits=4, input_bits=8, rows=128, onoff=10.0,
                      mapping="kernel", adc="dynamic", adc_bits=10, full_scale=None,
                      clamp_at_zero=False, neurosim_scale=False, stride=1, pad=0,
                      partial_sum_error=0.0):
    """y[n, o, oh, ow] (float32) of one CIM conv layer (an FC layer: kernel 1×1 on a 1×1 map) on
    one evaluation batch `x` [n, Cin, H, W], weights [Cout, Cin, kh, kw] with `maxabs` scaling.

    `weight_z` [draws, Cout, K, nc] and `reference_z` [draws, K, nc] (float32) are the z of §2 of
    every weight cell (o, k, slice m) and reference cell (k, m): draws = 1 for a `device` chip,
    `input_bits` for a `cycle` chip (draw t is the one of the reads of input bit t in this batch).
    `reference_z=None`: the reference column does not vary (no `--reference-variation`).
    `adc`: ideal, fixed, calibrated (over `full_scale`, see `calibrated_full_scale`) or dynamic.
    Returns (y, clamped): clamped = how many weight and reference conductances `clamp_at_zero`
    set to 0 (at σ > 0 a check that the case clamps at all).

    `partial_sum_error` > 0 is for an executor that sums a read's partial sums in another order
    (a `cycle` chip's GEMM, §4): each of its float32 sums may then differ from this one by up to
    `partial_sum_error`·Σ|g̃·b|, and (y, clamped, slack, possible_flips) comes back,
    slack[n, o, oh, ow] the furthest its y can be from this y: every code that such a change could
    move (and, for `dynamic`, the change of the read's range) counted at its full weight;
    possible_flips: how many ADC conversions such a change could move by a code (for `dynamic`
    with the read's range held)."""
    inv_onoff = 0.0 if math.isinf(onoff) else 1.0 / onoff
    cells, top_cell = weight_bits // cell_bits, 2 ** cell_bits - 1
    kernel_h, kernel_w = weight.shape[2], weight.shape[3]
    weight_scale, levels = _weight_levels(weight, weight_bits)
    columns, (n, oh, ow) = _input_columns(x, a_max, input_bits, kernel_h, kernel_w, stride, pad)
    outs = levels.shape[0]

    def programmed(g, z):  # §2: g̃ = g·(1 + σz) in float64, clamped if asked, stored as float32
        varied = g * (1.0 + sigma * z.astype(np.float64)) if sigma > 0 else g
        clamped = clamp_at_zero and sigma > 0
        return (np.where(varied < 0.0, 0.0, varied) if clamped else varied).astype(np.float32), \
            int(np.count_nonzero(varied < 0.0)) if clamped else 0

    slices = np.stack([(levels >> (cell_bits * m)) & top_cell for m in range(cells)], axis=-1)
    g = (1.0 - inv_onoff) * slices.astype(np.float64) + top_cell * inv_onoff  # [o, k, m]
    g_ref = top_cell * (1.0 + inv_onoff) / 2
    draws = 1 if weight_z is None else weight_z.shape[0]
    chips, clamped = [], 0
    for draw in range(draws):  # [k, o, m] and [k, m] per draw
        weights, count = programmed(g, weight_z[draw] if sigma > 0 else None)
        reference = None
        if reference_z is not None and sigma > 0:
            reference, ref_count = programmed(np.full(reference_z.shape[1:], g_ref),
                                              reference_z[draw])
            count += ref_count
        chips.append((weights.transpose(1, 0, 2), reference))
        clamped += count

    gain = 2.0 / (1.0 - inv_onoff)
    noisy = sigma > 0
    codes = np.zeros((columns.shape[0], outs))
    common = np.zeros(columns.shape[0])
    slack = np.zeros((columns.shape[0], outs))  # with partial_sum_error: how far `total` may move
    possible_flips = 0  # conversions whose code such an error could change
    for rows_of_subarray in subarray_rows(weight.shape[1], kernel_h, kernel_w, rows, mapping):
        for t in range(input_bits):
            weights, reference = chips[t if draws > 1 else 0]
            bits = ((columns[:, rows_of_subarray] >> t) & 1).astype(bool)
            pref_error = np.zeros(columns.shape[0])
            if reference is None:  # the noise-free reference: g_ref·Σb, exact
                pref = g_ref * _lookup_sum(np.ones(len(rows_of_subarray), np.float32),
                                           bits).astype(np.float64)
            for m in range(cells):
                if not noisy:  # §7: exact from the integer counts
                    p = ((1.0 - inv_onoff) * (bits.astype(np.int64) @ slices[:, rows_of_subarray,
                                                                              m].T) +
                         top_cell * inv_onoff * bits.sum(axis=1, keepdims=True))
                else:
                    p = _lookup_sum(weights[rows_of_subarray, :, m], bits).astype(np.float64)
                if reference is not None:
                    pref = _lookup_sum(reference[rows_of_subarray, m], bits).astype(np.float64)
                p_error = np.zeros_like(p)
                if partial_sum_error and noisy:
                    p_error = partial_sum_error * (bits.astype(np.float64) @ np.abs(
                        weights[rows_of_subarray, :, m].astype(np.float64)))
                    if reference is not None:
                        pref_error = partial_sum_error * (bits.astype(np.float64) @ np.abs(
                            reference[rows_of_subarray, m].astype(np.float64)))
                scale_full = (len(rows_of_subarray) * float(top_cell) if adc == "fixed"
                              else full_scale)
                weight_adc = _Adc(adc, adc_bits, p, scale_full)
                reference_adc = _Adc(adc, adc_bits, pref, scale_full)
                w = gain * 2.0 ** (t + cell_bits * m)
                reference_code = reference_adc.code(pref, noisy and reference is not None)
                common = common + w * (weight_adc.offset - reference_adc.level(reference_code))
                weight_code = weight_adc.code(p, noisy)
                codes = codes + (w * weight_adc.step) * weight_code
                if partial_sum_error and noisy:
                    spread, reference_spread = (weight_adc.spread(p, p_error),
                                                reference_adc.spread(pref, pref_error))
                    slack += w * (spread + reference_spread[:, None])
                    if not weight_adc.identity:
                        possible_flips += int(np.count_nonzero(
                            weight_adc.code(p + p_error, True) != weight_adc.code(p - p_error, True)))
                    if not reference_adc.identity and reference is not None:
                        possible_flips += int(np.count_nonzero(
                            reference_adc.code(pref + pref_error, True) !=
                            reference_adc.code(pref - pref_error, True)))
    denominator = (2.0 ** weight_bits * 2.0 ** input_bits if neurosim_scale
                   else float(2 ** weight_bits - 1) * float(2 ** input_bits - 1))
    output_scale = weight_scale * float(np.float32(a_max)) / denominator
    total = codes + common[:, None]
    y = output_scale * total
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32).astype(np.float64)
    y32 = y.astype(np.float32)
    # The float32 rounding of y may go either way once `total` moves at all.
    slack_y = np.where(slack > 0, output_scale * slack + np.spacing(np.abs(y32)).astype(np.float64),
                       0.0)

    def as_planes(values):  # [positions, outs] → [n, outs, oh, ow]
        return values.reshape(n, oh, ow, outs).transpose(0, 3, 1, 2)

    if partial_sum_error:
        return as_planes(y32), clamped, as_planes(slack_y), possible_flips
    return as_planes(y32), clamped


def calibrated_full_scale(weight, a_max, x, weight_bits=8, cell_bits=4, input_bits=8, rows=128,
                          onoff=10.0, mapping="kernel", stride=1, pad=0):
    """ADC `calibrated`'s full scale (§4): the largest partial sum, weight or reference column,
    of any read of the layer over the batch `x` on a noise-free chip (exact, §7)."""
    inv_onoff = 0.0 if math.isinf(onoff) else 1.0 / onoff
    top_cell = 2 ** cell_bits - 1
    _, levels = _weight_levels(weight, weight_bits)
    columns, _ = _input_columns(x, a_max, input_bits, weight.shape[2], weight.shape[3], stride,
                                pad)
    largest = 0.0
    for rows_of_subarray in subarray_rows(weight.shape[1], weight.shape[2], weight.shape[3], rows,
                                          mapping):
        for t in range(input_bits):
            bits = (columns[:, rows_of_subarray] >> t) & 1
            count = bits.sum(axis=1, keepdims=True).astype(np.float64)
            largest = max(largest, float((top_cell * (1.0 + inv_onoff) / 2 * count).max()))
            for m in range(weight_bits // cell_bits):
                cells = (levels[:, rows_of_subarray] >> (cell_bits * m)) & top_cell
                p = (1.0 - inv_onoff) * (bits @ cells.T).astype(np.float64) + \
                    top_cell * inv_onoff * count
                largest = max(largest, float(p.max()))
    return largest
