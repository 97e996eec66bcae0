"""Per-image σ = 0, ideal-ADC predictions of a model file by the Python reference, and their
comparison with `cimsweep eval … --predictions FILE`.

    /usr/bin/python3 tools/reference_predictions.py MODEL --data ROOT [--split test] [--out FILE]
        [--compare CIMSWEEP_PREDICTIONS] [--remainder float32|float64] [--threads N]

MODEL is a `resnet-cifar` model file, ROOT an image folder holding `<split>/<class>/<image>`
(decoded by stb_image, as cimsweep does). The logits are `cim_reference.quantised_digital_forward`'s
(the contract: float32 digital remainder, bit for bit cimsweep's; `--remainder float64` keeps every
value in float64, which is not what cimsweep computes). Prints the accuracy and the images with the
smallest top-2 logit margins; `--out` writes one JSON line per image in the format of cimsweep's
--predictions (trial -1, as its clean row); `--compare` reads cimsweep's file and prints, for each
of its runs (clean, trial t), the images whose predicted class differs and the largest logit
difference. Exit status 1 when any prediction differs.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cim_reference  # noqa: E402
import train_cifar_qat  # noqa: E402  (its image-folder reader decodes with stb, as cimsweep)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="image folder root holding <split>/")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", help="write the predictions here (JSON Lines)")
    parser.add_argument("--compare", help="cimsweep eval --predictions file to compare with")
    parser.add_argument("--remainder", choices=["float32", "float64"], default="float32")
    parser.add_argument("--margins", type=int, default=5, help="smallest margins to print")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def prediction_lines(logits, labels, names):
    """One JSON object per image: cimsweep's --predictions fields for its clean row."""
    final = logits[-1]
    for index, name in enumerate(names):
        line = {"sigma": 0.0, "trial": -1, "index": index, "file": name,
                "label": int(labels[index]), "predicted": int(final[index].argmax()),
                "logits": [float(v) for v in final[index]]}
        if len(logits) > 1:
            line["exit_predicted"] = [int(head[index].argmax()) for head in logits]
        yield line


def compare(reference, path):
    """Prints every run of cimsweep's file against the reference lines; True when all agree."""
    runs = {}
    with open(path) as file:
        for text in file:
            line = json.loads(text)
            runs.setdefault((line["sigma"], line["trial"]), []).append(line)
    by_index = {line["index"]: line for line in reference}
    agree = True
    for (sigma, trial), lines in sorted(runs.items(), key=lambda item: item[0][1]):
        what = "clean" if trial < 0 else f"sigma {sigma:g} trial {trial}"
        differ, worst = [], 0.0
        for line in lines:
            ours = by_index.get(line["index"])
            if ours is None or ours["file"] != line["file"] or ours["label"] != line["label"]:
                print(f"{what}: image {line['index']} ({line['file']}) is not the reference's "
                      "image: compare files of the same data set and --limit")
                return False
            if ours["predicted"] != line["predicted"]:
                differ.append((line, ours))
            if "logits" in line:
                worst = max(worst, float(np.abs(np.array(line["logits"], dtype=np.float64)
                                                - np.array(ours["logits"])).max()))
        print(f"{what}: {len(lines)} images, {len(differ)} predicted differently, largest logit "
              f"difference {worst:.3g}")
        for line, ours in differ:
            print(f"  image {line['index']} ({line['file']}, label {line['label']}): cimsweep "
                  f"{line['predicted']}, reference {ours['predicted']}")
        agree = agree and not differ
    return agree


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, ranges, _, _ = cim_reference.load_model(args.model)
    images, labels, _, names = train_cifar_qat.load_image_folder(args.data, args.split,
                                                                 with_names=True)
    remainder = torch.float32 if args.remainder == "float32" else torch.float64
    logits = cim_reference.quantised_digital_forward(model, images, ranges, remainder=remainder)
    final = logits[-1].astype(np.float64)
    correct = int((final.argmax(1) == labels.numpy()).sum())
    print(f"{args.model} on {os.path.join(args.data, args.split)}: {correct} of {len(names)} "
          f"correct ({100.0 * correct / len(names):.2f} %), digital remainder {args.remainder}")
    top2 = np.sort(final, axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    for index in np.argsort(margins, kind="stable")[:args.margins]:
        print(f"  margin {margins[index]:.3g}: image {index} ({names[index]}), label "
              f"{int(labels[index])}, predicted {int(final[index].argmax())}")
    reference = list(prediction_lines(logits, labels, names))
    if args.out:
        with open(args.out, "w") as file:
            for line in reference:
                file.write(json.dumps(line) + "\n")
    if args.compare and not compare(reference, args.compare):
        sys.exit(1)


if __name__ == "__main__":
    main()
