#!/usr/bin/env python3
"""Writes the fuzz seed corpora in fuzz/corpus/<target>/ (committed; run again after changing it).

Standard library only. Seeds are the smallest valid inputs of each reader plus a few of its edge
cases, so that libFuzzer starts from inputs that reach deep into the reader. The JPEG seed
(corpus/image_folder/grey_8x8.jpg, an 8×8 grey ramp) was written once by stb_image_write's
stbi_write_jpg at quality 50, and the regression_* files are inputs that made a reader crash or
allocate gigabytes (kept so that every fuzz run replays them); all are left alone here.
"""
import gzip
import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    directory = os.path.join(HERE, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


# --- model files -------------------------------------------------------------------------------


def safetensors(tensors, metadata, dtype="F32"):
    """tensors: name -> (shape, list of floats); float32 (or dtype for every tensor)."""
    formats = {"F32": "<f", "F16": "<e", "F64": "<d", "I8": "<b"}
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        shape, values = tensors[name]
        raw = b"".join(struct.pack(formats[dtype], v) for v in values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text.encode() + data


def tiny_resnet(shortcut="A", exits=()):
    """ResNet-8 of width 1 on 1×4×4 images, 2 classes, kernel 1: the smallest loadable model."""
    tensors, ranges = {}, {}

    def conv(name, out, inp, k=1, bias=False):
        shape = [out, inp] if name.endswith("fc") else [out, inp, k, k]  # FC weights are 2-D
        tensors[name + ".weight"] = (shape, [0.5] * (out * inp * k * k))
        if bias:
            tensors[name + ".bias"] = ([out], [0.25] * out)
        ranges[name] = 1.0

    def bn(name, channels):
        for part, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            tensors[f"{name}.{part}"] = ([channels], [value] * channels)

    conv("conv1", 1, 1)
    bn("bn1", 1)
    channels = 1
    for stage, out in ((1, 1), (2, 2), (3, 4)):
        prefix = f"layer{stage}.0"
        conv(prefix + ".conv1", out, channels)
        bn(prefix + ".bn1", out)
        conv(prefix + ".conv2", out, out)
        bn(prefix + ".bn2", out)
        if shortcut == "B" and (stage > 1 or channels != out):
            conv(prefix + ".shortcut.conv", out, channels)
            bn(prefix + ".shortcut.bn", out)
        channels = out
        if stage in exits:
            conv(f"exit{stage}.fc", 2, channels, bias=True)
    conv("fc", 2, channels, bias=True)
    arch = {"family": "resnet-cifar", "depth": 8, "kernel": 1, "width": 1, "in_channels": 1,
            "input_size": [4, 4], "num_classes": 2, "shortcut": shortcut, "exits": list(exits),
            "exit_head": {"type": "pool"}}
    metadata = {"cimsweep.arch": json.dumps(arch, separators=(",", ":")),
                "cimsweep.input_ranges": json.dumps(ranges, separators=(",", ":"))}
    return tensors, metadata


tensors, metadata = tiny_resnet()
write("model_file", "resnet8_w1_a.safetensors", safetensors(tensors, metadata))
tensors, metadata = tiny_resnet("B", exits=(1, 2))
write("model_file", "resnet8_w1_b_exits_f16.safetensors", safetensors(tensors, metadata, "F16"))
write("model_file", "dtypes.safetensors",
      safetensors({"a": ([2, 1], [1.0, -2.0]), "b": ([0, 3], [])}, {"k": "v"}, "F64"))
write("model_file", "empty_header.safetensors", struct.pack("<Q", 8) + b"{}      ")

# --- IDX: 2-byte little-endian images length, images file, labels file --------------------------


def idx_pair(count, height, width, compress=False):
    images = struct.pack(">IIII", 0x803, count, height, width) + bytes(
        (i * 37) % 256 for i in range(count * height * width))
    labels = struct.pack(">II", 0x801, count) + bytes(i % 3 for i in range(count))
    if compress:
        images, labels = gzip.compress(images, mtime=0), gzip.compress(labels, mtime=0)
    return struct.pack("<H", len(images)) + images + labels


write("idx", "raw_4x2x3", idx_pair(4, 2, 3))
write("idx", "gzip_5x3x3", idx_pair(5, 3, 3, compress=True))

# --- CIFAR-10 binary: records of 1 label byte + 3072 pixel bytes ---------------------------------

write("cifar", "one_record.bin", bytes([7]) + bytes((i * 13) % 256 for i in range(3072)))
write("cifar", "truncated.bin", bytes([1]) + bytes(100))

# --- images -------------------------------------------------------------------------------------


def png(width, height, colour_type, pixels):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    rows = b"".join(b"\0" + bytes(pixels[y * width * channels:(y + 1) * width * channels])
                    for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def bmp(width, height):
    row = bytes((x * 40) % 256 for x in range(width * 3))
    row += b"\0" * (-len(row) % 4)
    pixels = row * height
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + info + pixels


write("image_folder", "rgb_3x2.png", png(3, 2, 2, [(i * 29) % 256 for i in range(18)]))
write("image_folder", "grey_alpha_2x2.png", png(2, 2, 4, [0, 255, 128, 64, 32, 16, 8, 4]))
write("image_folder", "rgb_2x3.bmp", bmp(2, 3))

# --- results files --------------------------------------------------------------------------------


def record(model, sigma, trial, correct, exits=None, extra=None):
    line = {"model": model, "config_hash": "0123456789abcdef", "sigma": sigma, "trial": trial,
            "images": 10, "correct": correct, "accuracy": correct * 10.0,
            "exit_accuracy": exits or [], "seconds": 0.5}
    if extra is not None:
        line["extra"] = extra
    return json.dumps(line, separators=(",", ":")) + "\n"


write("results", "two_models.jsonl",
      record("a", 0.0, -1, 9) + record("a", 0.05, 0, 7, extra={"backend": "cpu"})
      + record("a", 0.05, 1, 6) + record("b|c", 0.1, 0, 5, exits=[50.0, None]))
write("results", "torn_last_line.jsonl", record("a", 0.1, 0, 4) + '{"model":"a","config_ha')
write("results", "nan_and_blank.jsonl",
      '\n{"model":"m","config_hash":"x","sigma":0.2,"trial":3,"images":0,"correct":0,'
      '"accuracy":null,"exit_accuracy":null,"seconds":null}\n')

# --- sweep files -----------------------------------------------------------------------------------

write("sweep_spec", "full.toml", """name = "seed"
data = "data"
split = "test"
limit = 500
trials = 3
first_trial = 0
sigmas = [0.0, 0.05, 0.1]
clean = true

[cim]
adc = "dynamic"
adc-bits = 10
weight-bits = 8
cell-bits = 4
onoff = "inf"
clamp-at-zero = true
digital-layers = ["conv1", "fc"]
seed = 7

[[models]]
label = "tiny"
path = "model.safetensors"

[[models]]
path = "/abs/other.safetensors"
""")
write("sweep_spec", "minimal.toml", 'sigmas = [0.1]\n[[models]]\npath = "m.safetensors"\n')
