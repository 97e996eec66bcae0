"""PyTorch training of the same ResNet on CIFAR-10, timed: the speed baseline of `cimsweep train`.

What a competent PyTorch user would write for the run that `cimsweep train --device cuda` does:
the `resnet-cifar` model of tools/cim_reference.py (ResNet-20 by default, option-A shortcuts,
cimsweep's tensor names), pixel/255 inputs without normalisation (the first CIM layer reads
pixels in [0, 1]), random crop (4-pixel zero padding) + horizontal flip done on the GPU, SGD with
momentum 0.9, weight decay 5e-4 on conv/FC weights only, cosine learning rate, batch 128, the whole
training set resident on the GPU (no data-loader cost in the timing).

Precision as cimsweep's `--precision`:
  fp32   IEEE fp32 everywhere (cuDNN and cuBLAS TF32 switched off);
  mixed  TF32 tensor cores for convolutions and matmuls, fp32 weights, BN and loss.
`--qat` adds 8-bit fake quantisers with straight-through gradients on every conv/linear layer
(weights max-abs scaled, inputs clipped to a range taken from the first batch), as cimsweep's QAT
does; off by default (the float baseline).

It times each epoch (CUDA-synchronised wall clock, the first `--warmup-steps` steps of the first
epoch excluded from the first epoch's figure and reported apart) and prints one JSON line per
epoch plus a summary: images/s, seconds per epoch, loss, train accuracy, test accuracy.

Data: `--data DIR` where DIR holds either the extracted image folders (`train/<class>/*.jpg`,
`test/<class>/*.jpg`, class index = sorted folder order) or the archives
`cifar10-train-jpeg.tar.gz` / `cifar10-test-jpeg.tar.gz` (read in place), e.g. ../shared/data.
These JPEGs are lossy copies of CIFAR-10: accuracies on them are 0.5-2 points under the originals.

Usage:
    python3 tools/train_torch_baseline.py --data ../shared/data --epochs 1 --precision fp32
    python3 tools/train_torch_baseline.py --data ../shared/data --epochs 1 --precision mixed --qat
"""

import argparse
import io
import json
import math
import os
import sys
import tarfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cim_reference  # noqa: E402  (a sibling module, found through the path set above)

CROP_PADDING = 4


def decode_jpeg(data):
    """uint8 [3, H, W] from JPEG bytes: PIL when installed, else torchvision's decoder."""
    try:
        from PIL import Image  # imported here: only the data loading needs it
    except ImportError:
        from torchvision.io import ImageReadMode, decode_jpeg as tv_decode_jpeg
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return tv_decode_jpeg(encoded, mode=ImageReadMode.RGB).numpy()
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return array.transpose(2, 0, 1)


def load_split(data_dir, split):
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) of `split` ('train' or 'test'), from the
    image folders DIR/split/<class>/ or from DIR/cifar10-<split>-jpeg.tar.gz."""
    folder = os.path.join(data_dir, split)
    samples = []  # (class name, file name, bytes)
    if os.path.isdir(folder):
        for class_name in sorted(os.listdir(folder)):
            class_dir = os.path.join(folder, class_name)
            if not os.path.isdir(class_dir):
                continue
            for name in sorted(os.listdir(class_dir)):
                with open(os.path.join(class_dir, name), "rb") as file:
                    samples.append((class_name, name, file.read()))
    else:
        archive = os.path.join(data_dir, f"cifar10-{split}-jpeg.tar.gz")
        if not os.path.exists(archive):
            raise SystemExit(f"no {folder}/ and no {archive}: point --data at the CIFAR-10 image "
                             "folders or their archives")
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                parts = member.name.strip("./").split("/")
                if not member.isfile() or len(parts) < 3 or parts[-3] != split:
                    continue
                samples.append((parts[-2], parts[-1], tar.extractfile(member).read()))
    if not samples:
        raise SystemExit(f"no images found for the {split} split under {data_dir}")
    classes = sorted({class_name for class_name, _, _ in samples})
    index = {name: i for i, name in enumerate(classes)}
    samples.sort(key=lambda s: (index[s[0]], s[1]))
    images = np.stack([decode_jpeg(data) for _, _, data in samples])
    labels = np.array([index[class_name] for class_name, _, _ in samples], dtype=np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels), classes


def augment(images, generator):
    """Random crop after zero padding by CROP_PADDING pixels and a random horizontal flip, per
    image, on the images' device (a float batch [B, C, H, W])."""
    count, channels, height, width = images.shape
    device = images.device
    padded = F.pad(images, (CROP_PADDING,) * 4)
    top = torch.randint(0, 2 * CROP_PADDING + 1, (count,), generator=generator, device=device)
    left = torch.randint(0, 2 * CROP_PADDING + 1, (count,), generator=generator, device=device)
    rows = (top[:, None] + torch.arange(height, device=device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(width, device=device))[:, None, None, :]
    batch_index = torch.arange(count, device=device)[:, None, None, None]
    channel_index = torch.arange(channels, device=device)[None, :, None, None]
    cropped = padded[batch_index, channel_index, rows, cols]
    flip = torch.rand(count, generator=generator, device=device) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


class FakeQuant:
    """8-bit straight-through fake quantisers on every conv/linear layer (forward pre-hooks):
    weights max-abs scaled to 2^wb − 1 levels, inputs clipped to [0, a_max] with a_max set from
    the first batch that layer sees."""

    def __init__(self, model, weight_bits=8, input_bits=8):
        self.weight_bits, self.input_bits = weight_bits, input_bits
        self.ranges = {}
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                self.handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, inputs):
            x = inputs[0]
            if name not in self.ranges:
                self.ranges[name] = float(x.detach().abs().max().clamp_min(1e-3))
            a_max = self.ranges[name]
            top = 2 ** self.input_bits - 1
            clipped = x.clamp(0.0, a_max)
            quantised = torch.round(clipped * (top / a_max)) * (a_max / top)
            x_q = clipped + (quantised - clipped).detach()
            module._cim_weight = self._quantise_weight(module.weight)
            return (x_q,)
        return hook

    def _quantise_weight(self, weight):
        top = 2 ** self.weight_bits - 1
        scale = weight.detach().abs().max().clamp_min(1e-12)
        level = torch.round((weight / scale + 1.0) * (top / 2)).clamp(0, top)
        quantised = scale * (2 * level - top) / top
        return weight + (quantised - weight).detach()


def qat_forward(model):
    """Makes every conv/linear layer multiply with its fake-quantised weight (`_cim_weight`, set
    by FakeQuant's pre-hook) instead of its fp32 master weight."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            def conv(x, m=module):
                return F.conv2d(x, getattr(m, "_cim_weight", m.weight), m.bias, m.stride,
                                m.padding, m.dilation, m.groups)
            module.forward = conv
        elif isinstance(module, nn.Linear):
            def linear(x, m=module):
                return F.linear(x, getattr(m, "_cim_weight", m.weight), m.bias)
            module.forward = linear


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def accuracy(model, images, labels, batch_size=1000):
    model.eval()
    right = 0
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].float().div_(255.0)
        right += (model(batch)[-1].argmax(1) == labels[start:start + batch_size]).sum().item()
    model.train()
    return 100.0 * right / images.shape[0]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True,
                        help="CIFAR-10 image folders (train/, test/) or their .tar.gz archives")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--precision", choices=["fp32", "mixed"], default="fp32")
    parser.add_argument("--qat", action="store_true", help="8-bit fake quantisers (STE)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--warmup-steps", type=int, default=20,
                        help="steps of the first epoch left out of its timing (cuDNN autotuning)")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop each epoch after this many steps (0: the whole epoch)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    return parser.parse_args()


def main():
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    mixed = args.precision == "mixed"
    torch.backends.cudnn.allow_tf32 = mixed
    torch.backends.cuda.matmul.allow_tf32 = mixed
    torch.backends.cudnn.benchmark = True

    load_start = time.perf_counter()
    train_images, train_labels, classes = load_split(args.data, "train")
    test_images, test_labels, _ = load_split(args.data, "test")
    load_seconds = time.perf_counter() - load_start
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    test_images, test_labels = test_images.to(device), test_labels.to(device)

    model = cim_reference.ResNetCifar(args.depth, 3, args.width, in_channels=3,
                                      num_classes=len(classes)).to(device)
    if args.qat:
        qat_forward(model)
        FakeQuant(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=args.lr, momentum=args.momentum)
    steps_per_epoch = train_images.shape[0] // args.batch  # drop the last partial batch
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    total_steps = steps_per_epoch * args.epochs
    step_model = torch.compile(model) if args.compile else model
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)

    def lr_at(step):
        return 0.5 * args.lr * (1.0 + math.cos(math.pi * step / total_steps))

    step = 0
    results = []
    for epoch in range(args.epochs):
        order = torch.randperm(train_images.shape[0], generator=generator, device=device)
        loss_sum = torch.zeros((), device=device)
        right = torch.zeros((), device=device, dtype=torch.int64)
        timed_images = 0
        synchronize(device)
        start = time.perf_counter()
        warmup_seconds = 0.0
        for batch in range(steps_per_epoch):
            if epoch == 0 and batch == args.warmup_steps:
                synchronize(device)
                warmup_seconds = time.perf_counter() - start
                start = time.perf_counter()
                timed_images = 0
            index = order[batch * args.batch:(batch + 1) * args.batch]
            images = augment(train_images[index].float().div_(255.0), generator)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = train_labels[index]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            logits = step_model(images)[-1]
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            right += (logits.argmax(1) == labels).sum()
            timed_images += images.shape[0]
            step += 1
        synchronize(device)
        seconds = time.perf_counter() - start
        result = {
            "epoch": epoch + 1,
            "precision": args.precision,
            "qat": args.qat,
            "batch": args.batch,
            "steps": steps_per_epoch,
            "timed_images": timed_images,
            "seconds": round(seconds, 4),
            "images_per_second": round(timed_images / seconds, 1) if seconds > 0 else None,
            "warmup_seconds": round(warmup_seconds, 4),
            "epoch_seconds": round(seconds + warmup_seconds, 4),
            "loss": round(loss_sum.item() / steps_per_epoch, 5),
            "train_accuracy": round(100.0 * right.item() / (steps_per_epoch * args.batch), 3),
            "test_accuracy": round(accuracy(model, test_images, test_labels), 3),
        }
        results.append(result)
        print(json.dumps(result), flush=True)
    summary = {
        "summary": True,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "model": f"resnet{args.depth}-cifar width {args.width}",
        "data_load_seconds": round(load_seconds, 2),
        "best_images_per_second": max(r["images_per_second"] or 0 for r in results),
        "seconds_per_epoch_at_best": min(r["seconds"] for r in results),
        "final_test_accuracy": results[-1]["test_accuracy"],
        "note": "CIFAR-10 JPEG copy: accuracies 0.5-2 points under the original files",
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
