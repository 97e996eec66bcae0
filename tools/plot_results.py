"""Draws the figure of `cimsweep plot`: accuracy vs σ with 95 % bands, clean accuracy, per-exit
curves and the accuracy–compute frontier of an entropy grid.

Run by `cimsweep plot` (which validates the results files and aggregates them itself, so that the
statistics are cimsweep's, not a second implementation):

    /usr/bin/python3 tools/plot_results.py DOCUMENT.json FIG.{png,svg,pdf} WIDTH HEIGHT

DOCUMENT.json is {"rows": [rows of `--format json`], "frontier": [frontier points], "caption":
"…", "title": "…"}. The figure is WIDTH × HEIGHT pixels at 100 dpi, written to a temporary file
beside FIG and renamed over it, so a reader never sees half a figure. Errors are one line on
stderr and exit code 2 (3: matplotlib is missing).
"""

import json
import math
import os
import sys
import tempfile

DPI = 100


def fail(message, code=2):
    print(f"cimsweep: error: {message}", file=sys.stderr)
    sys.exit(code)


try:
    import matplotlib
    matplotlib.use("Agg")  # no display: the figure goes straight to a file
    import matplotlib.pyplot as plt
except ImportError:
    fail(f"{sys.executable} has no matplotlib: install python3-matplotlib (Debian) or set "
         "CIMSWEEP_PYTHON to a Python that has it", 3)


def number(value):
    return math.nan if value is None else float(value)


def group_by_model(items):
    """{model: [items in σ order]} in first-appearance order of the models."""
    models = {}
    for item in items:
        models.setdefault(item["model"], []).append(item)
    for rows in models.values():
        rows.sort(key=lambda row: row["sigma"])
    return models


def draw_accuracy(axes, rows):
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (model, cells) in enumerate(group_by_model(rows).items()):
        colour = colours[index % len(colours)]
        sigma = [cell["sigma"] for cell in cells]
        mean = [number(cell["mean"]) for cell in cells]
        low = [number(cell["ci_low"]) for cell in cells]
        high = [number(cell["ci_high"]) for cell in cells]
        chips = [cell["trials"] for cell in cells]
        label = f"{model} ({min(chips)}–{max(chips)} chips)" if min(chips) != max(chips) \
            else f"{model} ({chips[0]} chips)"
        axes.plot(sigma, mean, "o-", color=colour, label=label, zorder=3)
        # The band only where there is an interval (cimsweep gives none below 3 chips).
        has_interval = [not math.isnan(v) for v in low]
        axes.fill_between(sigma, low, high, where=has_interval, color=colour, alpha=0.2,
                          linewidth=0, zorder=2)
        # Bars too: a band needs two neighbouring cells with an interval to show at all.
        bars = [i for i, has in enumerate(has_interval) if has]
        axes.errorbar([sigma[i] for i in bars], [mean[i] for i in bars],
                      yerr=[[mean[i] - low[i] for i in bars], [high[i] - mean[i] for i in bars]],
                      fmt="none", ecolor=colour, capsize=3, linewidth=1, zorder=3)
        exits = max(len(cell["exit_accuracy"]) for cell in cells)
        for exit_index in range(exits - 1):  # the last exit is the final head, drawn above
            exit_mean = [number(cell["exit_accuracy"][exit_index]["mean"])
                         if exit_index < len(cell["exit_accuracy"]) else math.nan
                         for cell in cells]
            axes.plot(sigma, exit_mean, ":", marker=".", color=colour, alpha=0.8,
                      label=f"{model}: exit {exit_index + 1}", zorder=3)
        clean = number(cells[0].get("clean_accuracy"))
        if not math.isnan(clean):
            axes.plot([0.0], [clean], marker="*", markersize=13, color=colour,
                      markeredgecolor="black", linestyle="none", zorder=4,
                      label=f"{model}: clean (σ = 0, ideal ADC) {clean:.2f} %")
        capped = [cell for cell in cells if cell.get("hit_cap")]
        if capped:
            axes.plot([cell["sigma"] for cell in capped], [number(cell["mean"]) for cell in capped],
                      marker="o", markersize=12, markerfacecolor="none", color="red",
                      linestyle="none", zorder=5,
                      label=f"{model}: stopped at --max-trials, interval still > "
                            f"±{capped[0]['ci_target']:g}")
    axes.set_xlabel("conductance variation σ (relative, g̃ = g·(1 + σz))")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_ylim(0, 100)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", loc="lower left")
    axes.set_title("accuracy vs σ: mean over chips, 95 % interval of the mean")


def draw_frontier(axes, points):
    curves = {}  # the points come in model order, then σ ascending
    for point in points:
        curves.setdefault((point["model"], point["sigma"]), []).append(point)
    for (model, sigma), curve in curves.items():
        curve.sort(key=lambda p: p["macs_per_image"])
        axes.plot([p["macs_per_image"] / 1e6 for p in curve], [p["mean"] for p in curve],
                  "o-", markersize=4, label=f"{model}, σ = {sigma:g}")
    axes.set_xlabel("CIM MACs per image (millions)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", loc="lower right")
    axes.set_title("accuracy–compute frontier (shared entropy threshold)")


def main():
    if len(sys.argv) != 5:
        fail("usage: plot_results.py DOCUMENT.json FIG.{png,svg,pdf} WIDTH HEIGHT "
             "(run through `cimsweep plot`)")
    document_path, output, width, height = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:5])
    with open(document_path, encoding="utf-8") as file:
        document = json.load(file)
    rows, frontier = document["rows"], document["frontier"]
    if not rows:
        fail("no rows to plot")

    figure = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    panels = 2 if frontier else 1
    grid = figure.add_gridspec(1, panels, left=0.07 if panels == 1 else 0.06, right=0.98,
                               top=0.90 if document.get("title") else 0.93, bottom=0.16,
                               wspace=0.22)
    draw_accuracy(figure.add_subplot(grid[0, 0]), rows)
    if frontier:
        draw_frontier(figure.add_subplot(grid[0, 1]), frontier)
    if document.get("title"):
        figure.suptitle(document["title"])
    figure.text(0.01, 0.015, document.get("caption", ""), fontsize="x-small", wrap=True,
                va="bottom", ha="left")

    extension = os.path.splitext(output)[1].lower()
    directory = os.path.dirname(os.path.abspath(output))
    handle, temp = tempfile.mkstemp(prefix=".plot-", suffix=extension, dir=directory)
    os.close(handle)
    try:
        # No bbox_inches="tight": the file has exactly the requested size.
        figure.savefig(temp, dpi=DPI, format=extension[1:])
        with open(temp, "rb") as file:
            os.fsync(file.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, output)
    except OSError as error:
        os.unlink(temp)
        fail(f"cannot write '{output}': {error.strerror}: check the path and free disk space")
    except BaseException:
        os.unlink(temp)
        raise


if __name__ == "__main__":
    main()
