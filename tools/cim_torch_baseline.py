"""A vectorised PyTorch implementation of one CIM layer (docs/cim-model.md §1–§5), as a baseline.

What a competent PyTorch user would write for the same math as cimsweep's backends: weights
quantised and sliced into cells, inputs quantised and im2col'ed with `F.unfold`, every input bit
and cell slice of a sub-array handled at once by one `einsum`, the dynamic ADC's ranges by
`amin`/`amax` over the batch, shift-and-add by a weighted sum. Only the loop over sub-arrays is
left in Python.

Two uses:

* `--check DUMP.json` compares it with the CPU backend on a small conv layer at σ = 0, where both
  must agree to float rounding (partial sums are exact integers, so every ADC code is the same).
  Write the dump with `build/bench/bench_cim_cuda --dump-layer DUMP.json`.
* `--bench` times the CIM layers of a ResNet-20/56/110 (CIFAR shapes, random weights, σ > 0 device
  variation, ADC dynamic, batch 500) on the GPU, to put bench_cim_cuda's images/s in context.
  Its noise is torch.randn, not cimsweep's Philox stream: the same statistics, not the same chip.

Usage:
    python3 tools/cim_torch_baseline.py --check /tmp/dump.json
    python3 tools/cim_torch_baseline.py --bench --depth 20 56 110 --batch 500 --device cuda
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F


def weight_levels(weight, weight_bits):
    """§1, mode maxabs: D = round((2^wb − 1)/2 · (W/max|W| + 1)), ties to even as the CPU's rint."""
    scale = weight.abs().max()
    w_hat = (weight / scale).to(torch.float64)  # the float32 quotient, as the CPU computes it
    top = 2**weight_bits - 1
    levels = torch.round(0.5 * top * (w_hat + 1.0)).clamp(0, top).to(torch.int64)
    return levels, float(scale)


def input_levels(x, a_max, input_bits):
    """§3: A = round((2^ab − 1)·clip(a, 0, a_max)/a_max)."""
    clipped = x.to(torch.float64).clamp(0.0, float(a_max))
    return torch.round((2**input_bits - 1) * clipped / float(a_max)).to(torch.int64)


def subarrays(in_channels, kernel, rows_per_subarray, mapping):
    """§4: lists of logical rows (c, i, j) per sub-array, as cimsweep maps them."""
    taps = kernel * kernel
    if mapping == "kernel":
        return [
            [c * taps + tap for c in range(c0, min(in_channels, c0 + rows_per_subarray))]
            for tap in range(taps)
            for c0 in range(0, in_channels, rows_per_subarray)
        ]
    rows = in_channels * taps
    return [list(range(r0, min(rows, r0 + rows_per_subarray))) for r0 in range(0, rows, rows_per_subarray)]


def adc(values, mode, adc_bits, full_scale=None, dims=None):
    """§4: ADC `dynamic` over `dims` (the whole read), `fixed` over [0, full_scale], or `ideal`."""
    if mode == "ideal":
        return values
    top = 2**adc_bits - 1
    if mode == "fixed":
        step = full_scale / top
        return torch.clamp(torch.round(values / step), 0, top) * step
    lo = values.amin(dim=dims, keepdim=True)
    hi = values.amax(dim=dims, keepdim=True)
    span = hi - lo
    step = span / 2**adc_bits
    safe = torch.where(span > 0, step, torch.ones_like(step))
    codes = torch.clamp(torch.floor((values - lo) / safe), 0, top)
    return torch.where(span > 0, lo + codes * step, values)


def cim_conv2d(x, weight, bias, a_max, stride=1, pad=0, weight_bits=8, cell_bits=4, input_bits=8,
               rows_per_subarray=128, onoff=10.0, adc_mode="dynamic", adc_bits=10, mapping="kernel",
               sigma=0.0, generator=None, dtype=torch.float64):
    """One CIM conv layer: x [n, C, h, w] → y [n, out, oh, ow] (bias included)."""
    out_channels, in_channels, kernel, _ = weight.shape
    slices = weight_bits // cell_bits
    cell_top = 2**cell_bits - 1
    inv_onoff = 0.0 if math.isinf(onoff) else 1.0 / onoff
    g_ref = cell_top * (1 + inv_onoff) / 2
    gain = 2 / (1 - inv_onoff)

    levels, scale = weight_levels(weight, weight_bits)
    levels = levels.reshape(out_channels, -1)  # [out, rows], rows = (c, i, j)
    shifts = torch.arange(slices, device=x.device) * cell_bits
    cells = (levels[None] >> shifts[:, None, None]) & cell_top  # [slices, out, rows]
    conductance = (1 - inv_onoff) * cells.to(dtype) + cell_top * inv_onoff
    if sigma > 0:
        z = torch.randn(conductance.shape, generator=generator, device=x.device, dtype=dtype)
        conductance = conductance * (1 + sigma * z)

    a = input_levels(x, a_max, input_bits)
    n, _, h, w = x.shape
    oh = (h + 2 * pad - kernel) // stride + 1
    ow = (w + 2 * pad - kernel) // stride + 1
    columns = F.unfold(a.to(dtype), kernel, padding=pad, stride=stride)  # [n, rows, oh·ow]
    columns = columns.permute(1, 0, 2).reshape(columns.shape[1], -1).to(torch.int64)  # [rows, q]
    bits = torch.arange(input_bits, device=x.device)
    planes = ((columns[None] >> bits[:, None, None]) & 1).to(dtype)  # [ab, rows, q]
    place = 2.0 ** (bits[:, None].to(dtype) + cell_bits * torch.arange(slices, device=x.device).to(dtype))

    acc = torch.zeros(out_channels, columns.shape[1], dtype=dtype, device=x.device)
    for rows in subarrays(in_channels, kernel, rows_per_subarray, mapping):
        index = torch.tensor(rows, device=x.device)
        b = planes[:, index]  # [ab, width, q]
        count = b.sum(dim=1)  # [ab, q]: Σ b per read
        if sigma == 0:  # §7: exact integer sums, then one scaling
            dot = torch.einsum("mor,trq->tmoq", cells[:, :, index].to(dtype), b)
            partial = (1 - inv_onoff) * dot + (cell_top * inv_onoff) * count[:, None, None]
        else:
            partial = torch.einsum("mor,trq->tmoq", conductance[:, :, index], b)  # [ab, slices, out, q]
        reference = (g_ref * count)[:, None, None, :].expand(-1, slices, 1, -1)
        full_scale = len(rows) * cell_top
        q_partial = adc(partial, adc_mode, adc_bits, full_scale, dims=(2, 3))
        q_reference = adc(reference, adc_mode, adc_bits, full_scale, dims=(2, 3))
        acc += torch.einsum("tm,tmoq->oq", place * gain, q_partial - q_reference)

    output_scale = scale * float(a_max) / ((2**weight_bits - 1) * (2**input_bits - 1))
    y = output_scale * acc + (bias.to(dtype)[:, None] if bias is not None else 0.0)
    return y.reshape(out_channels, n, oh, ow).permute(1, 0, 2, 3).to(torch.float32)


def check(dump_path, device):
    with open(dump_path) as f:
        dump = json.load(f)
    cin, cout, k = dump["in_channels"], dump["out_channels"], dump["kernel"]
    n, h, w = dump["n"], dump["h"], dump["w"]
    weight = torch.tensor(dump["weight"], dtype=torch.float32, device=device).reshape(cout, cin, k, k)
    bias = torch.tensor(dump["bias"], dtype=torch.float32, device=device)
    x = torch.tensor(dump["input"], dtype=torch.float32, device=device).reshape(n, cin, h, w)
    failures = 0
    for case in dump["cases"]:
        cfg = case["config"]
        onoff = cfg["onoff_ratio"]
        y = cim_conv2d(x, weight, bias, dump["input_range"], stride=dump["stride"], pad=dump["pad"],
                       weight_bits=cfg["weight_bits"], cell_bits=cfg["cell_bits"],
                       input_bits=cfg["input_bits"], rows_per_subarray=cfg["subarray_rows"],
                       onoff=math.inf if onoff == "inf" else float(onoff), adc_mode=cfg["adc"],
                       adc_bits=cfg["adc_bits"], mapping=cfg["mapping"], sigma=case["sigma"])
        want = torch.tensor(case["output"], dtype=torch.float32, device=device).reshape(y.shape)
        scale = want.abs().max().item()
        worst = (y - want).abs().max().item()
        ok = worst <= 1e-5 * scale
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} adc {cfg['adc']:8s} mapping {cfg['mapping']:6s} "
              f"rows {cfg['subarray_rows']:4d}: max |torch − cpu| = {worst:.3g} (scale {scale:.3g})")
    print(f"{len(dump['cases']) - failures}/{len(dump['cases'])} cases agree with the CPU backend")
    return failures == 0


def resnet_layers(depth, width=16, classes=10):
    """(in, out, kernel, stride, input size) of every CIM layer of a CIFAR ResNet."""
    layers = [(3, width, 3, 1, 32)]
    channels, size = width, 32
    for stage in range(3):
        out = width << stage
        for block in range((depth - 2) // 6):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append((channels, out, 3, stride, size))
            size //= stride
            layers.append((out, out, 3, 1, size))
            channels = out
    layers.append((channels, classes, 1, 1, 1))  # the FC layer as a 1×1 conv on the pooled map
    return layers


def bench(depths, batch, device, sigma, repeats):
    torch.manual_seed(0)
    generator = torch.Generator(device=device).manual_seed(1)
    for depth in depths:
        layers = resnet_layers(depth)
        macs = sum(cin * cout * k * k * ((size + 2 * (k // 2) - k) // s + 1) ** 2
                   for cin, cout, k, s, size in layers)
        inputs = [torch.rand(batch, cin, size, size, device=device) * 2 for cin, _, _, _, size in layers]
        weights = [torch.randn(cout, cin, k, k, device=device) for cin, cout, k, _, _ in layers]
        best = math.inf
        for rep in range(repeats + 1):  # the first is a warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for (cin, cout, k, s, size), x, wt in zip(layers, inputs, weights):
                cim_conv2d(x, wt, None, 2.0, stride=s, pad=k // 2, sigma=sigma, generator=generator,
                           dtype=torch.float32)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if rep > 0:
                best = min(best, time.perf_counter() - start)
        work = 2 * 8 * 2 * macs  # 2·ab·nc·MACs per image
        print(f"ResNet-{depth}: {macs / 1e6:.1f} MMAC/image; PyTorch CIM layers, batch {batch}, "
              f"σ = {sigma}, ADC dynamic: {batch / best:.0f} images/s "
              f"({work * batch / best / 1e12:.2f} TFLOP/s effective; "
              f"{10000 / (batch / best):.2f} s per 10,000-image trial)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", metavar="DUMP", help="compare with a bench_cim_cuda --dump-layer file")
    parser.add_argument("--bench", action="store_true", help="time ResNet CIM layers")
    parser.add_argument("--depth", type=int, nargs="+", default=[20])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if not args.check and not args.bench:
        parser.error("give --check DUMP and/or --bench")
    ok = True
    if args.check:
        ok = check(args.check, args.device)
    if args.bench:
        bench(args.depth, args.batch, args.device, args.sigma, args.repeats)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
