"""Tests of `cimsweep plot` (host/plot_command.cpp + tools/plot_results.py).

Run by ctest: /usr/bin/python3 tests/python/test_plot.py CIMSWEEP_BINARY. Exit 77 (a skip) when
this Python has no matplotlib. On a results file generated here (two models, one with three exits
and an entropy grid, one cell below 3 chips) it checks that
1. the PNG renders at exactly the requested size and is not blank; SVG and PDF are written too;
2. bad input is one line on stderr, exit 2, and leaves no figure: a missing or corrupt results
   file, an unknown extension, an output that is an input or an existing non-figure file;
3. an existing figure is replaced in one step (never a half-written file under the name).
"""

import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib

try:
    import matplotlib  # noqa: F401
except ImportError:
    print("skipped: /usr/bin/python3 has no matplotlib (Debian python3-matplotlib)")
    sys.exit(77)


def record(model, sigma, trial, accuracy, exits=None, grid=None):
    line = {"model": model, "config_hash": "00000000000000" + ("01" if model == "a" else "02"),
            "sigma": sigma, "trial": trial, "images": 400, "correct": int(4 * accuracy),
            "accuracy": accuracy, "seconds": 0.5,
            "extra": {"backend": "cpu", "data": "generated", "cim": "8-bit weights"}}
    if exits:
        line["exit_accuracy"] = exits
    if grid:
        line["extra"]["entropy_grid"] = grid
    return json.dumps(line)


def results_lines():
    lines = [record("a", 0.0, -1, 95.0, [80.0, 90.0, 95.0]), record("b", 0.0, -1, 92.0)]
    for sigma, base in ((0.0, 94.0), (0.05, 85.0), (0.1, 60.0)):
        for trial in range(4):
            accuracy = base - 2.0 * trial
            grid = {"thresholds": [0.0, 1.0, 2.3], "accuracy": [accuracy, accuracy - 5, 40.0],
                    "macs_per_image": [4.0e7, 2.5e7, 1.0e7]}
            lines.append(record("a", sigma, trial, accuracy, [accuracy - 20, accuracy - 8, accuracy],
                                grid))
    for sigma, chips in ((0.0, 3), (0.1, 2)):  # σ = 0.1 with 2 chips: no interval, no band
        for trial in range(chips):
            lines.append(record("b", sigma, trial, 90.0 - 30 * sigma - trial))
    return "\n".join(lines) + "\n"


def png_size(path):
    with open(path, "rb") as file:
        head = file.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def png_distinct_rows(path):
    """How many distinct pixel rows the image has (a blank figure has one)."""
    with open(path, "rb") as file:
        blob = file.read()
    width, height = png_size(path)
    position, data = 8, b""
    while position < len(blob):
        length, kind = struct.unpack(">I4s", blob[position:position + 8])
        if kind == b"IDAT":
            data += blob[position + 8:position + 8 + length]
        position += 12 + length
    raw = zlib.decompress(data)
    stride = len(raw) // height
    return len({raw[y * stride + 1:(y + 1) * stride] for y in range(height)})


def plot(binary, *args):
    return subprocess.run([binary, "plot", *args], capture_output=True, text=True)


def expect_refused(binary, expected, *args, absent=None):
    result = plot(binary, *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"{args}: exit {result.returncode}, {result.stderr}"
    assert len(lines) == 1 and lines[0].startswith("cimsweep: error: "), result.stderr
    assert expected in lines[0], f"{args}: {lines[0]!r} does not say {expected!r}"
    assert result.stdout == "", result.stdout
    if absent:
        assert not os.path.exists(absent), f"{absent} was written although the input was bad"
    print(f"refused: {lines[0]}")


def main():
    binary = sys.argv[1]
    with tempfile.TemporaryDirectory() as work:
        results = os.path.join(work, "r.jsonl")
        with open(results, "w") as file:
            file.write(results_lines())

        figure = os.path.join(work, "fig.png")
        done = plot(binary, results, "-o", figure, "--width", "900", "--height", "500")
        assert done.returncode == 0, done.stderr
        assert png_size(figure) == (900, 500), png_size(figure)
        assert os.path.getsize(figure) > 10000, os.path.getsize(figure)
        assert png_distinct_rows(figure) > 100, "the figure is (nearly) blank"
        print(f"png: 900×500, {os.path.getsize(figure)} bytes, "
              f"{png_distinct_rows(figure)} distinct rows")
        assert not [name for name in os.listdir(work) if name.startswith(".plot-")], \
            "a temporary file was left behind"

        for extension, magic in ((".svg", b"<?xml"), (".pdf", b"%PDF")):
            path = os.path.join(work, "fig" + extension)
            done = plot(binary, results, "-o", path)
            assert done.returncode == 0, done.stderr
            with open(path, "rb") as file:
                assert file.read(len(magic)) == magic, f"{path} is not {extension}"
        with open(os.path.join(work, "fig.svg")) as file:
            svg = file.read()
        for text in ("conductance variation", "accuracy (%)", "MACs per image", "clean",
                     "exit 1", "400 images per chip"):
            assert text in svg, f"the figure does not show {text!r}"
        print("svg, pdf: written; axis names, legend, frontier and caption present")

        # Replacing an existing figure of the same format is allowed, in one rename.
        before = os.stat(figure).st_ino
        done = plot(binary, results, "-o", figure, "--width", "640", "--height", "480")
        assert done.returncode == 0 and png_size(figure) == (640, 480), done.stderr
        assert os.stat(figure).st_ino != before, "the figure was rewritten in place, not renamed"

        corrupt = os.path.join(work, "corrupt.jsonl")
        with open(corrupt, "w") as file:
            file.write(results_lines().replace('"sigma": 0.05', '"sigma": "x"', 1))
        notes = os.path.join(work, "notes.png")
        with open(notes, "w") as file:
            file.write("my notes, not a figure\n")
        out = os.path.join(work, "new.png")
        expect_refused(binary, "does not exist", os.path.join(work, "nope.jsonl"), "-o", out,
                       absent=out)
        expect_refused(binary, "sigma", corrupt, "-o", out, absent=out)
        expect_refused(binary, "not .png, .svg or .pdf", results, "-o",
                       os.path.join(work, "fig.jpg"), absent=os.path.join(work, "fig.jpg"))
        expect_refused(binary, "not a png figure", results, "-o", notes)
        with open(notes) as file:
            assert file.read() == "my notes, not a figure\n", "a non-figure file was replaced"
        expect_refused(binary, "does not exist", results, "-o",
                       os.path.join(work, "no-dir", "f.png"))
        expect_refused(binary, "out of range", results, "-o", out, "--width", "5", absent=out)
        empty = os.path.join(work, "clean-only.jsonl")
        with open(empty, "w") as file:
            file.write(results_lines().splitlines()[0] + "\n")
        expect_refused(binary, "nothing to plot", empty, "-o", out, absent=out)
    print("all passed")


if __name__ == "__main__":
    main()
