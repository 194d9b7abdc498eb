"""A corpus of hostile inputs, written by code: bad image files, a folder of them beside good ones,
damaged checkpoints, and pickles that would run code. Used by tests/test_hostile.py.

Every writer returns what it wrote, so a test can name the file in its assertions.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, rgb=(200, 40, 40)) -> bytes:
    """A valid 8-bit RGB PNG, filled with one colour."""
    row = b"\x00" + bytes(rgb) * width
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(row * height)) + _chunk(b"IEND", b""))


def undecodable_png(path: Path, width: int = 64, height: int = 48) -> Path:
    """Valid signature, chunks and CRCs (so a CRC check passes), but image data that does not inflate."""
    rng = np.random.default_rng(0)
    idat = b"\x78\x9c" + rng.integers(0, 256, 64, dtype=np.uint8).tobytes()  # zlib header, then garbage
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    path.write_bytes(data)
    return path


def huge_header_png(path: Path, side: int = 12000) -> Path:
    """A PNG whose header says side x side (144 MP at 12000): only its header may ever be read."""
    row = b"\x00" + b"\x80\x80\x80" * side
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(row * 2)) + _chunk(b"IEND", b""))  # 2 rows of data only
    path.write_bytes(data)
    return path


def float_tiff_as_png(path: Path, side: int = 64) -> Path:
    """A 32-bit float TIFF (values in [0, 1]) under a .png name."""
    arr = np.random.default_rng(1).random((side, side), dtype=np.float32)
    Image.fromarray(arr, mode="F").save(path, format="TIFF")
    return path


def constant_png(path: Path, side: int = 64) -> Path:
    path.write_bytes(png_bytes(side, side, (0, 0, 0)))
    return path


def write_bad_files(folder: Path) -> dict[str, Path]:
    """One file per kind of damage, each with a caption; returns {expected skip reason: path}.
    (Kinds that only show at decode time or in data-report are returned under their own names.)"""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}

    def caption(p: Path) -> Path:
        p.with_suffix(".txt").write_text("a bad file\n")
        return p

    out["empty"] = caption(folder / "zero.png")
    out["empty"].write_bytes(b"")
    out["unreadable"] = caption(folder / "noise.png")
    out["unreadable"].write_bytes(np.random.default_rng(2).integers(0, 256, 500, dtype=np.uint8).tobytes())
    good = png_bytes(64, 64)
    out["truncated"] = caption(folder / "cut.png")
    out["truncated"].write_bytes(good[: len(good) // 2])
    out["broken_link"] = caption(folder / "dangling.png")
    os.symlink(folder / "no-such-target.png", out["broken_link"])
    loop = caption(folder / "loop.png")
    os.symlink(loop.name, loop)  # a link to itself
    out["link_loop"] = loop
    out["too_large"] = huge_header_png(caption(folder / "huge.png"))
    out["float_pixels"] = float_tiff_as_png(caption(folder / "float.png"))
    out["no_caption"] = folder / "orphan.png"
    out["no_caption"].write_bytes(good)
    out["bad_caption"] = folder / "binary_caption.png"
    out["bad_caption"].write_bytes(good)
    out["bad_caption"].with_suffix(".txt").write_bytes(b"\xff\xfe\x00bad")
    out["bad_metadata"] = caption(folder / "meta.png")
    out["bad_metadata"].write_bytes(good)
    out["bad_metadata"].with_suffix(".json").write_text("[1, 2")
    out["constant"] = constant_png(caption(folder / "black.png"))  # usable, flagged by data-report
    out["undecodable"] = undecodable_png(caption(folder / "bad_data.png"))  # passes the scan
    return out


# --------------------------------------------------------------------------- checkpoints

def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def flip_byte(path: Path) -> Path:
    """Same size, one byte changed near the end (tensor data, not the header)."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def damage_checkpoint(checkpoint: Path, kind: str) -> Path:
    """Damage a checkpoint folder in one of DAMAGE_KINDS; returns the file or folder touched."""
    import shutil

    if kind == "student_truncated":
        return truncate(next((checkpoint / "student").glob("*.safetensors")))
    if kind == "ema_truncated":
        return truncate(next((checkpoint / "ema").glob("*.safetensors")))
    if kind == "student_bit_flip":
        return flip_byte(next((checkpoint / "student").glob("*.safetensors")))
    if kind == "optimizer_cut":
        return truncate(checkpoint / "optimizer.pt", 0.3)
    if kind == "state_json_corrupt":
        (checkpoint / "train_state.json").write_text('{"step": 2, "epoch"')
        return checkpoint / "train_state.json"
    if kind == "ema_missing":
        shutil.rmtree(checkpoint / "ema")
        return checkpoint / "ema"
    if kind == "manifest_corrupt":
        (checkpoint / "COMPLETE").write_text("{not json")
        return checkpoint / "COMPLETE"
    raise ValueError(kind)


DAMAGE_KINDS = ("student_truncated", "ema_truncated", "student_bit_flip", "optimizer_cut", "state_json_corrupt",
                "ema_missing", "manifest_corrupt")


# --------------------------------------------------------------------------- pickles

class Payload:
    """Unpickling this would create `marker` (a stand-in for any code a pickle can run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_pickle(path: Path, marker: Path) -> Path:
    """A torch file whose loading would run code: tensors beside an object with a payload."""
    import torch

    torch.save({"model": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path)
    return path


def manifest(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "COMPLETE").read_text())
