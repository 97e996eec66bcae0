"""Tests of tools/train_cifar_qat.py (the model zoo's PyTorch QAT trainer) against cimsweep itself.

Run by ctest: /usr/bin/python3 tests/python/test_train_cifar_qat.py CIMSWEEP_BINARY. Exit 77 (a
skip) when this Python has no torch. On a tiny generated image folder (BMP files, 4 classes) it
checks that
0. tools/cim_reference.py's σ = 0 logits are cimsweep's bit for bit: on a random ResNet-8 with
   exits, `cimsweep eval --sigma 0 --adc ideal --predictions` writes the reference's float32 logits
   exactly, for the clean (digital) run and the CIM trial (a float64 digital remainder, the
   reference before this test, misses by ~1e-7 and once flipped one CIFAR-10 test image);
1. the training quantisers are the evaluator's: the trainer's quantised forward gives the exact
   σ = 0 reference logits of tools/cim_reference.py (both in float64) up to rounding;
2. a run stopped after epoch 1 and resumed writes the same tensors and ranges as an uninterrupted
   run;
3. the 8-bit accuracy the trainer writes into the model's provenance is what
   `cimsweep eval MODEL --sigma 0 --adc ideal` prints on the same test folder;
4. --precision bf16 is refused in one line on a CPU without bf16 instructions.
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
except ImportError:
    print("skipped: /usr/bin/python3 has no torch/numpy (Debian python3-torch python3-numpy)")
    sys.exit(77)

SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(SOURCE, "tools"))
import cim_reference  # noqa: E402
import train_cifar_qat  # noqa: E402

SEED = 20261202
CLASSES = ["a-red", "b-green", "c-blue", "d-grey"]


def write_bmp(path, rgb):
    """A 24-bit uncompressed BMP of an [H, W, 3] uint8 array (rows bottom-up, BGR, padded to 4)."""
    height, width, _ = rgb.shape
    row = width * 3 + (-width * 3) % 4
    pixels = bytearray()
    for y in range(height - 1, -1, -1):
        line = rgb[y, :, ::-1].tobytes()
        pixels += line + b"\0" * (row - len(line))
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    with open(path, "wb") as file:
        file.write(header + info + bytes(pixels))


def make_folder(root, generator):
    """train/ (32 per class) and test/ (12 per class) of 32×32 images: a class colour plus noise."""
    for split, count in (("train", 32), ("test", 12)):
        for label, name in enumerate(CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for i in range(count):
                base = np.full((32, 32, 3), 60.0)
                if label < 3:
                    base[:, :, label] = 100.0  # a faint cue: accuracy well inside (0, 1)
                noisy = base + generator.normal(0, 60, size=base.shape)
                write_bmp(os.path.join(folder, f"{i:03d}.bmp"),
                          noisy.clip(0, 255).astype(np.uint8))


def train(data, checkpoint, out, *extra):
    args = ["--data", data, "--depth", "8", "--epochs", "2", "--batch", "32", "--lr", "0.05",
            "--threads", "1", "--seed", "3", "--checkpoint-dir", checkpoint, "--out", out,
            *extra]
    result = subprocess.run([sys.executable, os.path.join(SOURCE, "tools", "train_cifar_qat.py"),
                             *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}): {result.stderr}")
    return result


def read_model(path):
    with open(path, "rb") as file:
        blob = file.read()
    length = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + length])
    metadata = header.pop("__metadata__")
    return header, blob[8 + length:], metadata


def randomise_batch_norm(model):
    """Non-trivial BN statistics and affine parameters, as after training."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.3)


def check_quantisers_match_reference(generator):
    torch.manual_seed(SEED)
    model = cim_reference.ResNetCifar(8, 3, 8, in_channels=3, num_classes=4, exits=[1])
    randomise_batch_norm(model)
    images = torch.from_numpy(generator.integers(0, 256, size=(33, 3, 32, 32), dtype=np.uint8))
    # Ranges that float32 holds exactly: the reference reads them as float32 (as cimsweep does),
    # the trainer's quantisers as Python floats.
    ranges = {name: float(np.float32(value)) for name, value in
              cim_reference.calibrate_input_ranges(model, images, percentile=99.9).items()}
    reference = cim_reference.quantised_digital_forward(model, images, ranges,
                                                        remainder=torch.float64)
    # The trainer's forward in float64, so that its formulas meet the reference's exactly; in
    # training (float32) a value within rounding of a level boundary may round the other way.
    model = model.double()
    quantisers = train_cifar_qat.QuantisedLayers(model, 8, 8)
    quantisers.set_ranges(ranges)
    quantisers.enabled = True
    model.eval()
    with torch.no_grad():
        trained = model(images.double() / 255.0)
    for head, (ours, exact) in enumerate(zip(trained, reference)):
        error = np.abs(ours.double().numpy() - exact).max()
        scale = np.abs(exact).max()
        assert scale > 0.1, f"head {head}: reference logits are all near zero ({scale})"
        # Same formulas, both float64: only the summation order of the convolutions differs
        # (integers, exact) and the rescaling (≤ 1e-15); one input level off is ≥ 1e-4.
        assert error <= 1e-9 * scale, f"head {head}: trainer's quantised forward differs by {error}"
    print(f"quantisers: trainer's 8-bit forward equals the exact reference (2 heads, 33 images, "
          f"max error {error / scale:.1e} of the logit scale)")


def check_reference_is_cimsweep_bit_for_bit(binary, work, data):
    torch.manual_seed(SEED + 1)
    model = cim_reference.ResNetCifar(8, 3, 8, in_channels=3, num_classes=4, exits=[1]).eval()
    randomise_batch_norm(model)
    images, labels, classes, names = train_cifar_qat.load_image_folder(data, "test",
                                                                       with_names=True)
    # Ranges from a percentile are no float32 values: the reference must round them as cimsweep.
    ranges = cim_reference.calibrate_input_ranges(model, images, percentile=99.9)
    assert any(float(np.float32(v)) != v for v in ranges.values())
    path = os.path.join(work, "random.safetensors")
    cim_reference.save_model(path, model, model.arch((32, 32)), ranges, classes, {})
    model, ranges, _, _ = cim_reference.load_model(path)
    reference = cim_reference.quantised_digital_forward(model, images, ranges)
    in_float64 = cim_reference.quantised_digital_forward(model, images, ranges,
                                                         remainder=torch.float64)
    predictions = os.path.join(work, "predictions.jsonl")
    subprocess.run([binary, "eval", path, "--data", data, "--sigma", "0", "--adc", "ideal",
                    "--batch", "7", "--quiet", "--predictions", predictions],
                   capture_output=True, text=True, check=True)
    with open(predictions) as file:
        lines = [json.loads(line) for line in file]
    assert len(lines) == 2 * len(names), f"{len(lines)} lines for 2 runs of {len(names)} images"
    for line in lines:
        index = line["index"]
        assert line["file"] == names[index] and line["label"] == int(labels[index]), line
        ours = np.array(line["logits"], dtype=np.float64)
        exact = reference[-1][index].astype(np.float64)
        assert np.array_equal(ours, exact), \
            f"run {line['trial']}, image {index}: cimsweep {ours}, reference {exact}"
        assert line["exit_predicted"] == [int(head[index].argmax()) for head in reference], line
    assert np.abs(reference[-1]).max() > 0.1, "logits all near zero"
    gap = np.abs(in_float64[-1] - reference[-1].astype(np.float64)).max()
    assert gap > 0, "a float64 remainder would pass this comparison: the test has no teeth"
    print(f"reference = cimsweep eval --predictions bit for bit ({len(names)} images, clean run "
          f"and trial 0; a float64 remainder differs by {gap:.1e})")


def expect_refused_in_one_line(options, phrase):
    """The trainer with `options` stops before reading anything: exit 2, one stderr line naming
    `phrase`."""
    refused = subprocess.run(
        [sys.executable, os.path.join(SOURCE, "tools", "train_cifar_qat.py"), "--data", ".",
         *options, "--checkpoint-dir", "unused", "--out", "unused"],
        capture_output=True, text=True)
    assert refused.returncode == 2 and phrase in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def main():
    binary = sys.argv[1]
    generator = np.random.default_rng(SEED)
    print(f"seed {SEED}")
    check_quantisers_match_reference(generator)
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "images")
        make_folder(data, generator)
        check_reference_is_cimsweep_bit_for_bit(binary, work, data)

        whole = os.path.join(work, "whole.safetensors")
        train(data, os.path.join(work, "ck-whole"), whole)
        resumed = os.path.join(work, "resumed.safetensors")
        first = train(data, os.path.join(work, "ck-resumed"), resumed, "--stop-after", "1")
        assert not os.path.exists(resumed), "a stopped run wrote its model"
        assert "stopping after 1 epochs" in first.stdout
        # Named explicitly on the resume only: the device is not part of what a checkpoint must
        # match (augmentation and random draws stay on the CPU), and cpu is the default.
        second = train(data, os.path.join(work, "ck-resumed"), resumed, "--device", "cpu")
        assert "resumed from" in second.stdout and "after epoch 1" in second.stdout
        whole_header, whole_data, whole_meta = read_model(whole)
        resumed_header, resumed_data, resumed_meta = read_model(resumed)
        assert whole_header == resumed_header and whole_data == resumed_data, \
            "resumed run's tensors differ from the uninterrupted run's"
        assert whole_meta["cimsweep.input_ranges"] == resumed_meta["cimsweep.input_ranges"]
        print("resume: stopped after epoch 1 and resumed = uninterrupted, byte for byte")

        mismatch = subprocess.run(
            [sys.executable, os.path.join(SOURCE, "tools", "train_cifar_qat.py"), "--data", data,
             "--depth", "8", "--epochs", "3", "--checkpoint-dir", os.path.join(work, "ck-whole"),
             "--out", os.path.join(work, "other.safetensors")], capture_output=True, text=True)
        assert mismatch.returncode == 2 and "other arguments" in mismatch.stderr, mismatch.stderr
        assert len(mismatch.stderr.strip().splitlines()) == 1, mismatch.stderr

        provenance = json.loads(whole_meta["cimsweep.provenance"])
        claimed = provenance["quantised_digital_test_accuracy"]
        assert not provenance["command"].count(work + "/tools"), provenance["command"]
        table = subprocess.run([binary, "eval", whole, "--data", data, "--sigma", "0", "--adc",
                                "ideal", "--no-clean", "--format", "json", "--quiet"],
                               capture_output=True, text=True, check=True).stdout
        rows = json.loads(table)
        assert len(rows) == 1, table
        measured = float(rows[0]["mean"])
        assert abs(measured - 100.0 * claimed) < 1e-9, \
            f"provenance says {100 * claimed:.4f} %, cimsweep eval prints {measured} %"
        assert 0 < measured, "accuracy 0: nothing was learned or evaluated"
        print(f"accuracy: provenance {100 * claimed:.2f} % = cimsweep eval {measured:.2f} %")

    if not train_cifar_qat.cpu_has_bf16():
        expect_refused_in_one_line(["--precision", "bf16"], "bf16")
        print("bf16: refused in one line on this CPU (no AVX-512 BF16 / AMX)")
    if not torch.cuda.is_available():
        expect_refused_in_one_line(["--device", "cuda"], "sees no CUDA GPU")
        print("--device cuda: refused in one line (this torch sees no GPU)")
    print("all passed")


if __name__ == "__main__":
    main()
