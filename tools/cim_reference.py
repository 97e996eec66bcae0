"""Reference implementation of cimsweep's network family and its σ = 0 CIM numerics, in PyTorch.

It exists so that the C++ simulator can be checked against something written independently:

* `ResNetCifar` builds the `resnet-cifar` family with exactly the tensor names of
  docs/model-format.md, so a trained `state_dict` is a valid cimsweep model file.
* `quantised_digital_forward` computes what a CIM chip with no conductance variation (σ = 0) and an
  ideal ADC must output (docs/cim-model.md §5: "the CIM layer equals the digital layer with ŵ and A
  quantised"), in float64 with exact integer accumulation.
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

    per_image = {}
    probe_hooks = [module.register_forward_pre_hook(
        lambda module, inputs, name=name: per_image.__setitem__(name, inputs[0][0].numel()))
        for name, module in layers]
    model(images[:1].float() / 255.0)
    for hook in probe_hooks:
        hook.remove()

    total = {name: per_image[name] * images.shape[0] for name, _ in layers}
    keep = {name: total[name] - math.floor(q * (total[name] - 1)) for name in total}
    top = {name: torch.empty(0, dtype=torch.float64) for name in total}

    def record(module, inputs, name):
        values = torch.cat([top[name], inputs[0].detach().reshape(-1).double()])
        top[name] = torch.topk(values, min(keep[name], values.numel())).values

    hooks = [module.register_forward_pre_hook(
        lambda module, inputs, name=name: record(module, inputs, name)) for name, module in layers]
    try:
        for start in range(0, images.shape[0], batch_size):
            model(images[start:start + batch_size].float() / 255.0)
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
