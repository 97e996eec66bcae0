"""Imports a PyTorch CIFAR ResNet checkpoint as a cimsweep model file.

    /usr/bin/python3 tools/import_torch.py CHECKPOINT.th --data DIR --out MODEL.safetensors \
        [--mean 0.4914,0.4822,0.4465 --std 0.2470,0.2435,0.2616] [--calibration-images 2000] \
        [--percentile 99.99] [--input-size 32,32] [--classes a,b,…]

Layouts it reads (a `state_dict`, or a checkpoint dict holding one under `state_dict`, `model`
or `net`; a `module.` prefix of DataParallel is dropped):

* `pytorch_resnet_cifar10` (Y. Idelbayev): `conv1`, `bn1`, `layer{1,2,3}.{b}.conv1/bn1/conv2/bn2`,
  `linear`; option A shortcuts have no tensors, option B ones are `shortcut.0` (conv) and
  `shortcut.1` (BN);
* torchvision style: the same blocks with the head named `fc` and option B shortcuts named
  `downsample.0` / `downsample.1`.

The network is cimsweep's `resnet-cifar` (docs/model-format.md): depth, width, kernel, channels
and classes are read off the tensors. A tensor it cannot place stops the import with one line
naming it; so does a tensor the network needs and the checkpoint lacks.

Input normalisation `(pixel/255 − mean)/std` is folded into the first conv (docs/cim-model.md §3):
weights W/std per input channel and a bias −Σ W·mean/std, so the chip reads pixel/255 with
a_max = 1. This is exact except where conv1's window overlaps the zero padding of the image
border (the original pads the normalised image with 0, the folded network pads pixels with 0);
the import measures what that changes (top-1 agreement and largest logit difference between the
checkpoint's network and the folded one on the calibration images) and records it. Every CIM
layer's input range a_max is then the given percentile of its float inputs over N class-balanced
training images (tools/cim_reference.py calibrate_input_ranges, the one the trainer uses). The
model file carries the provenance: checkpoint path and hash, layout, normalisation, calibration,
fold check, and the 8-bit σ = 0 (ideal ADC) accuracy on the calibration images.
"""

import argparse
import copy
import datetime
import hashlib
import os
import re
import shlex
import sys

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cim_reference  # noqa: E402  (sibling modules, found through the path set above)
import train_cifar_qat  # noqa: E402


class CheckpointError(Exception):
    """Something about the checkpoint or the options the user can fix: one line."""


def fail(message):
    print(f"import_torch: {message}", file=sys.stderr)
    sys.exit(2)


# Checkpoint names → cimsweep names, first match wins. Block-internal names are shared by both
# layouts; the head and the projection shortcut differ.
RENAMES = [
    (re.compile(r"^linear\.(weight|bias)$"), r"fc.\1"),
    (re.compile(r"^fc\.(weight|bias)$"), r"fc.\1"),
    (re.compile(r"^(conv1\.(?:weight|bias))$"), r"\1"),
    (re.compile(r"^(bn1\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"), r"\1"),
    (re.compile(r"^(layer[123]\.\d+)\.(conv[12]\.(?:weight|bias))$"), r"\1.\2"),
    (re.compile(r"^(layer[123]\.\d+)\.(bn[12]\.(?:weight|bias|running_mean|running_var|"
                r"num_batches_tracked))$"), r"\1.\2"),
    (re.compile(r"^(layer[123]\.\d+)\.(?:shortcut|downsample)\.0\.(weight|bias)$"),
     r"\1.shortcut.conv.\2"),
    (re.compile(r"^(layer[123]\.\d+)\.(?:shortcut|downsample)\.1\.(weight|bias|running_mean|"
                r"running_var|num_batches_tracked)$"), r"\1.shortcut.bn.\2"),
]


def load_state_dict(path):
    """The checkpoint's tensors by name (a bare state_dict or one inside a training checkpoint)."""
    try:
        checkpoint = torch.load(path, map_location="cpu")
    except Exception as error:  # torch raises many kinds for a file that is not a checkpoint
        raise CheckpointError(f"cannot read checkpoint '{path}': {error}: give a file written by "
                           "torch.save") from None
    if isinstance(checkpoint, nn.Module):
        checkpoint = checkpoint.state_dict()
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model", "net"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise CheckpointError(f"checkpoint '{path}' holds no state_dict: save model.state_dict()")
    tensors = {}
    for name, value in checkpoint.items():
        if not torch.is_tensor(value):
            raise CheckpointError(f"checkpoint '{path}': entry '{name}' is not a tensor: save "
                               "model.state_dict()")
        tensors[name[len("module."):] if name.startswith("module.") else name] = value
    return tensors


def map_names(tensors):
    """(cimsweep name → tensor, layout) with BN counters dropped; CheckpointError names the first
    tensor (in checkpoint order) no rule places."""
    mapped, layout = {}, None
    for name, value in tensors.items():
        for pattern, replacement in RENAMES:
            if pattern.match(name):
                target = pattern.sub(replacement, name)
                break
        else:
            raise CheckpointError(
                f"tensor '{name}' {list(value.shape)} has no place in a CIFAR ResNet (conv1, "
                "bn1, layer{1,2,3}.{b}.conv1/bn1/conv2/bn2[/shortcut], linear or fc): this "
                "importer reads the pytorch_resnet_cifar10 and torchvision-style layouts only")
        if name.startswith("linear."):
            layout = "pytorch_resnet_cifar10 (head 'linear')"
        elif name.startswith("fc."):
            layout = "torchvision style (head 'fc')"
        if target.endswith("num_batches_tracked"):
            continue
        mapped[target] = value.detach().double()
    if "fc.weight" not in mapped:
        raise CheckpointError("the checkpoint has no classifier 'linear.weight' or 'fc.weight'")
    return mapped, layout


def infer_network(mapped):
    """A cim_reference.ResNetCifar shaped like the checkpoint's tensors."""
    if "conv1.weight" not in mapped:
        raise CheckpointError("the checkpoint has no first conv 'conv1.weight'")
    stem = mapped["conv1.weight"]
    width, in_channels, kernel = stem.shape[0], stem.shape[1], stem.shape[2]
    blocks = [len({int(name.split(".")[1]) for name in mapped if name.startswith(f"layer{s}.")})
              for s in (1, 2, 3)]
    if len(set(blocks)) != 1 or blocks[0] == 0:
        raise CheckpointError(f"stages have {blocks} blocks: a CIFAR ResNet has n blocks in each of "
                           "its 3 stages")
    shortcut = "B" if any(".shortcut." in name for name in mapped) else "A"
    return cim_reference.ResNetCifar(6 * blocks[0] + 2, kernel, width, in_channels=in_channels,
                                     num_classes=mapped["fc.weight"].shape[0], shortcut=shortcut)


def load_into(model, mapped):
    """Copies the mapped tensors into the model; CheckpointError names a missing or misshapen one."""
    state = model.state_dict()
    for name, target in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        if name not in mapped:
            raise CheckpointError(f"the checkpoint lacks '{name}' {list(target.shape)}, which this "
                               f"ResNet-{model.depth} needs")
        if tuple(mapped[name].shape) != tuple(target.shape):
            raise CheckpointError(f"tensor '{name}' has shape {list(mapped[name].shape)}, the "
                               f"network needs {list(target.shape)}")
    for name in mapped:
        if name not in state and name != "conv1.bias":
            raise CheckpointError(f"tensor '{name}' has no place in a ResNet-{model.depth} of "
                               f"this shape (shortcut {model.shortcut})")
    model.double()
    model.load_state_dict({name: mapped.get(name, value) for name, value in state.items()})
    if "conv1.bias" in mapped:
        set_stem(model, model.conv1.weight.detach(), mapped["conv1.bias"])
    return model


def set_stem(model, weight, bias):
    """Replaces conv1 by one with this weight and bias (cimsweep reads an optional conv bias)."""
    old = model.conv1
    stem = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                     bias=True).double()
    stem.weight.data.copy_(weight)
    stem.bias.data.copy_(bias)
    model.conv1 = stem


def fold_normalisation(model, mean, std):
    """conv1 of (x − mean)/std becomes conv1' of x: W' = W/std per input channel and bias
    b' = b − Σ W·mean/std (docs/cim-model.md §3)."""
    weight = model.conv1.weight.detach()
    bias = model.conv1.bias.detach() if model.conv1.bias is not None else torch.zeros(
        weight.shape[0], dtype=weight.dtype)
    mean_t = torch.tensor(mean, dtype=weight.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=weight.dtype).view(1, -1, 1, 1)
    folded = weight / std_t
    set_stem(model, folded, bias - (folded * mean_t).sum(dim=(1, 2, 3)))


def parse_floats(text, what, channels):
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise CheckpointError(f"{what} '{text}' is not a comma-separated list of numbers") from None
    if len(values) == 1:
        values *= channels
    if len(values) != channels:
        raise CheckpointError(f"{what} has {len(values)} values for {channels} input channels")
    return values


def balanced(labels, count):
    """Indexes of `count` training images, as equal a share of every class as possible, the first
    ones of each class in file order (deterministic)."""
    classes = int(labels.max()) + 1
    per_class = [np.flatnonzero(labels.numpy() == c) for c in range(classes)]
    chosen, k = [], 0
    while len(chosen) < min(count, len(labels)):
        for indexes in per_class:
            if k < len(indexes) and len(chosen) < count:
                chosen.append(int(indexes[k]))
        k += 1
    return torch.tensor(sorted(chosen))


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="PyTorch checkpoint (torch.save of a state_dict)")
    parser.add_argument("--data", required=True,
                        help="image folder with train/<class>/… (calibration images)")
    parser.add_argument("--out", required=True, help="model file to write (.safetensors)")
    parser.add_argument("--mean", help="per-channel normalisation mean of pixel/255, e.g. "
                        "0.4914,0.4822,0.4465 (default: none)")
    parser.add_argument("--std", help="per-channel normalisation std, e.g. 0.2470,0.2435,0.2616")
    parser.add_argument("--calibration-images", type=int, default=2000,
                        help="class-balanced training images to calibrate on (default 2000)")
    parser.add_argument("--percentile", type=float, default=99.99,
                        help="input range a_max = this percentile of a layer's inputs (default "
                        "99.99)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if os.path.exists(args.out) and not args.force:
            raise CheckpointError(f"'{args.out}' exists: choose another --out or add --force")
        if not 0 < args.percentile <= 100:
            raise CheckpointError(f"--percentile {args.percentile} is not in (0, 100]")
        if args.calibration_images < 1:
            raise CheckpointError("--calibration-images must be at least 1")
        if (args.mean is None) != (args.std is None):
            raise CheckpointError("give --mean and --std together (or neither)")
        mapped, layout = map_names(load_state_dict(args.checkpoint))
        model = load_into(infer_network(mapped), mapped).eval()
        original = copy.deepcopy(model)
        mean = std = None
        if args.mean is not None:
            channels = model.in_channels
            mean = parse_floats(args.mean, "--mean", channels)
            std = parse_floats(args.std, "--std", channels)
            if min(std) <= 0:
                raise CheckpointError(f"--std {args.std} has a value ≤ 0")
            fold_normalisation(model, mean, std)

        images, labels, classes = train_cifar_qat.load_image_folder(args.data, "train")
        if images.shape[1] != model.in_channels:
            raise CheckpointError(f"images of '{args.data}' have {images.shape[1]} channels, the "
                               f"checkpoint's conv1 reads {model.in_channels}")
        if len(classes) != model.num_classes:
            raise CheckpointError(f"'{args.data}/train' has {len(classes)} classes, the "
                               f"checkpoint's classifier {model.num_classes}")
        chosen = balanced(labels, args.calibration_images)
        calibration = images[chosen]
    except CheckpointError as error:
        fail(str(error))

    with torch.no_grad():
        pixels = calibration.double() / 255.0
        if mean is not None:
            normalised = (pixels - torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)) / \
                torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        else:
            normalised = pixels
        before = original(normalised)[-1]
        after = model(pixels)[-1]
    agreement = float((before.argmax(1) == after.argmax(1)).double().mean())
    logit_change = float((before - after).abs().max())
    model.float()  # as the file stores it, and as the calibration feeds it
    ranges = cim_reference.calibrate_input_ranges(model, calibration, percentile=args.percentile)
    quantised = cim_reference.quantised_digital_forward(model, calibration, ranges)[-1]
    quantised_accuracy = float((quantised.argmax(1) == labels[chosen].numpy()).mean())
    float_accuracy = float((before.argmax(1) == labels[chosen]).double().mean())

    provenance = {
        "imported_by": "tools/import_torch.py",
        "command": shlex.join(["/usr/bin/python3", *sys.argv]),
        "checkpoint": args.checkpoint,
        "checkpoint_sha256": sha256(args.checkpoint),
        "layout": layout,
        "normalisation": ("none: the network reads pixel/255" if mean is None else
                          f"(pixel/255 - {mean}) / {std}, folded into conv1 (weights / std, "
                          "bias - sum(W mean / std))"),
        "fold_check": f"checkpoint network vs folded network on the {len(chosen)} calibration "
                      f"images: top-1 agreement {agreement:.4f}, largest logit difference "
                      f"{logit_change:.3g} (the zero padding of conv1's border differs)",
        "calibration": f"input ranges = percentile {args.percentile} of each CIM layer's float "
                       f"inputs over {len(chosen)} class-balanced training images of "
                       f"{args.data} (conv1 = 1.0)",
        "float_calibration_accuracy": float_accuracy,
        "quantised_digital_calibration_accuracy": quantised_accuracy,
        "quantised_digital": "8-bit weights and inputs, sigma 0, ideal ADC, "
                             "tools/cim_reference.py quantised_digital_forward",
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    temporary = args.out + ".tmp"
    cim_reference.save_model(temporary, model, model.arch(tuple(images.shape[2:])), ranges,
                             classes, provenance)
    os.replace(temporary, args.out)
    print(f"import_torch: {layout}, ResNet-{model.depth} (width {model.width}, kernel "
          f"{model.kernel}, shortcut {model.shortcut}, {model.num_classes} classes); fold check "
          f"{agreement:.4f} top-1 agreement; on {len(chosen)} calibration images float "
          f"{float_accuracy:.4f}, 8-bit {quantised_accuracy:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
