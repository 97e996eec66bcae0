"""One CIM layer at σ > 0 through tools/cim_reference.py, for tests/test_cim_reference.cpp.

Usage: /usr/bin/python3 tests/python/cim_layer_golden.py DIR. DIR/cases.json lists the cases the
C++ test wrote (layer shape, CIM options, σ, the raw little-endian float32 files of the weights,
bias, input batch and every cell's z); for each case NAME this writes NAME.reference.f32 (y as
cim_reference.cim_layer_forward computes it), for a `cycle` case NAME.slack.f64 (how far a
different float32 summation order of the partial sums can move each y), and DIR/summary.json
(per case: the conductances clamped at zero, the calibrated ADC's full scale, and for a `cycle`
case the ADC conversions that a reordered float32 sum could move by a code).
Exit 77 when this Python has no numpy/torch (cim_reference imports torch).
"""

import json
import math
import os
import sys

try:
    import numpy as np
    import torch  # noqa: F401  (cim_reference needs it)
except ImportError:
    print("skipped: /usr/bin/python3 has no torch/numpy (Debian python3-torch python3-numpy)")
    sys.exit(77)

SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(SOURCE, "tools"))
import cim_reference  # noqa: E402

# A float32 sum of n terms in another order differs by at most (n − 1)·2^−24·Σ|terms|
# (Higham, Accuracy and Stability, §4.2); twice that, for n up to the layer's rows.
def gemm_error(rows):
    return 2.0 * rows * 2.0 ** -24


def main(directory):
    with open(os.path.join(directory, "cases.json")) as file:
        cases = json.load(file)

    def array(name, shape):
        return np.fromfile(os.path.join(directory, name), dtype="<f4").reshape(shape)

    summary = {}
    for case in cases:
        layer = case["layer"]
        shape = (layer["out"], layer["in"], layer["kernel"], layer["kernel"])
        weight = array(layer["weight"], shape)
        bias = array(layer["bias"], (layer["out"],))
        x = array(case["input"], case["input_shape"])
        options = dict(weight_bits=case["weight_bits"], cell_bits=case["cell_bits"],
                       input_bits=case["input_bits"], rows=case["rows"],
                       onoff=math.inf if case["onoff"] == "inf" else float(case["onoff"]),
                       mapping=case["mapping"], stride=layer["stride"], pad=layer["pad"])
        full_scale = cim_reference.calibrated_full_scale(weight, layer["a_max"], x, **options)
        cells = case["weight_bits"] // case["cell_bits"]
        draws = case["input_bits"] if case["variation"] == "cycle" else 1
        rows = layer["in"] * layer["kernel"] ** 2
        weight_z = array(case["weight_z"], (draws, layer["out"], rows, cells))
        reference_z = (array(case["reference_z"], (draws, rows, cells))
                       if case["reference_variation"] else None)
        result = cim_reference.cim_layer_forward(
            weight, bias, layer["a_max"], x, case["sigma"], weight_z, reference_z,
            adc=case["adc"], adc_bits=case["adc_bits"], full_scale=full_scale,
            clamp_at_zero=case["clamp_at_zero"], neurosim_scale=case["neurosim_scale"],
            partial_sum_error=gemm_error(case["rows"]) if draws > 1 else 0.0, **options)
        result[0].astype("<f4").tofile(os.path.join(directory, case["name"] + ".reference.f32"))
        if draws > 1:
            result[2].astype("<f8").tofile(os.path.join(directory, case["name"] + ".slack.f64"))
        summary[case["name"]] = {"clamped": result[1], "full_scale": full_scale,
                                 "possible_flips": result[3] if draws > 1 else 0}
    with open(os.path.join(directory, "summary.json"), "w") as file:
        json.dump(summary, file)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: cim_layer_golden.py DIR (a directory holding cases.json)")
    main(sys.argv[1])
