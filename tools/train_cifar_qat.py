"""Quantisation-aware training of the study's CIFAR-10 ResNets, CPU or GPU (PyTorch), resumable.

The model zoo's trainer while `cimsweep train` is slower than PyTorch on a CPU. It trains exactly
the quantisers the evaluator applies (cim-model §1, §3, as `docs/cim-model.md` states them): every
conv and linear layer sees its weights as the signed integer levels 2D − (2^wb − 1) of the max-abs
scaling and its input as the integers A = round((2^ab − 1)·clip(a, 0, a_max)/a_max), straight-
through; the layer's output is that integer product times s·a_max/((2^wb − 1)(2^ab − 1)). Integer
operands are exact in bf16, so `--precision bf16` (autocast, fp32 master weights, BN and loss)
changes only the rounding of the accumulated product. Input ranges `a_max` are the 99.99th
percentile of each layer's input over fixed training images, measured again before every epoch.

Images are decoded with the same stb_image library (Debian's libstb) the simulator links, so the
test set here is pixel for pixel the one `cimsweep eval --data … --split test` reads, and the
8-bit accuracy written into the model (computed by `cim_reference.quantised_digital_forward`, the
exact σ = 0, ideal-ADC forward: integer sums exact in float64, the digital remainder in float32
operation for operation as cimsweep computes it) is what `cimsweep eval MODEL --sigma 0 --adc
ideal` prints.

Every epoch ends with an atomic checkpoint (model, optimiser, schedule, every random state, ranges,
history) in `--checkpoint-dir`; started again with the same arguments the run resumes from it and
ends with the same model as an uninterrupted run (same thread count).
"""

import argparse
import ctypes
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cim_reference  # noqa: E402  (a sibling module, found through the path set above)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIBRATION_IMAGES = 2000
CALIBRATION_PERCENTILE = 99.99
CROP_PADDING = 4


def fail(message):
    print(f"train_cifar_qat: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------- data (decoded as the simulator)

def _stb():
    try:
        library = ctypes.CDLL("libstb.so.0")
    except OSError:
        fail("cannot load libstb.so.0 (Debian package libstb0, installed with libstb-dev): "
             "run tools/install-deps.sh")
    library.stbi_load_from_memory.restype = ctypes.POINTER(ctypes.c_ubyte)
    library.stbi_load_from_memory.argtypes = [
        ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    library.stbi_image_free.argtypes = [ctypes.c_void_p]
    return library


def load_image_folder(root, split, with_names=False):
    """(uint8 images [N, 3, H, W], int64 labels [N], class names) of `root/split/<class>/*`, in the
    simulator's order (classes and files sorted by name), decoded by stb_image to RGB; with_names:
    a fourth entry, every image's "<class>/<file>" (as `cimsweep eval --predictions` names it)."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        fail(f"'{folder}' is not a directory: pass --data with the folder holding train/ and "
             "test/ (one sub-folder per class)")
    classes = sorted(name for name in os.listdir(folder)
                     if os.path.isdir(os.path.join(folder, name)))
    stb = _stb()
    images, labels, names = [], [], []
    width, height, components = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    for label, name in enumerate(classes):
        class_dir = os.path.join(folder, name)
        for file_name in sorted(os.listdir(class_dir)):
            with open(os.path.join(class_dir, file_name), "rb") as file:
                data = file.read()
            pixels = stb.stbi_load_from_memory(data, len(data), ctypes.byref(width),
                                               ctypes.byref(height), ctypes.byref(components), 3)
            if not pixels:
                fail(f"cannot decode {os.path.join(class_dir, file_name)}")
            count = width.value * height.value * 3
            array = np.ctypeslib.as_array(pixels, shape=(count,)).copy()
            stb.stbi_image_free(pixels)
            images.append(array.reshape(height.value, width.value, 3).transpose(2, 0, 1))
            labels.append(label)
            names.append(f"{name}/{file_name}")
    loaded = (torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), classes)
    return loaded + (names,) if with_names else loaded


def augment(images, generator):
    """Random crop after zero-padding by CROP_PADDING pixels and a random horizontal flip, per
    image, on a uint8 batch [B, C, H, W] (stays uint8: pixels are quantised inputs anyway)."""
    count, channels, height, width = images.shape
    padded = F.pad(images, (CROP_PADDING,) * 4)
    top = torch.randint(0, 2 * CROP_PADDING + 1, (count,), generator=generator)
    left = torch.randint(0, 2 * CROP_PADDING + 1, (count,), generator=generator)
    rows = (top[:, None] + torch.arange(height))[:, None, :, None]
    cols = (left[:, None] + torch.arange(width))[:, None, None, :]
    batch_index = torch.arange(count)[:, None, None, None]
    channel_index = torch.arange(channels)[None, :, None, None]
    cropped = padded[batch_index, channel_index, rows, cols]
    flip = torch.rand(count, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


# ---------------------------------------------------------------- the evaluator's quantisers, STE

class QuantisedLayers:
    """Turns every conv and linear of a `cim_reference.ResNetCifar` into its 8-bit CIM form for
    training: integer weight levels and input levels, straight-through, rescaled output."""

    def __init__(self, model, weight_bits, input_bits):
        self.weight_levels = 2 ** weight_bits - 1
        self.input_levels = 2 ** input_bits - 1
        self.layers = cim_reference.cim_layers(model)
        self.enabled = False
        for name, module in self.layers:
            module.cim_a_max = 1.0  # a plain attribute: not a tensor of the model file
            module.forward = self._forward_of(module)

    def set_ranges(self, ranges):
        for name, module in self.layers:
            module.cim_a_max = float(ranges[name])

    def ranges(self):
        return {name: module.cim_a_max for name, module in self.layers}

    def _forward_of(self, module):
        is_conv = isinstance(module, nn.Conv2d)
        original = module.forward

        def forward(x):
            if not self.enabled:
                return original(x)
            a_max = module.cim_a_max
            # The evaluator's formulas in their order of operations (float64 in the reference,
            # the training precision here: a value within rounding of a .5 boundary may land on
            # the neighbouring level, which training does not mind).
            continuous_input = self.input_levels * x.clamp(0.0, a_max) / a_max
            input_levels = continuous_input + (torch.round(continuous_input)
                                               - continuous_input).detach()
            input_q = input_levels * (a_max / self.input_levels)
            weight = module.weight
            scale = weight.detach().abs().max()
            # ŵ = W/s in float32 as stored, D = round((2^wb − 1)/2 · (ŵ + 1)); the layer
            # multiplies by s·(2D − (2^wb − 1))/(2^wb − 1), applied here to the (small) weights.
            w_hat = (weight.detach().float() / scale.float()).to(weight.dtype)
            levels = 2.0 * torch.round(self.weight_levels / 2.0 * (w_hat + 1.0)) \
                - self.weight_levels
            weight_q = weight + (levels * (scale / self.weight_levels) - weight).detach()
            if is_conv:
                return F.conv2d(input_q, weight_q, module.bias, module.stride, module.padding)
            return F.linear(input_q, weight_q, module.bias)
        return forward


# ---------------------------------------------------------------- training

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True,
                        help="CIFAR-10 image folder root holding train/ and test/")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--exits", default="", help="comma-separated early exits (1,2)")
    parser.add_argument("--exit-weights", default="",
                        help="loss weight per head in exit order, final last (default: 1 each)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (one-cycle)")
    parser.add_argument("--wd", type=float, default=5e-4, help="weight decay of conv/fc weights")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: autocast with fp32 master weights (AVX-512 BF16/AMX CPUs)")
    parser.add_argument("--weight-bits", type=int, default=8)
    parser.add_argument("--input-bits", type=int, default=8)
    parser.add_argument("--limit", type=int, default=0, help="first N training images (tests)")
    parser.add_argument("--test-limit", type=int, default=0, help="first N test images (tests)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda / cuda:N for a GPU (augmentation and every random "
                             "draw stay on the CPU, so a run may resume on either)")
    parser.add_argument("--checkpoint-dir", required=True,
                        help="folder of the per-epoch checkpoint and log; the run resumes from it")
    parser.add_argument("--stop-after", type=int, default=0,
                        help="stop after this many epochs of this invocation (tests)")
    parser.add_argument("--out", required=True, help="model file to write when training ends")
    return parser.parse_args(argv)


def run_identity(args):
    """The arguments a checkpoint must match to be resumed: all but those that do not change what
    is trained. The thread count may change between machines (PyTorch's CPU kernels then may sum
    in another order, so a resumed run is bit-identical to an uninterrupted one only on the same
    thread count; the history records each epoch's)."""
    return {k: v for k, v in vars(args).items() if k not in ("stop_after", "threads", "device")}


def atomic_torch_save(obj, path):
    temporary = path + ".tmp"
    torch.save(obj, temporary)
    with open(temporary, "rb") as file:
        os.fsync(file.fileno())
    os.replace(temporary, path)


@torch.no_grad()
def accuracies(model, quantisers, images, labels, quantised, batch_size=500):
    """Top-1 accuracy of every head, float (quantisers off) or with the training quantisers."""
    model.eval()
    quantisers.enabled = quantised
    device = next(model.parameters()).device
    correct = None
    for start in range(0, images.shape[0], batch_size):
        batch = (images[start:start + batch_size].to(device).float() / 255.0).contiguous(
            memory_format=torch.channels_last)
        outputs = model(batch)
        expected = labels[start:start + batch_size].to(device)
        hits = [int((out.argmax(1) == expected).sum()) for out in outputs]
        correct = hits if correct is None else [a + b for a, b in zip(correct, hits)]
    quantisers.enabled = True
    return [c / images.shape[0] for c in correct]


def calibrate(model, quantisers, calibration_images, first):
    """The 99.99th-percentile input range of every CIM layer, measured with the current ranges'
    quantisers on (float on the very first calibration, before any range exists)."""
    quantisers.enabled = not first
    ranges = cim_reference.calibrate_input_ranges(model, calibration_images,
                                                  percentile=CALIBRATION_PERCENTILE)
    quantisers.enabled = True
    quantisers.set_ranges(ranges)
    return ranges


def device_name(device):
    """'cpu', or 'cuda:N (<GPU name>)'."""
    if device.type != "cuda":
        return "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def cpu_has_bf16():
    try:
        with open("/proc/cpuinfo") as file:
            flags = file.read()
    except OSError:
        return False
    return torch.backends.mkldnn.is_available() and ("avx512_bf16" in flags or "amx_bf16" in flags)


def git_commit():
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def commits_in_log(log_path):
    """The commit a run started at, from its log's first lines (checkpoints written before they
    recorded their commits)."""
    try:
        with open(log_path) as file:
            for line in file:
                found = re.search(r"threads, commit (\S+)$", line.strip())
                if found:
                    return [found.group(1)]
    except OSError:
        pass
    return [git_commit()]


def relative(path):
    """A path as the provenance shows it: relative to the repository when inside it."""
    absolute = os.path.abspath(path)
    return os.path.relpath(absolute, REPO) if absolute.startswith(REPO + os.sep) else path


def main(argv=None):
    args = parse_args(argv)
    exits = [int(e) for e in args.exits.split(",") if e]
    heads = len(exits) + 1
    exit_weights = ([float(w) for w in args.exit_weights.split(",")] if args.exit_weights
                    else [1.0] * heads)
    if len(exit_weights) != heads:
        fail(f"--exit-weights has {len(exit_weights)} values for {heads} heads")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU: "
             "use --device cpu")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {args.device}: must be cpu or cuda[:N]")
    if args.precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        fail("--precision bf16 needs a CPU with AVX-512 BF16 or AMX (this one would emulate "
             "bf16, ~20x slower than fp32): use --precision fp32")
    torch.set_num_threads(args.threads)
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    checkpoint_path = os.path.join(args.checkpoint_dir, "checkpoint.pt")
    log_path = os.path.join(args.checkpoint_dir, "train.log")

    def log(line):
        print(line, flush=True)
        with open(log_path, "a") as file:
            file.write(line + "\n")

    train_images, train_labels, classes = load_image_folder(args.data, "train")
    test_images, test_labels, test_classes = load_image_folder(args.data, "test")
    if classes != test_classes:
        fail("train/ and test/ have different class folders")
    if args.limit:  # a seeded random subset: the folders are sorted by class
        keep = torch.randperm(train_images.shape[0],
                              generator=torch.Generator().manual_seed(args.seed + 2))[:args.limit]
        train_images, train_labels = train_images[keep], train_labels[keep]
    if args.test_limit:
        keep = torch.randperm(test_images.shape[0],
                              generator=torch.Generator().manual_seed(args.seed + 3))[
            :args.test_limit]
        test_images, test_labels = test_images[keep], test_labels[keep]

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = cim_reference.ResNetCifar(args.depth, args.kernel, args.width, in_channels=3,
                                      num_classes=len(classes), exits=exits)
    model = model.to(device=device, memory_format=torch.channels_last)
    quantisers = QuantisedLayers(model, args.weight_bits, args.input_bits)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.wd},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = (train_images.shape[0] + args.batch - 1) // args.batch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=0.25, div_factor=10.0, final_div_factor=100.0, three_phase=False)
    calibration_images = train_images[torch.randperm(
        train_images.shape[0], generator=torch.Generator().manual_seed(args.seed + 1))[
        :CALIBRATION_IMAGES]]

    start_epoch, history, wall_before = 0, [], 0.0
    # Every commit the run was trained at, first the one it started at: a run resumed on another
    # machine after the code moved on says so in its provenance instead of naming the last one.
    commits = [git_commit()]
    if os.path.exists(checkpoint_path):
        state = torch.load(checkpoint_path, map_location="cpu")  # optimizer state follows params
        if state["args"] != run_identity(args):
            fail(f"{checkpoint_path} was written by a run with other arguments "
                 f"({state['args']}); use another --checkpoint-dir or the same arguments")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, history, wall_before = state["epoch"], state["history"], state["wall"]
        quantisers.set_ranges(state["ranges"])
        commits = state.get("commits") or commits_in_log(log_path)
        if commits[-1] != git_commit():
            commits.append(git_commit())
        log(f"resumed from {relative(checkpoint_path)} after epoch {start_epoch}")
    else:
        log(f"start: {shlex.join(['python3'] + [relative(a) if os.path.exists(a) else a for a in sys.argv])}")
        log(f"{sum(p.numel() for p in model.parameters())} parameters, {steps_per_epoch} "
            f"batches per epoch, {args.epochs} epochs, {args.precision}, "
            f"{args.threads} threads, {device_name(device)}, commit {git_commit()}")

    session_start = time.time()
    epochs_this_run = 0
    for epoch in range(start_epoch, args.epochs):
        if args.stop_after and epochs_this_run == args.stop_after:
            log(f"stopping after {epochs_this_run} epochs (--stop-after)")
            return
        epoch_start = time.time()
        ranges = calibrate(model, quantisers, calibration_images, first=(epoch == 0))
        model.train()
        order = torch.randperm(train_images.shape[0], generator=generator)
        loss_sum, correct = 0.0, 0
        for start in range(0, order.numel(), args.batch):
            index = order[start:start + args.batch]
            inputs = (augment(train_images[index], generator).to(device).float() / 255.0
                      ).contiguous(memory_format=torch.channels_last)
            targets = train_labels[index].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=args.precision == "bf16"):
                outputs = model(inputs)
            loss = sum(weight * F.cross_entropy(out.float(), targets,
                                                label_smoothing=args.label_smoothing)
                       for weight, out in zip(exit_weights, outputs))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss) * index.numel()
            correct += int((outputs[-1].argmax(1) == targets).sum())
        test = accuracies(model, quantisers, test_images, test_labels, quantised=True)
        seconds = time.time() - epoch_start
        entry = {"epoch": epoch + 1, "loss": round(loss_sum / order.numel(), 5),
                 "train_accuracy": round(correct / order.numel(), 5),
                 "test_accuracy_8bit": [round(a, 5) for a in test],
                 "lr_end": scheduler.get_last_lr()[0], "seconds": round(seconds, 1),
                 "threads": args.threads, "device": device_name(device)}
        history.append(entry)
        wall = wall_before + time.time() - session_start
        atomic_torch_save({"args": run_identity(args),
                           "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                           "torch_rng": torch.get_rng_state(), "epoch": epoch + 1,
                           "history": history, "wall": wall, "ranges": quantisers.ranges(),
                           "commits": commits},
                          checkpoint_path)
        log(f"epoch {epoch + 1}/{args.epochs}: loss {entry['loss']:.4f}, train acc "
            f"{entry['train_accuracy']:.4f} (augmented), 8-bit test acc "
            f"{' / '.join(f'{a:.4f}' for a in test)}, {seconds:.0f} s "
            f"({order.numel() / seconds:.0f} images/s), wall {wall / 60:.1f} min")
        epochs_this_run += 1
        wall_before, session_start = wall, time.time()

    state = torch.load(checkpoint_path, map_location="cpu")
    ranges = state["ranges"]
    wall = state["wall"]
    float_accuracy = accuracies(model, quantisers, test_images, test_labels, quantised=False)
    # A fresh module tree: the training one carries the quantising forwards (deepcopy keeps them
    # bound to the original modules), the reference forward and the file need the plain network.
    model_float = cim_reference.ResNetCifar(args.depth, args.kernel, args.width, in_channels=3,
                                            num_classes=len(classes), exits=exits)
    model_float.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    quantised_logits = cim_reference.quantised_digital_forward(
        model_float, test_images, ranges, weight_bits=args.weight_bits,
        input_bits=args.input_bits)
    quantised_accuracy = [float((logits.argmax(1) == test_labels.numpy()).mean())
                          for logits in quantised_logits]
    log(f"done: float test acc {' / '.join(f'{a:.4f}' for a in float_accuracy)}, 8-bit (σ = 0, "
        f"ideal ADC, exact) {' / '.join(f'{a:.4f}' for a in quantised_accuracy)}, "
        f"wall {wall / 60:.1f} min")

    command = ["/usr/bin/python3", relative(os.path.abspath(sys.argv[0]))] + [
        relative(a) if os.path.exists(a) else a for a in sys.argv[1:]]
    provenance = {
        "trained_by": "tools/train_cifar_qat.py (PyTorch QAT with the evaluator's quantisers)",
        "commit": commits[0],
        **({"resumed_at_commits": " ".join(commits[1:])} if len(commits) > 1 else {}),
        "command": shlex.join(command),
        "data": f"CIFAR-10 JPEG image folders ({relative(args.data)}), train "
                f"{train_images.shape[0]} / test {test_images.shape[0]}, decoded by stb_image, "
                "input pixel/255; JPEG costs 0.5-2 points against the binary CIFAR-10",
        "seed": args.seed,
        "epochs": args.epochs,
        "batch": args.batch,
        "precision": args.precision,
        "optimizer": f"SGD Nesterov momentum 0.9, one-cycle lr peak {args.lr} (25 % warm-up "
                     f"from {args.lr / 10:g}, cosine to {args.lr / 1000:g}), weight decay "
                     f"{args.wd} on conv/fc weights, label smoothing {args.label_smoothing}",
        "exit_loss_weights": exit_weights,
        "augmentation": f"random crop with {CROP_PADDING}-pixel zero padding, horizontal flip",
        "quantisation_aware": f"{args.weight_bits}-bit max-abs weights, {args.input_bits}-bit "
                              "inputs, straight-through; input ranges = percentile "
                              f"{CALIBRATION_PERCENTILE} over {CALIBRATION_IMAGES} training "
                              "images, measured before every epoch (conv1 = 1.0)",
        "float_test_accuracy": float_accuracy[-1],
        "quantised_digital_test_accuracy": quantised_accuracy[-1],
        "exit_float_test_accuracy": float_accuracy,
        "exit_quantised_digital_test_accuracy": quantised_accuracy,
        "quantised_digital": f"{args.weight_bits}-bit weights and inputs, sigma 0, ideal ADC, "
                             "tools/cim_reference.py quantised_digital_forward (float32 digital "
                             "remainder, as cimsweep)",
        "history_summary": f"{len(state['history'])} epochs; 8-bit test acc "
                           f"{state['history'][0]['test_accuracy_8bit'][-1]:.4f} after epoch 1, "
                           f"best {max(h['test_accuracy_8bit'][-1] for h in state['history']):.4f}",
        "history": state["history"],
        "torch_version": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{args.threads} threads, {device_name(device)}",
        **({"devices": " ".join(sorted({h.get("device", "cpu") for h in state["history"]}))}
           if any(h.get("device", "cpu") != "cpu" for h in state["history"]) else {}),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(wall),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    temporary = args.out + ".tmp"
    cim_reference.save_model(temporary, model_float, model_float.arch(tuple(train_images.shape[2:])), ranges, classes,
                             provenance)
    os.replace(temporary, args.out)
    log(f"wrote {relative(args.out)}")
    json.dump({"float": float_accuracy, "quantised": quantised_accuracy},
              open(os.path.join(args.checkpoint_dir, "result.json"), "w"))


if __name__ == "__main__":
    main()
