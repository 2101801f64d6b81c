"""Data for the recipes, with no downloads and no torchvision.

* Images: scikit-learn's digits upsampled to RGB (the offline default), CIFAR-10 from its python-pickle
  folder (a trusted copy; read with :class:`CifarUnpickler`, which rebuilds numpy arrays and nothing else),
  an ImageNet-style folder (``train/<class>/*.JPEG``, ``val/<class>/...``), or a Hugging Face image
  dataset saved with ``save_to_disk``. ImageNet-style training augmentation (RandomResizedCrop, horizontal
  flip, normalisation) and the eval resize + center crop are written with PIL and torch.
* Text: byte-level tokens (vocabulary 256) from the Python standard library's own sources (default), a
  text or parquet file, or a text dataset saved on disk.

Training order is a :class:`ResumableSampler`: a seeded permutation per epoch, indexed by a global
micro-batch counter, so a resumed run sees exactly the batches it would have seen. Random augmentation is
seeded per (seed, epoch, index), independent of workers and ranks.
"""

from __future__ import annotations

import math
import pickle
import random
import sysconfig
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ResumableSampler",
    "eval_index_batches",
    "random_resized_crop",
    "center_crop_resize",
    "pil_to_tensor",
    "TensorImages",
    "digits_images",
    "cifar10_images",
    "CifarUnpickler",
    "ImageFolder",
    "HFImages",
    "load_image_data",
    "TokenChunks",
    "stdlib_corpus",
    "text_corpus",
    "collate_images",
    "collate_tokens",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}


# ------------------------------------------------------------------------------------------ sampling
def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The augmentation RNG of one sample in one epoch (same on every worker, rank and resume)."""
    return random.Random((seed * 1_000_003 + epoch) * 10_000_019 + index)


class ResumableSampler:
    """Endless batches of ``(index, epoch)`` for one rank, starting at global micro-batch ``start``.

    Global micro-batch j of epoch e is ``perm_e[j * B : (j + 1) * B]`` with B = batch_size * world_size and
    perm_e a permutation seeded by (seed, e); rank r takes its r-th slice of batch_size. Incomplete global
    batches at the end of an epoch are dropped.
    """

    def __init__(
        self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0
    ):
        if n < batch_size * world_size:
            raise ValueError(
                f"dataset of {n} samples is smaller than one global batch ({batch_size} x {world_size} processes)"
            )
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.start = seed, start
        self.batches_per_epoch = n // (batch_size * world_size)

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        k = self.start
        epoch, perm = None, None
        B = self.batch_size * self.world_size
        while True:
            e, j = divmod(k, self.batches_per_epoch)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            lo = j * B + self.rank * self.batch_size
            yield [(int(i), epoch) for i in perm[lo : lo + self.batch_size]]
            k += 1


def eval_index_batches(n: int, batch_size: int, rank: int, world_size: int, max_batches: int = 0):
    """This rank's eval batches as (indices, mask) lists; every rank gets the same number of batches (padded
    with masked copies of index 0), so sharded models run the same collectives everywhere."""
    per_rank = math.ceil(n / world_size)
    nb = math.ceil(per_rank / batch_size)
    if max_batches:
        nb = min(nb, max_batches)
    mine = list(range(rank, n, world_size))
    out = []
    for b in range(nb):
        idx = mine[b * batch_size : (b + 1) * batch_size]
        mask = [True] * len(idx)
        pad = batch_size - len(idx)
        idx, mask = idx + [0] * pad, mask + [False] * pad
        out.append((idx, mask))
    return out


# ------------------------------------------------------------------------------------------ transforms
def random_resized_crop(img, size: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop (Inception-style) of a PIL image to ``size`` x ``size``, bilinear."""
    from PIL import Image

    W, H = img.size
    area = W * H
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            i = rng.randint(0, H - h)
            j = rng.randint(0, W - w)
            return img.resize((size, size), Image.BILINEAR, box=(j, i, j + w, i + h))
    in_ratio = W / H  # fallback: the central crop with the aspect ratio clamped to ``ratio``
    if in_ratio < ratio[0]:
        w, h = W, int(round(W / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = H, int(round(H * ratio[1]))
    else:
        w, h = W, H
    i, j = (H - h) // 2, (W - w) // 2
    return img.resize((size, size), Image.BILINEAR, box=(j, i, j + w, i + h))


def center_crop_resize(img, size: int, crop_fraction: float = 0.875):
    """Resize the shorter side to size / crop_fraction, then take the central size x size crop."""
    from PIL import Image

    W, H = img.size
    short = int(round(size / crop_fraction))
    if W <= H:
        nw, nh = short, max(short, int(round(H * short / W)))
    else:
        nh, nw = short, max(short, int(round(W * short / H)))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def pil_to_tensor(img, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor (3, H, W)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _pil_train(img, size, rng):
    from PIL import Image

    img = random_resized_crop(img.convert("RGB"), size, rng)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_tensor(img)


# ------------------------------------------------------------------------------------------ image datasets
class TensorImages(torch.utils.data.Dataset):
    """In-memory images (N, C, H, W), normalised; optional pad-and-crop + flip augmentation on torch tensors."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        augment: bool = False,
        pad: int = 4,
        flip: bool = True,
        seed: int = 0,
    ):
        self.x, self.y, self.augment, self.pad, self.flip, self.seed = x, y, augment, pad, flip, seed
        self.num_classes = int(y.max()) + 1
        self.image_size = x.shape[-1]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, key):
        idx, epoch = key if isinstance(key, tuple) else (key, None)
        x = self.x[idx]
        if self.augment and epoch is not None:
            rng = sample_rng(self.seed, epoch, idx)
            p = self.pad
            if p:
                xp = F.pad(x, (p, p, p, p), mode="reflect")
                i, j = rng.randint(0, 2 * p), rng.randint(0, 2 * p)
                x = xp[:, i : i + x.shape[1], j : j + x.shape[2]]
            if self.flip and rng.random() < 0.5:
                x = x.flip(-1)
        return x, int(self.y[idx])


def digits_images(
    size: int = 32, channels: int = 3, val_fraction: float = 0.2, augment: bool = False, seed: int = 0
):
    """scikit-learn's 8x8 digits (1797 images, bundled with the package) upsampled to size x size, normalised.
    The split is a fixed permutation (seed 0), independent of the run's seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).repeat(1, channels, 1, 1).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = int(round(len(y) * val_fraction))
    va, tr = perm[:n_val], perm[n_val:]
    train = TensorImages(x[tr], y[tr], augment=augment, pad=max(1, size // 16), flip=False, seed=seed)
    val = TensorImages(x[va], y[va])
    return train, val


def _numpy_array_globals() -> dict:
    """The globals numpy's own pickles of arrays name, under numpy 1 and numpy 2 module spellings."""
    try:
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
        from numpy.core.numeric import _frombuffer
    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):  # CIFAR-10 was pickled by numpy 1; numpy 2 writes _core
        out[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        out[(f"{core}.numeric", "_frombuffer")] = _frombuffer  # pickle protocol 5
    return out


class CifarUnpickler(pickle.Unpickler):
    """Reads a CIFAR-10 python batch without running code from it.

    Unpickling calls whatever global function a file names, so a plain ``pickle.load`` of a file from
    elsewhere runs code. A real batch holds only dicts, lists, bytes, numbers and numpy arrays; this
    unpickler resolves exactly the globals that rebuild a numpy array (``ndarray``, ``dtype``,
    ``_reconstruct``, ``_frombuffer``) and refuses every other one with :class:`pickle.UnpicklingError`.
    """

    ALLOWED = _numpy_array_globals()

    def __init__(self, file, path: str | Path = "<file>"):
        super().__init__(file, encoding="bytes")  # the batches were written by Python 2
        self.path = path

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self.path}: refused to unpickle the global {module}.{name}. A CIFAR-10 python batch holds "
                "only dicts, lists, bytes, numbers and numpy arrays, so this loader rebuilds numpy arrays and "
                "nothing else: any other global is a function the file would call, i.e. code from the file. "
                "This is not a genuine CIFAR-10 batch; there is no opt-in, because the real data never needs "
                "one. Download CIFAR-10 again from https://www.cs.toronto.edu/~kriz/cifar.html "
                "(cifar-10-python.tar.gz, md5 c58f30108f718f92721af3b95e74349a)."
            ) from None


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return CifarUnpickler(f, path).load()


def _cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """(uint8 images (N, 3, 32, 32), labels) of one batch file, with its layout checked."""
    d = _unpickle(path)
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"{path} is not a CIFAR-10 batch (needs a dict with b'data' and b'labels')")
    data, labels = d[b"data"], d[b"labels"]
    if not (
        isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
    ):
        what = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be a uint8 array (N, 3072), got a {what}")
    if not (isinstance(labels, list) and len(labels) == len(data) and all(type(y) is int for y in labels)):
        raise ValueError(f"{path}: b'labels' must be a list of {len(data)} ints (one per image)")
    return data.reshape(-1, 3, 32, 32), labels


def cifar10_images(root: str | Path, augment: bool = True, seed: int = 0):
    """CIFAR-10 from ``cifar-10-batches-py`` (data_batch_1..5, test_batch); ``root`` may be that folder or
    its parent. Training augmentation: reflect-pad 4 + random 32x32 crop + horizontal flip.

    The batches are Python pickles by the data set's design. They are read with :class:`CifarUnpickler`,
    which rebuilds numpy arrays and refuses every other global, so a tampered file cannot run code; still,
    point ``root`` at a trusted copy of CIFAR-10 (a file could hold wrong images or labels).
    """
    root = Path(root)
    if not (root / "data_batch_1").exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    files = [root / f"data_batch_{i}" for i in range(1, 6)]
    missing = [str(f) for f in files + [root / "test_batch"] if not f.exists()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 python-pickle files missing: {missing}")

    def load(paths):
        xs, ys = [], []
        for p in paths:
            x, y = _cifar_batch(p)
            xs.append(x)
            ys.extend(y)
        x = torch.from_numpy(np.concatenate(xs)).float().div_(255.0)
        mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
        std = torch.tensor((0.2470, 0.2435, 0.2616)).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous(), torch.tensor(ys, dtype=torch.long)

    xtr, ytr = load(files)
    xte, yte = load([root / "test_batch"])
    return TensorImages(xtr, ytr, augment=augment, seed=seed), TensorImages(xte, yte)


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/<image>`` files (classes sorted by name); ImageNet augmentation when ``train``."""

    def __init__(self, root: str | Path, image_size: int, train: bool, seed: int = 0, classes=None):
        self.root, self.image_size, self.train, self.seed = Path(root), image_size, train, seed
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.classes = classes or sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"{self.root} has no class sub-folders (expected {self.root}/<class>/*.JPEG)")
        self.samples = []
        for c, name in enumerate(self.classes):
            for f in sorted((self.root / name).rglob("*")):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    self.samples.append((f, c))
        if not self.samples:
            raise ValueError(f"no images ({sorted(IMAGE_SUFFIXES)}) under {self.root}")
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        from PIL import Image

        idx, epoch = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[idx]
        with Image.open(path) as img:
            img = img.convert("RGB")
            if self.train and epoch is not None:
                x = _pil_train(img, self.image_size, sample_rng(self.seed, epoch, idx))
            else:
                x = pil_to_tensor(center_crop_resize(img, self.image_size))
        return x, label


class HFImages(torch.utils.data.Dataset):
    """One split of a Hugging Face image-classification dataset (PIL images or arrays), same transforms."""

    IMAGE_COLUMNS = ("image", "img", "pixel_values")
    LABEL_COLUMNS = ("label", "labels", "fine_label")

    def __init__(self, ds, image_size: int, train: bool, seed: int = 0):
        cols = ds.column_names
        self.image_col = next((c for c in self.IMAGE_COLUMNS if c in cols), None)
        self.label_col = next((c for c in self.LABEL_COLUMNS if c in cols), None)
        if self.image_col is None or self.label_col is None:
            raise ValueError(
                f"dataset needs an image column {self.IMAGE_COLUMNS} and a label column "
                f"{self.LABEL_COLUMNS}; it has {cols}"
            )
        self.ds, self.image_size, self.train, self.seed = ds, image_size, train, seed
        feat = ds.features.get(self.label_col)
        names = getattr(feat, "names", None)
        self.num_classes = len(names) if names else int(max(ds[self.label_col])) + 1

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        from PIL import Image

        idx, epoch = key if isinstance(key, tuple) else (key, None)
        row = self.ds[int(idx)]
        img = row[self.image_col]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img, dtype=np.uint8))
        img = img.convert("RGB")
        if self.train and epoch is not None:
            x = _pil_train(img, self.image_size, sample_rng(self.seed, epoch, idx))
        else:
            x = pil_to_tensor(center_crop_resize(img, self.image_size))
        return x, int(row[self.label_col])


def _split(dd, names):
    for n in names:
        if n in dd:
            return dd[n]
    return None


def load_image_data(data_dir=None, dataset=None, image_size: int = 224, seed: int = 0):
    """(train, val) from an ImageNet-style folder or a dataset saved on disk (exactly one of the two)."""
    if (data_dir is None) == (dataset is None):
        raise ValueError("give exactly one of data_dir (an image folder) and dataset (datasets.save_to_disk)")
    if data_dir is not None:
        root = Path(data_dir)
        val_dir = next((root / n for n in ("val", "validation", "test") if (root / n).is_dir()), None)
        if not (root / "train").is_dir() or val_dir is None:
            raise FileNotFoundError(f"{root} must contain train/<class>/... and val/<class>/...")
        train = ImageFolder(root / "train", image_size, train=True, seed=seed)
        val = ImageFolder(val_dir, image_size, train=False, classes=train.classes)
        return train, val
    from datasets import DatasetDict, load_from_disk

    if not Path(dataset).exists():
        raise FileNotFoundError(f"--dataset {dataset}: no dataset saved there (datasets.save_to_disk)")
    dd = load_from_disk(str(dataset))
    if isinstance(dd, DatasetDict):
        tr, va = _split(dd, ("train",)), _split(dd, ("validation", "val", "test"))
        if tr is None or va is None:
            raise ValueError(
                f"{dataset}: needs a 'train' and a 'validation'/'val'/'test' split, has {list(dd)}"
            )
    else:
        parts = dd.train_test_split(test_size=0.05, seed=0)
        tr, va = parts["train"], parts["test"]
    return HFImages(tr, image_size, train=True, seed=seed), HFImages(va, image_size, train=False)


def collate_images(items):
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


# ------------------------------------------------------------------------------------------ text
class TokenChunks(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq_len + 1`` byte tokens (input and shifted target share one tensor)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        if tokens.numel() < seq_len + 2:
            raise ValueError(f"corpus of {tokens.numel()} tokens is too short for seq_len={seq_len}")
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (tokens.numel() - 1) // seq_len

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        idx = key[0] if isinstance(key, tuple) else key
        s = idx * self.seq_len
        return self.tokens[s : s + self.seq_len + 1].long()


def collate_tokens(items):
    return torch.stack(items)


def _bytes_tensor(chunks: list[bytes]) -> torch.Tensor:
    buf = b"".join(chunks)
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8) if buf else torch.zeros(0, dtype=torch.uint8)


def stdlib_corpus(max_bytes: int = 4_000_000, val_every: int = 20):
    """Bytes of the standard library's ``*.py`` files (site-packages excluded), in sorted path order; every
    ``val_every``-th file is held out. ``max_bytes`` caps the training bytes (and the held-out bytes at
    max_bytes / val_every). Returns (train_tokens, val_tokens) uint8 tensors."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise FileNotFoundError(f"no *.py files under the standard library at {root}")
    train, val, n_train, n_val = [], [], 0, 0
    val_cap = max_bytes // val_every if max_bytes else 0
    for i, f in enumerate(files):
        is_val = i % val_every == val_every - 1
        if max_bytes and (n_val >= val_cap if is_val else n_train >= max_bytes):
            if n_val >= val_cap and n_train >= max_bytes:
                break
            continue
        try:
            data = f.read_bytes() + b"\n"
        except OSError:
            continue
        if is_val:
            val.append(data)
            n_val += len(data)
        else:
            train.append(data)
            n_train += len(data)
    return _bytes_tensor(train), _bytes_tensor(val)


def text_corpus(
    path=None, dataset=None, text_column: str = "text", val_fraction: float = 0.05, max_bytes: int = 0
):
    """(train, val) byte tensors from a text file, a parquet file (``text_column``) or a dataset on disk.

    A DatasetDict uses its train and validation/val/test splits; anything else holds out the last
    ``val_fraction`` of the bytes."""
    if (path is None) == (dataset is None):
        raise ValueError(
            "give exactly one of path (a .txt/.parquet file) and dataset (datasets.save_to_disk)"
        )
    if dataset is not None:
        from datasets import DatasetDict, load_from_disk

        if not Path(dataset).exists():
            raise FileNotFoundError(f"--dataset {dataset}: no dataset saved there")
        dd = load_from_disk(str(dataset))

        def col(ds):
            if text_column not in ds.column_names:
                raise ValueError(f"dataset has no column {text_column!r}; columns: {ds.column_names}")
            return [s.encode("utf-8") + b"\n" for s in ds[text_column]]

        if isinstance(dd, DatasetDict):
            tr, va = _split(dd, ("train",)), _split(dd, ("validation", "val", "test"))
            if tr is not None and va is not None:
                return _bytes_tensor(col(tr))[: max_bytes or None], _bytes_tensor(col(va))
            dd = tr if tr is not None else dd[list(dd)[0]]
        data = b"".join(col(dd))
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--data_path {path}: no such file")
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(p)
            if text_column not in table.column_names:
                raise ValueError(f"{p} has no column {text_column!r}; columns: {table.column_names}")
            data = b"".join(str(s).encode("utf-8") + b"\n" for s in table.column(text_column).to_pylist())
        else:
            data = p.read_bytes()
    if max_bytes:
        data = data[:max_bytes]
    cut = int(len(data) * (1 - val_fraction))
    return _bytes_tensor([data[:cut]]), _bytes_tensor([data[cut:]])
