"""Writes the golden test files tests/data/golden_<name>.{safetensors,json}.

Each case is a tiny random `resnet-cifar` model with random uint8 images and the quantised digital
(σ = 0, ideal ADC) logits that tools/cim_reference.py computes for them. They are an oracle for the
C++ forward pass written independently of it. The cases cover what a regular network would not
exercise all at once: 3 input channels, kernel 5, an odd non-square input, shortcut B and both early
exits. BN statistics and affine parameters are randomised so that no BN is close to the identity
and a mix-up of mean/var/weight/bias shows in the logits.

Run from anywhere: `/usr/bin/python3 tools/make_golden.py`. Deterministic (fixed seeds).
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cim_reference  # noqa: E402  (a sibling module, found through the path set above)

OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")
IMAGES_PER_CASE = 8
WEIGHT_BITS = 8
INPUT_BITS = 8

CASES = [
    {"name": "resnet8_k3_w4_rgb_shortcutA", "seed": 101, "input_size": (12, 12),
     "model": {"depth": 8, "kernel": 3, "width": 4, "in_channels": 3, "num_classes": 10,
               "shortcut": "A", "exits": []}},
    {"name": "resnet8_k5_w3_11x13_shortcutB_exits", "seed": 202, "input_size": (11, 13),
     "model": {"depth": 8, "kernel": 5, "width": 3, "in_channels": 1, "num_classes": 7,
               "shortcut": "B", "exits": [1, 2]}},
]


def randomise_batch_norms(model, generator):
    """running_mean ~ U(−0.1, 0.1), running_var ~ U(0.5, 1.5), weight ~ U(0.5, 1.5),
    bias ~ U(−0.1, 0.1) for every BN, so that each one changes its input."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.rand(channels, generator=generator) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(channels, generator=generator) * 0.2 - 0.1)


def make_case(case):
    """Builds one case's model, images and logits, and writes its two files."""
    torch.manual_seed(case["seed"])  # the modules' default initialisation draws from it
    generator = torch.Generator().manual_seed(case["seed"])
    model = cim_reference.ResNetCifar(**case["model"])
    with torch.no_grad():
        randomise_batch_norms(model, generator)
    model.eval()

    height, width = case["input_size"]
    channels = case["model"]["in_channels"]
    images = torch.randint(0, 256, (IMAGES_PER_CASE, channels, height, width),
                           dtype=torch.uint8, generator=generator)
    input_ranges = cim_reference.calibrate_input_ranges(model, images, percentile=100)
    logits = cim_reference.quantised_digital_forward(model, images, input_ranges,
                                                     weight_bits=WEIGHT_BITS,
                                                     input_bits=INPUT_BITS)

    stem = os.path.join(OUTPUT_DIR, f"golden_{case['name']}")
    class_names = [f"class{index}" for index in range(case["model"]["num_classes"])]
    provenance = {"made_by": "tools/make_golden.py", "seed": case["seed"],
                  "weights": "PyTorch default initialisation, BN randomised",
                  "input_ranges": "maximum of each layer's input over the golden images, "
                                  "conv1 = 1.0"}
    cim_reference.save_model(f"{stem}.safetensors", model, model.arch((height, width)),
                             input_ranges, class_names, provenance)

    golden = {
        "description": "quantised digital (σ=0, ADC ideal) logits from tools/cim_reference.py",
        "model": os.path.basename(f"{stem}.safetensors"),
        "height": height,
        "width": width,
        "channels": channels,
        "weight_bits": WEIGHT_BITS,
        "input_bits": INPUT_BITS,
        "outputs": [f"exit{e}" for e in case["model"]["exits"]] + ["final"],
        "images": [image.reshape(-1).tolist() for image in images],
        "logits": [exit_logits.tolist() for exit_logits in logits],
    }
    with open(f"{stem}.json", "w", encoding="utf-8") as file:
        json.dump(golden, file, ensure_ascii=False)
        file.write("\n")
    return stem


def main():
    os.makedirs(OUTPUT_DIR, exist_ok=True)
    torch.set_num_threads(1)
    for case in CASES:
        stem = make_case(case)
        for suffix in (".safetensors", ".json"):
            path = os.path.relpath(stem + suffix)
            print(f"wrote {path} ({os.path.getsize(stem + suffix)} bytes)")


if __name__ == "__main__":
    main()
