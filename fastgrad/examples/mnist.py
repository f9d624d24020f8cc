"""Offline MNIST: reads the IDX files (``.gz`` or plain) vendored in ``data/mnist`` or a torchvision root.

MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, distributed under CC BY-SA 3.0.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Tuple

import torch

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def default_data_dir() -> Path:
    """``$FASTGRAD_MNIST``, else the copy vendored in the repository (``data/mnist``)."""
    env = os.environ.get("FASTGRAD_MNIST")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "data" / "mnist"


def _find(root: Path, stem: str) -> Path:
    for d in (root, root / "MNIST" / "raw", root / "raw"):
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    raise FileNotFoundError(
        f"MNIST file {stem}[.gz] not found under {root} (looked in ., MNIST/raw, raw); pass --data-dir with the "
        "four IDX files or a torchvision MNIST root, or set FASTGRAD_MNIST. The repository vendors them in "
        "data/mnist (an installed wheel does not carry them: point --data-dir at a clone's data/mnist)")


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4: 4 + 4 * ndim])
    t = torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8)
    if t.numel() != torch.Size(dims).numel():
        raise ValueError(f"{path}: expected {dims} values, found {t.numel()}")
    return t.view(*dims)


def load_mnist(split: str = "train", data_dir: Optional[os.PathLike] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 ``[N, 28, 28]`` in [0, 1] (as ``transforms.ToTensor``) and int64 labels ``[N]``."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    img_stem, lbl_stem = FILES[split]
    images = _read_idx(_find(root, img_stem)).float().div_(255.0)
    labels = _read_idx(_find(root, lbl_stem)).long()
    return images, labels


def batches(images: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Shuffled minibatches (a DataLoader with shuffle=True, without worker overhead)."""
    perm = torch.randperm(images.shape[0], generator=generator)
    for i in range(0, images.shape[0], batch_size):
        yield images[perm[i: i + batch_size]]
