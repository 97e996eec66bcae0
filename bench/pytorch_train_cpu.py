"""PyTorch's side of bench_train_cpu: training steps of the same ResNet, batch and fake quantisers.

Run by bench_train_cpu (one process per network and precision) with Debian's /usr/bin/python3;
prints one JSON line {"images_per_second": …, "seconds_per_step": …} or, when the precision is
not supported on this CPU, {"unsupported": "why"}. The network is tools/cim_reference.ResNetCifar
in channels-last, the quantisers tools/train_cifar_qat.QuantisedLayers (8-bit max-abs weights and
8-bit inputs, straight-through) with the ranges bench_train_cpu gives its own engine (1 for conv1,
4 elsewhere), random images and labels, SGD with momentum; bf16 is autocast with fp32 master
weights, as tools/train_cifar_qat.py trains.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import cim_reference  # noqa: E402
from train_cifar_qat import QuantisedLayers, cpu_has_bf16  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, required=True)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    if args.precision == "bf16" and not cpu_has_bf16():
        print(json.dumps({"unsupported": "this CPU has no AVX-512 BF16 or AMX"}))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    model = cim_reference.ResNetCifar(args.depth, 3, args.width, in_channels=args.channels,
                                      num_classes=10).to(memory_format=torch.channels_last)
    quantisers = QuantisedLayers(model, 8, 8)
    quantisers.set_ranges({name: (1.0 if name == "conv1" else 4.0)
                           for name, _ in quantisers.layers})
    quantisers.enabled = True
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    images = (torch.randint(0, 256, (args.batch, args.channels, args.size, args.size)).float()
              / 255.0).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            outputs = model(images)
        loss = F.cross_entropy(outputs[-1].float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up, as bench_train_cpu's own engine
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    print(json.dumps({"images_per_second": args.batch / seconds, "seconds_per_step": seconds,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
