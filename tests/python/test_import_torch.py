"""Tests of tools/import_torch.py against PyTorch itself and against `cimsweep eval`.

Run by ctest: /usr/bin/python3 tests/python/test_import_torch.py CIMSWEEP_BINARY. Exit 77 (a
skip) when this Python has no torch. The checkpoint networks are written here the way their
projects write them, independently of tools/cim_reference.py: the pytorch_resnet_cifar10 layout
(`linear` head, option A shortcut by `F.pad(x[:, :, ::2, ::2], …, planes // 4, planes // 4)`)
and a torchvision-style one (`fc` head, `downsample.0/1` projection shortcuts), each a random
ResNet-8 with random BN statistics behind an input normalisation. For each it checks that
1. the imported model's exact 8-bit σ = 0 logits (cim_reference.quantised_digital_forward on the
   tensors and ranges read back from the file) are PyTorch's logits up to quantisation: the
   largest difference is below a tenth of the largest quantised logit without the head's bias;
2. `cimsweep eval MODEL --sigma 0 --adc ideal` computes those quantised logits: on test images
   labelled with their quantised argmax it prints 100 %, and on the same images labelled with
   PyTorch's argmax exactly the share where the two argmaxes agree;
3. the fold of a normalisation with a non-zero mean into conv1 is exact away from the border;
4. an unmappable tensor stops the import with one line naming it.
"""

import json
import os
import struct
import subprocess
import sys
import tempfile

try:
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    print("skipped: /usr/bin/python3 has no torch/numpy (Debian python3-torch python3-numpy)")
    sys.exit(77)

SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(SOURCE, "tools"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cim_reference  # noqa: E402
import import_torch  # noqa: E402
from test_train_cifar_qat import read_model, write_bmp  # noqa: E402

SEED = 20261203
CLASSES = ["c0", "c1", "c2", "c3"]
SIZE = 12  # pixels: a ResNet-8 then runs 12 → 6 → 3
MEAN, STD = [0.0, 0.0, 0.0], [0.25, 0.5, 0.2]  # std only: the fold is exact (see check 3)


class IdelbayevBlock(nn.Module):
    """pytorch_resnet_cifar10's BasicBlock with option A."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if stride != 1 or in_planes != planes else None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.pad is None else F.pad(x[:, :, ::2, ::2],
                                                    (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class TorchvisionBlock(IdelbayevBlock):
    """A torchvision-style BasicBlock: the same convs, a projection `downsample` where the shape
    changes."""

    def __init__(self, in_planes, planes, stride):
        super().__init__(in_planes, planes, stride)
        self.pad = None
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CheckpointNet(nn.Module):
    """ResNet-8 of width 4 in one of the two layouts; reads pixel/255 and normalises itself."""

    def __init__(self, block, head):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(block(4, 4, 1))
        self.layer2 = nn.Sequential(block(4, 8, 2))
        self.layer3 = nn.Sequential(block(8, 16, 2))
        self.head = head
        setattr(self, head, nn.Linear(16, len(CLASSES)))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.3)

    def forward(self, pixels, mean=MEAN, std=STD):
        x = (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return getattr(self, self.head)(F.avg_pool2d(x, x.size()[3]).flatten(1))


def write_split(root, split, images, labels):
    for name in CLASSES:
        os.makedirs(os.path.join(root, split, name), exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        write_bmp(os.path.join(root, split, CLASSES[label], f"{i:04d}.bmp"),
                  image.permute(1, 2, 0).numpy())


def eval_accuracy(binary, model, data):
    table = subprocess.run([binary, "eval", model, "--data", data, "--sigma", "0", "--adc",
                            "ideal", "--no-clean", "--format", "json", "--quiet", "--threads",
                            "1"], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    rows = json.loads(table.stdout)
    return float(rows[0]["mean"])


def quantised_from_file(path, images):
    """The exact 8-bit σ = 0 logits of the model file as written (tensors and ranges)."""
    header, blob, metadata = read_model(path)
    arch = json.loads(metadata["cimsweep.arch"])
    model = cim_reference.ResNetCifar(arch["depth"], arch["kernel"], arch["width"],
                                      in_channels=arch["in_channels"],
                                      num_classes=arch["num_classes"], shortcut=arch["shortcut"])
    tensors = {name: torch.from_numpy(np.frombuffer(
        blob[info["data_offsets"][0]:info["data_offsets"][1]], dtype="<f4").reshape(info["shape"]
                                                                                  ).copy())
        for name, info in header.items()}
    if "conv1.bias" in tensors:
        import_torch.set_stem(model, tensors["conv1.weight"].double(), tensors["conv1.bias"])
        model.float()
    model.load_state_dict(tensors, strict=False)
    missing = set(model.state_dict()) - set(tensors) - {n for n in model.state_dict()
                                                        if n.endswith("num_batches_tracked")}
    assert not missing, f"the file lacks {missing}"
    ranges = json.loads(metadata["cimsweep.input_ranges"])
    return cim_reference.quantised_digital_forward(model, images, ranges)[-1]


def check_layout(binary, work, block, head, generator):
    pool = torch.from_numpy(generator.integers(0, 256, size=(160, 3, SIZE, SIZE), dtype=np.uint8))
    torch.manual_seed(SEED + len(head))
    net = CheckpointNet(block, head).eval()
    # A random network favours a class or two; centring each logit over the pool with the head's
    # bias lets every class win on some images (the test set needs each class folder).
    with torch.no_grad():
        getattr(net, head).bias -= net(pool.float() / 255.0).mean(0)
    checkpoint = os.path.join(work, f"{head}.th")
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()},
                "best_prec1": 0.0}, checkpoint)
    data = os.path.join(work, f"data-{head}")
    train = torch.from_numpy(generator.integers(0, 256, size=(48, 3, SIZE, SIZE), dtype=np.uint8))
    write_split(data, "train", train, [i % 4 for i in range(len(train))])
    # Percentile 100: the random test images then stay inside the ranges almost everywhere, and
    # what remains of the difference is the 8-bit rounding of weights and inputs.
    model = os.path.join(work, f"{head}.safetensors")
    # In this process: a second PyTorch start-up per layout would double the test's time.
    import_torch.main([checkpoint, "--data", data, "--out", model, "--mean",
                       ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)),
                       "--calibration-images", "40", "--percentile", "100"])

    with torch.no_grad():
        reference = net(pool.float() / 255.0).double().numpy()
    quantised = quantised_from_file(model, pool)
    # The scale of the quantised logits without the head's bias (added exactly after the
    # quantised sum): 8-bit rounding errs by a few per cent of it, a wrong tensor by all of it.
    # Measured: 4.3 % (linear) and 3.0 % (fc) at SEED, at most 7.4 % with SEED = 1 … 5; the seed is
    # fixed, so the 10 % bound cannot flake.
    bias = getattr(net, head).bias.detach().double().numpy()
    scale = np.abs(quantised - bias).max()
    error = np.abs(reference - quantised).max()
    assert scale > 0.1, f"{head}: quantised logits are all near zero ({scale})"
    assert error <= 0.1 * scale, f"{head}: PyTorch and quantised logits differ by {error} " \
                                 f"(quantised logits without bias reach {scale})"
    # Test images: those whose quantised top-2 margin is far above float rounding, so that the
    # simulator's float32 arithmetic cannot flip an argmax.
    ordered = np.sort(quantised, axis=1)
    keep = (ordered[:, -1] - ordered[:, -2]) > 1e-4 * scale
    images, q_labels = pool[keep], quantised[keep].argmax(1)
    f_labels = reference[keep].argmax(1)
    assert len(set(q_labels.tolist())) == len(CLASSES), "some class is never predicted"
    write_split(data, "test", images, q_labels.tolist())
    assert eval_accuracy(binary, model, data) == 100.0, f"{head}: cimsweep's logits are not the " \
                                                        "quantised model's"
    for name in CLASSES:
        for file in os.listdir(os.path.join(data, "test", name)):
            os.unlink(os.path.join(data, "test", name, file))
    write_split(data, "test", images, f_labels.tolist())
    agree = 100.0 * float((q_labels == f_labels).mean())
    measured = eval_accuracy(binary, model, data)
    assert abs(measured - agree) < 1e-9, f"{head}: cimsweep {measured} % vs {agree} %"
    assert agree >= 75.0, f"{head}: only {agree} % of the argmaxes survive 8 bits"
    print(f"{head}: PyTorch vs 8-bit logits max |Δ| {error:.3g} of {scale:.3g}; cimsweep eval "
          f"= quantised model on {len(images)} images (100 %), agrees with PyTorch on {agree:.2f} %")


def check_fold_away_from_border():
    torch.manual_seed(SEED)
    net = CheckpointNet(IdelbayevBlock, "linear").double().eval()
    model = cim_reference.ResNetCifar(8, 3, 4, in_channels=3, num_classes=4).double()
    model.conv1.weight.data.copy_(net.conv1.weight.data)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    import_torch.fold_normalisation(model, mean, std)
    pixels = torch.rand(5, 3, SIZE, SIZE, dtype=torch.float64)
    normalised = (pixels - torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)) / \
        torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = net.conv1(normalised)[:, :, 1:-1, 1:-1]
        folded = model.conv1(pixels)[:, :, 1:-1, 1:-1]
    assert (expected - folded).abs().max() < 1e-12, "the fold is wrong"
    print("fold: conv1 of normalised pixels = folded conv1 of pixels away from the border")


def check_unmappable(work):
    torch.manual_seed(SEED)
    state = CheckpointNet(IdelbayevBlock, "linear").state_dict()
    state["layer2.0.se.fc.weight"] = torch.zeros(2, 8)
    checkpoint = os.path.join(work, "se.th")
    torch.save(state, checkpoint)
    result = subprocess.run([sys.executable, os.path.join(SOURCE, "tools", "import_torch.py"),
                             checkpoint, "--data", work, "--out", os.path.join(work, "x.st")],
                            capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "'layer2.0.se.fc.weight'" in lines[0], lines[0]
    assert not os.path.exists(os.path.join(work, "x.st"))
    print(f"refused: {lines[0]}")


def main():
    binary = sys.argv[1]
    generator = np.random.default_rng(SEED)
    torch.set_num_threads(1)
    check_fold_away_from_border()
    with tempfile.TemporaryDirectory() as work:
        check_unmappable(work)
        check_layout(binary, work, IdelbayevBlock, "linear", generator)
        check_layout(binary, work, TorchvisionBlock, "fc", generator)
    print("all passed")


if __name__ == "__main__":
    main()
