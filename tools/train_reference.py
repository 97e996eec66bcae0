"""Trains the reference Fashion-MNIST ResNet that the README's main command sweeps.

A stop-gap until cimsweep's own `train` command exists: a plain PyTorch training run (SGD with
momentum, cosine learning rate, random-crop + flip augmentation) on pixel/255 inputs without
normalisation, because the first CIM layer reads pixels in [0, 1] (cim-model.md §3). It then
calibrates every layer's input range on 4000 training images, measures the float and the 8-bit
quantised-digital (σ = 0, ideal ADC) test accuracy on all 10 000 test images, and writes a cimsweep
model file whose provenance records how it was made.
"""

import argparse
import datetime
import gzip
import os
import shlex
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cim_reference  # noqa: E402  (a sibling module, found through the path set above)

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
CALIBRATION_IMAGES = 4000
CROP_PADDING = 2


def read_idx(path):
    """An IDX file (gzip-compressed) as a numpy array: magic 0x0000 + type byte + rank byte,
    big-endian int32 dimensions, then the data (uint8 for MNIST-style sets)."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(shape)


def load_split(data_dir, prefix):
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) of the 'train' or 't10k' split."""
    images = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))
    return (torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)))


def augment(images, generator):
    """Random crop after zero-padding by CROP_PADDING pixels, and a random horizontal flip, per
    image (a float batch [B, C, H, W])."""
    count, _, height, width = images.shape
    padded = F.pad(images, (CROP_PADDING,) * 4)
    top = torch.randint(0, 2 * CROP_PADDING + 1, (count,), generator=generator)
    left = torch.randint(0, 2 * CROP_PADDING + 1, (count,), generator=generator)
    rows = (top[:, None] + torch.arange(height))[:, None, :, None]
    cols = (left[:, None] + torch.arange(width))[:, None, None, :]
    batch_index = torch.arange(count)[:, None, None, None]
    channel_index = torch.arange(images.shape[1])[None, :, None, None]
    cropped = padded[batch_index, channel_index, rows, cols]
    flip = torch.rand(count, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


@torch.no_grad()
def float_accuracy(model, images, labels, batch_size=1000):
    """Top-1 accuracy of the float32 model (final head) in eval mode."""
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start:start + batch_size].float() / 255.0)[-1]
        correct += (logits.argmax(1) == labels[start:start + batch_size]).sum().item()
    return correct / images.shape[0]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist",
                        help="folder with the Fashion-MNIST IDX .gz files")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="initial learning rate (cosine)")
    parser.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="models/fmnist-resnet20.safetensors")
    return parser.parse_args()


def main():
    args = parse_args()
    started = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    train_images, train_labels = load_split(args.data, "train")
    test_images, test_labels = load_split(args.data, "t10k")
    input_size = tuple(train_images.shape[2:])
    model = cim_reference.ResNetCifar(args.depth, args.kernel, args.width,
                                      in_channels=train_images.shape[1],
                                      num_classes=len(FASHION_MNIST_CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                                weight_decay=args.wd)
    batches_per_epoch = (train_images.shape[0] + args.batch - 1) // args.batch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                           args.epochs * batches_per_epoch)
    print(f"{sum(p.numel() for p in model.parameters())} parameters, "
          f"{batches_per_epoch} batches per epoch, {args.epochs} epochs", flush=True)

    for epoch in range(1, args.epochs + 1):
        model.train()
        epoch_start = time.time()
        order = torch.randperm(train_images.shape[0], generator=generator)
        loss_sum, correct = 0.0, 0
        for start in range(0, order.numel(), args.batch):
            index = order[start:start + args.batch]
            inputs = augment(train_images[index].float() / 255.0, generator)
            logits = model(inputs)[-1]
            loss = F.cross_entropy(logits, train_labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * index.numel()
            correct += (logits.argmax(1) == train_labels[index]).sum().item()
        print(f"epoch {epoch}/{args.epochs}: loss {loss_sum / order.numel():.4f}, "
              f"train acc {correct / order.numel():.4f} (augmented), "
              f"lr {scheduler.get_last_lr()[0]:.5f}, "
              f"{time.time() - epoch_start:.0f} s (total {time.time() - started:.0f} s)",
              flush=True)

    model.eval()
    calibration = train_images[torch.randperm(train_images.shape[0],
                                              generator=generator)[:CALIBRATION_IMAGES]]
    input_ranges = cim_reference.calibrate_input_ranges(model, calibration, percentile=99.99)
    float_test_accuracy = float_accuracy(model, test_images, test_labels)
    quantised_logits = cim_reference.quantised_digital_forward(model, test_images, input_ranges,
                                                               weight_bits=8, input_bits=8)
    quantised_test_accuracy = float(
        (quantised_logits[-1].argmax(1) == test_labels.numpy()).mean())
    wall_seconds = time.time() - started
    print(f"float test accuracy {float_test_accuracy:.4f}, 8-bit quantised digital test accuracy "
          f"{quantised_test_accuracy:.4f}, wall time {wall_seconds:.0f} s", flush=True)

    provenance = {
        "trained_by": "trained by tools/train_reference.py (PyTorch), a stop-gap until "
                      "cimsweep's own `train` command",
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
        "data": "Fashion-MNIST (train 60000 / test 10000), input pixel/255, no normalisation",
        "seed": args.seed,
        "epochs": args.epochs,
        "batch": args.batch,
        "optimizer": f"SGD momentum 0.9, lr {args.lr} cosine to 0 per batch, "
                     f"weight decay {args.wd}",
        "augmentation": f"random crop with {CROP_PADDING}-pixel zero padding, horizontal flip",
        "input_ranges": f"percentile 99.99 of each layer's input over {CALIBRATION_IMAGES} "
                        "training images, conv1 = 1.0",
        "float_test_accuracy": float_test_accuracy,
        "quantised_digital_test_accuracy": quantised_test_accuracy,
        "quantised_digital": "8-bit weights (maxabs) and inputs, sigma 0, ideal ADC, "
                             "tools/cim_reference.py",
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(wall_seconds),
        "threads": args.threads,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    cim_reference.save_model(args.out, model, model.arch(input_size), input_ranges,
                             FASHION_MNIST_CLASSES, provenance)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
