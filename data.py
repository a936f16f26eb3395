"""data.py: the shared episode sampler and run plumbing for every script in this project.

Few-shot tasks, as MAML (Finn et al. 2017) §5 and Reptile (Nichol et al. 2018) §4 define them:

    sinusoid_tasks(...)      regression tasks y = A sin(x - φ)           (MAML §5.1, Reptile §4)
    load_omniglot(...)       1623 handwritten characters, 20 drawings each (MAML §5.2)
    load_miniimagenet(...)   100 ImageNet classes, 600 images each, 84x84  (Ravi & Larochelle 2017)
    load_image_folder(...)   any directory of class folders, for your own data
    EpisodeSampler           N-way K-shot episodes with Q queries per class

Every loader returns a dict of splits {"train", "val", "test"}, each a ClassImages: all images
of the split as one uint8 tensor plus per-class offsets, so that drawing an episode is a
handful of indexing operations and never the bottleneck (tests/benchmark.py measures it).

The second half holds what no paper contains and every script shares: the command-line checks,
parse_args (one way to merge a checkpoint's config with the flags), atomic checkpoints, the results
file, Ctrl-C, few-shot prediction on a user's images, plots, and torchrun (setup_distributed).

Symbols: N ways, K shots, Q query (per class), T tasks in a batch.
"""

import argparse
import atexit
import contextlib
import ctypes
import glob
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import random
import signal
import sys
import tempfile
import time
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


class DataError(RuntimeError):
    """Bad or missing data: the message says what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------
# Sinusoid regression (MAML §5.1; Reptile §4)
# ---------------------------------------------------------------------------------------------

def sinusoid_tasks(tasks, shots, query, generator, variant="maml", device="cpu"):
    """Draw `tasks` sinusoids and K support + Q query points from each.

    variant="maml"     (MAML §5.1): amplitude A ~ U[0.1, 5.0], phase φ ~ U[0, π],
                       support and query x ~ U[-5, 5].
    variant="reptile"  (Reptile §4): φ ~ U[0, 2π]; the query is 50 evenly spaced points on
                       [-5, 5], on which Reptile measures its loss.
    Returns a dict of tensors: x_support/y_support (T, K, 1), x_query/y_query (T, Q, 1),
    amplitude and phase (T,).
    """
    if variant not in ("maml", "reptile"):
        raise ValueError(f"unknown sinusoid variant {variant!r}; use 'maml' or 'reptile'")
    if shots < 1 or query < 1:
        raise ValueError(f"sinusoid tasks need shots >= 1 and query >= 1, got {shots} and {query}")
    g = generator
    amplitude = 0.1 + 4.9 * torch.rand(tasks, generator=g, dtype=torch.float64)
    phase_max = np.pi if variant == "maml" else 2 * np.pi
    phase = phase_max * torch.rand(tasks, generator=g, dtype=torch.float64)
    x_support = -5.0 + 10.0 * torch.rand(tasks, shots, 1, generator=g, dtype=torch.float64)
    if variant == "maml":
        x_query = -5.0 + 10.0 * torch.rand(tasks, query, 1, generator=g, dtype=torch.float64)
    else:
        x_query = torch.linspace(-5.0, 5.0, 50, dtype=torch.float64).expand(tasks, 50)[..., None]

    def wave(x):
        return amplitude[:, None, None] * torch.sin(x - phase[:, None, None])

    out = {"x_support": x_support, "y_support": wave(x_support),
           "x_query": x_query, "y_query": wave(x_query),
           "amplitude": amplitude, "phase": phase}
    return {k: v.to(device=device, dtype=torch.get_default_dtype()) for k, v in out.items()}   # float32 unless set


# ---------------------------------------------------------------------------------------------
# Class-indexed image storage and the episode sampler
# ---------------------------------------------------------------------------------------------

@dataclass
class ClassImages:
    """All images of one split. images: (total, C, H, W) uint8; class c owns the rows
    offsets[c] : offsets[c] + counts[c]."""
    images: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    names: list

    @property
    def num_classes(self):
        return len(self.names)

    @classmethod
    def from_lists(cls, per_class, names):
        """per_class: a list of (n_c, C, H, W) uint8 arrays, one per class."""
        counts = torch.tensor([len(a) for a in per_class], dtype=torch.long)
        offsets = torch.cumsum(counts, 0) - counts
        images = torch.from_numpy(np.concatenate(per_class)) if per_class else torch.zeros(0, 1, 1, 1, dtype=torch.uint8)
        return cls(images, offsets, counts, list(names))

    def subset(self, class_ids, rotations=(0,)):
        """The given classes, and each of them rotated by k·90° for k in `rotations` as a new class
        (Santoro et al. 2016; MAML §5.2)."""
        per_class, names = [], []
        for k in rotations:
            for c in class_ids:
                o, n = int(self.offsets[c]), int(self.counts[c])
                block = self.images[o:o + n].numpy()
                per_class.append(np.ascontiguousarray(np.rot90(block, k, axes=(2, 3))))
                names.append(self.names[c] + (f"/rot{90 * k}" if k else ""))
        return ClassImages.from_lists(per_class, names)


class EpisodeSampler:
    """N-way K-shot episodes with Q query images per class, drawn from an explicit generator.

    Classes are drawn without replacement; label j goes to the j-th drawn class, and since the
    draw is a random ordering, the class-to-label map is a fresh random permutation every task.
    Support and query images of a class are distinct images (one draw without replacement).
    """

    def __init__(self, split, ways, shots, query, device="cpu", split_name="split", rotate_tasks=False):
        if ways < 1 or shots < 1 or query < 0:
            raise ValueError(f"need ways >= 1, shots >= 1, query >= 0; got {ways}, {shots}, {query}")
        if ways > split.num_classes:
            raise DataError(f"ways={ways} is larger than the {split.num_classes} classes in the "
                            f"{split_name} split; use --ways {split.num_classes} or fewer")
        smallest = int(split.counts.min())
        if shots + query > smallest:
            c = int(split.counts.argmin())
            raise DataError(f"shots + query = {shots} + {query} = {shots + query} is more than the "
                            f"{smallest} images of class {split.names[c]!r} in the {split_name} split; "
                            f"lower --shots or --query")
        self.ways, self.shots, self.query, self.rotate_tasks = ways, shots, query, rotate_tasks
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.offsets, self.counts = split.offsets, split.counts
        self.num_classes = split.num_classes
        self.max_count = int(split.counts.max())
        # Rows past a class's own count get a key > 1 so that a sort never picks them.
        self.pad = (torch.arange(self.max_count)[None, :] >= split.counts[:, None]).float() * 2.0
        labels = torch.arange(ways)
        self.y_support = labels.repeat_interleave(shots).to(self.device)   # (N*K,)
        self.y_query = labels.repeat_interleave(query).to(self.device)     # (N*Q,)

    def sample(self, tasks, generator):
        """Returns x_support (T, N*K, C, H, W) float in [0, 1], y_support (T, N*K),
        x_query (T, N*Q, C, H, W), y_query (T, N*Q), all on the sampler's device.
        Images are grouped by label: the first K support images have label 0, and so on."""
        N, K, Q, T = self.ways, self.shots, self.query, tasks
        # Classes without replacement: the first N of a random ordering of all classes.
        keys = torch.rand(T, self.num_classes, generator=generator)
        classes = keys.argsort(dim=1)[:, :N]                                      # (T, N)
        # K + Q distinct images per class: the first K + Q of a random ordering of its images.
        keys = torch.rand(T, N, self.max_count, generator=generator) + self.pad[classes]
        picks = keys.argsort(dim=2)[:, :, :K + Q]                                 # (T, N, K+Q)
        rows = (self.offsets[classes][..., None] + picks).to(self.device)
        x = self.images[rows].float().div_(255.0)                                 # (T, N, K+Q, C, H, W)
        if self.rotate_tasks:
            # cbfinn/maml data_generator.py: each class of a task turned by its own random k·90°
            k = torch.randint(4, (T, N, 1, 1, 1, 1), generator=generator).to(self.device)
            x = sum(torch.rot90(x, r, (-2, -1)) * (k == r) for r in range(4))
        shape = x.shape[3:]
        x_support = x[:, :, :K].reshape(T, N * K, *shape)
        x_query = x[:, :, K:].reshape(T, N * Q, *shape)
        return (x_support, self.y_support.expand(T, -1),
                x_query, self.y_query.expand(T, -1))


# ---------------------------------------------------------------------------------------------
# Splits and caching
# ---------------------------------------------------------------------------------------------

def split_counts(num_classes, standard=(1100, 100, 423)):
    """Train/val/test class counts: the standard Omniglot 1100/100/423 when all 1623 characters
    are present, otherwise the same proportions."""
    total = sum(standard)
    if num_classes == total:
        return standard
    if num_classes < 3:
        raise DataError(f"only {num_classes} classes found; need at least 3 to split into train/val/test")
    n_train = max(1, round(num_classes * standard[0] / total))
    n_val = max(1, round(num_classes * standard[1] / total))
    n_test = num_classes - n_train - n_val
    if n_test < 1:
        n_train -= 1 - n_test
        n_test = 1
    return n_train, n_val, n_test


def seeded_class_split(num_classes, counts, seed):
    """A seeded random partition of range(num_classes) into consecutive groups of `counts`."""
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = [], 0
    for n in counts:
        out.append(sorted(order[start:start + n]))
        start += n
    return out


def _cache_path(name, key):
    """The cache file for `key`, always in $XDG_CACHE_HOME (or ~/.cache)/meta-learning-from-scratch:
    never in a folder the user gave us."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meta-learning-from-scratch"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-{hashlib.md5(key.encode()).hexdigest()[:12]}.npz"


def _fingerprint(root, files, head=64 << 10):
    """A cache key for `files` under `root`: the folder's absolute path, then each file's relative
    path, size, mtime in ns and the CRC-32 of its first `head` bytes (None: all of it; 0: none, for
    datasets too large to read at every start). The CRC catches a file replaced in place that kept
    its size and mtime; for images of a few tens of KiB, 64 KiB is the whole file."""
    parts = [str(Path(root).resolve())]
    for p in files:
        s = p.stat()
        crc = 0
        if head != 0:
            with open(p, "rb") as f:
                crc = zlib.crc32(f.read() if head is None else f.read(head))
        parts.append(f"{p.relative_to(root)}:{s.st_size}:{s.st_mtime_ns}:{crc:08x}")
    return "|".join(parts)


def _load_or_build(cache, build):
    """Load the cached (images, counts, names) from `cache`, or build and cache them atomically."""
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as f:
                images, counts, names = f["images"], f["counts"], [str(s) for s in f["names"]]
            return images, counts, names
        except Exception as e:  # a truncated or corrupt cache is rebuilt, never trusted
            print(f"cache {cache} is unreadable ({e}); rebuilding it", file=sys.stderr)
    images, counts, names = build()
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, images=images, counts=counts, names=np.array(names))
    os.chmod(tmp, 0o644)        # mkstemp's 0600 would hide a shared cache from other users
    os.replace(tmp, cache)
    print(f"cached {len(images)} images to {cache}")
    return images, counts, names


def _to_class_images(images, counts, names):
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return ClassImages.from_lists([images[s:s + n] for s, n in zip(starts, counts)], names)


def _eight_bit(img, channels):
    """Any Pillow mode as 8-bit grey (channels 1) or RGB. Pillow's convert() clips 16-bit and 32-bit
    integer images at 255, so those are scaled instead (by 65535, or as they are when they hold 8-bit
    values); transparent pixels are laid over white."""
    from PIL import Image
    if img.mode.startswith("I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if a.max() <= 1.0 else a                          # floats in [0, 1] or in [0, 255]
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("L" if channels == 1 else "RGB")


def _read_image(data, size, channels, invert=False):
    """Decode one image file (bytes or path), resize to size x size, and return (C, H, W) uint8.
    Converted to grayscale or RGB first, then resized with LANCZOS, so Omniglot's 1-bit strokes
    become smooth 28x28 images, as in learn2learn. cbfinn/maml asks for LANCZOS too, but on the
    1-bit image itself, which Pillow resizes by nearest neighbour whatever filter is asked: the
    reference trains on binary 28x28 images (README, differences table)."""
    from PIL import Image
    img = _eight_bit(Image.open(io.BytesIO(data) if isinstance(data, bytes) else data), channels)
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.LANCZOS)
    a = np.asarray(img, dtype=np.uint8)
    if invert:
        a = 255 - a
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# Omniglot (Lake et al. 2015): 20 drawings of each of 1623 characters in 50 alphabets
# ---------------------------------------------------------------------------------------------

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
OMNIGLOT_ARCHIVES = {"images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
                     "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811"}
OMNIGLOT_HELP = ("Omniglot was not found in {dir}. Put the official archives there: "
                 "images_background.zip and images_evaluation.zip (or any images_*.zip, e.g. the "
                 "'minimal' images_background_small1.zip / images_background_small2.zip), or their "
                 "extracted folders <alphabet>/<character>/*.png, from "
                 "https://github.com/brendenlake/omniglot/tree/master/python")


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_omniglot(root):
    """Fetch the two official archives, with a progress bar and an md5 check."""
    from tqdm import tqdm
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, md5 in OMNIGLOT_ARCHIVES.items():
        target = root / name
        if target.exists() and _md5(target) == md5:
            continue
        tmp = target.with_suffix(".zip.part")
        try:
            with urllib.request.urlopen(OMNIGLOT_URL + name, timeout=30) as r, open(tmp, "wb") as f:
                total = int(r.headers.get("Content-Length", 0)) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}") as bar:
                    for block in iter(lambda: r.read(1 << 16), b""):
                        f.write(block)
                        bar.update(len(block))
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(f"could not download {name} ({e}). " + OMNIGLOT_HELP.format(dir=root)) from e
        if _md5(tmp) != md5:
            tmp.unlink()
            raise DataError(f"{name} downloaded with a wrong md5 (expected {md5}); try again, or "
                            + OMNIGLOT_HELP.format(dir=root))
        os.replace(tmp, target)


def _omniglot_sources(root):
    """The archives and extracted folders in `root`: images_*.zip, images_*/ folders, or root
    itself when it is an extracted <alphabet>/<character>/*.png tree."""
    root = Path(root)
    if not root.is_dir():
        return []
    zips = sorted(p for p in root.glob("images_*.zip"))
    dirs = sorted(p for p in root.glob("images_*") if p.is_dir())
    # An extracted folder wins over its own archive, which holds the same files.
    zips = [z for z in zips if not (root / z.stem).is_dir()]
    sources = dirs + zips
    if not sources and any(root.glob("*/*/*.png")):
        sources = [root]
    return sources


def _omniglot_files(source):
    """Yield (alphabet/character, file name, reader) for every png of one source."""
    if source.suffix == ".zip":
        try:
            z = zipfile.ZipFile(source)
            names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{source} is not a readable zip archive ({e}); delete it and "
                            f"download it again") from e
        for n in sorted(names):
            parts = n.split("/")
            if n.endswith(".png") and len(parts) >= 3:
                yield f"{parts[-3]}/{parts[-2]}", parts[-1], (lambda n=n: z.read(n))
    else:
        for p in sorted(source.glob("*/*/*.png")):
            yield f"{p.parent.parent.name}/{p.parent.name}", p.name, (lambda p=p: p.read_bytes())


def load_omniglot_characters(root=None, download=True):
    """All Omniglot characters found in `root`, as a ClassImages of 28x28 inverted images
    (ink = 255). Characters that appear in several sources (Greek and Latin are in both minimal
    splits) are kept once. When `root` is None, ./data/omniglot is used and, if empty,
    the official archives are downloaded into it."""
    given = root is not None
    root = Path(root if given else "data/omniglot")
    sources = _omniglot_sources(root)
    if not sources:
        if given or not download:
            raise DataError(OMNIGLOT_HELP.format(dir=root))
        print(f"Omniglot not found in {root}; downloading the official archives")
        download_omniglot(root)
        sources = _omniglot_sources(root)
    key = _fingerprint(root, [f for s in sources for f in ([s] if s.is_file() else
                                                           sorted(x for x in s.rglob("*") if x.is_file()))], None)

    def build():
        from tqdm import tqdm
        chars = {}
        for s in sources:
            for char, fname, read in _omniglot_files(s):
                if char in chars and chars[char][0] != s:
                    continue  # the same character from an earlier source
                chars.setdefault(char, (s, []))[1].append((fname, read))
        if not chars:
            raise DataError(f"no <alphabet>/<character>/*.png files in {', '.join(map(str, sources))}. "
                            + OMNIGLOT_HELP.format(dir=root))
        names = sorted(chars)
        images, counts = [], []
        for char in tqdm(names, desc="Omniglot: resize to 28x28", unit="char"):
            reads = chars[char][1]
            for fname, read in reads:
                try:
                    # LANCZOS to 28x28 and invert, so ink = 1 (as the MAML reference code does)
                    images.append(_read_image(read(), 28, 1, invert=True))
                except Exception as e:
                    raise DataError(f"could not read {char}/{fname} in {chars[char][0]} ({type(e).__name__}); "
                                    f"the file is corrupt: replace it") from None
            counts.append(len(reads))
        return np.stack(images), np.array(counts), names

    images, counts, names = _load_or_build(_cache_path("omniglot28", key), build)
    print(f"Omniglot: {len(names)} characters, {len(images)} images from "
          f"{', '.join(s.name for s in sources)}")
    return _to_class_images(images, counts, names)


def load_omniglot(root=None, seed=0, rotate_eval=False, download=True, rotated_classes=True):
    """Omniglot split by character into train/val/test (1100/100/423 for all 1623, else the
    same proportions), by a seeded permutation. Training classes are augmented with 90°, 180°
    and 270° rotations as new classes (Santoro et al. 2016; MAML §5.2) unless rotated_classes is
    False; evaluation classes are rotated only when rotate_eval is set."""
    chars = load_omniglot_characters(root, download)
    counts = split_counts(chars.num_classes)
    ids = seeded_class_split(chars.num_classes, counts, seed)
    rot_all, rot_none = (0, 1, 2, 3), (0,)
    splits = {"train": chars.subset(ids[0], rot_all if rotated_classes else rot_none),
              "val": chars.subset(ids[1], rot_all if rotate_eval else rot_none),
              "test": chars.subset(ids[2], rot_all if rotate_eval else rot_none)}
    print(f"Omniglot split (seed {seed}): {counts[0]} / {counts[1]} / {counts[2]} characters "
          f"-> {splits['train'].num_classes} / {splits['val'].num_classes} / "
          f"{splits['test'].num_classes} classes (train/val/test, rotations included)")
    return splits


# ---------------------------------------------------------------------------------------------
# MiniImageNet (Ravi & Larochelle 2017): 64 / 16 / 20 classes of 600 images, 84x84 RGB
# ---------------------------------------------------------------------------------------------

MINIIMAGENET_HELP = (
    "MiniImageNet was not found in {dir}. It cannot be downloaded automatically. Put either "
    "the pickle caches mini-imagenet-cache-train.pkl, mini-imagenet-cache-validation.pkl and "
    "mini-imagenet-cache-test.pkl (dicts with 'image_data' N x 84 x 84 x 3 uint8 and "
    "'class_dict' {{class: [indices]}}), or the Ravi & Larochelle layout train.csv, val.csv, "
    "test.csv (filename,label) with an images/ folder, in that directory. Both are produced by "
    "the scripts that accompany Ravi & Larochelle (2017) from the ImageNet ILSVRC-12 training set.")


def _miniimagenet_pickle(path):
    try:
        with open(path, "rb") as f:
            d = pickle.load(f)
        data, class_dict = np.asarray(d["image_data"]), d["class_dict"]
    except Exception as e:
        raise DataError(f"{path} is not a readable MiniImageNet cache ({type(e).__name__}: {e}); "
                        f"expected a pickled dict with 'image_data' and 'class_dict'") from e
    if data.ndim != 4 or data.shape[-1] != 3 or data.dtype != np.uint8:
        raise DataError(f"{path}: image_data has shape {data.shape} and dtype {data.dtype}; "
                        f"expected N x 84 x 84 x 3 uint8")
    names = sorted(class_dict)
    per_class = [data[np.asarray(class_dict[n])].transpose(0, 3, 1, 2) for n in names]
    return ClassImages.from_lists(per_class, names)


def _miniimagenet_csv(root, csv_path):
    import csv
    with open(csv_path) as f:
        rows = [r for r in csv.reader(f)][1:]   # header: filename,label
    # the CSV read whole; its (up to 60,000) images by size and mtime only
    key = _fingerprint(root, [csv_path], None) + _fingerprint(root, sorted((root / "images").glob("*")), 0)

    def build():
        from tqdm import tqdm
        by_class = {}
        for filename, label in rows:
            by_class.setdefault(label, []).append(filename)
        names = sorted(by_class)
        images, counts = [], []
        for n in tqdm(names, desc=f"MiniImageNet {csv_path.stem}: resize to 84x84", unit="class"):
            for filename in by_class[n]:
                p = root / "images" / filename
                if not p.exists():
                    raise DataError(f"{p} is listed in {csv_path} but missing; " + MINIIMAGENET_HELP.format(dir=root))
                images.append(_read_image(str(p), 84, 3))
            counts.append(len(by_class[n]))
        return np.stack(images), np.array(counts), names

    return _to_class_images(*_load_or_build(_cache_path(f"miniimagenet-{csv_path.stem}", key), build))


def load_miniimagenet(root=None):
    root = Path(root if root is not None else "data/miniimagenet")
    pickles = {s: root / f"mini-imagenet-cache-{f}.pkl"
               for s, f in (("train", "train"), ("val", "validation"), ("test", "test"))}
    csvs = {s: root / f"{s}.csv" for s in ("train", "val", "test")}
    if all(p.exists() for p in pickles.values()):
        splits = {s: _miniimagenet_pickle(p) for s, p in pickles.items()}
    elif all(p.exists() for p in csvs.values()) and (root / "images").is_dir():
        splits = {s: _miniimagenet_csv(root, p) for s, p in csvs.items()}
    else:
        missing = [p.name for p in pickles.values() if not p.exists()]
        raise DataError(MINIIMAGENET_HELP.format(dir=root) + f" (missing: {', '.join(missing)})")
    print("MiniImageNet: " + " / ".join(f"{splits[s].num_classes}" for s in ("train", "val", "test"))
          + " classes (train/val/test)")
    return splits


# ---------------------------------------------------------------------------------------------
# Any image folder: root/<class>/*.png or root/<group>/<class>/*.png
# ---------------------------------------------------------------------------------------------

def _image_files(d):
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _refuse_empty_class_folders(root, class_dirs):
    """A folder the user made beside the class folders but left without images would otherwise be
    dropped without a word, and the classes would be one fewer than laid out: refuse it."""
    parents = {d.parent for d in class_dirs}
    empty = sorted(d for p in parents for d in p.iterdir()
                   if d.is_dir() and not d.name.startswith(".") and d not in class_dirs
                   and not any(c.is_relative_to(d) for c in class_dirs))
    if empty:
        raise DataError(f"{', '.join(str(d) for d in empty)}: no images ({', '.join(IMAGE_SUFFIXES)}) in "
                        f"{'this class folder' if len(empty) == 1 else 'these class folders'} beside the "
                        f"others under {root}; add images or remove {'it' if len(empty) == 1 else 'them'}")


def _read_user_image(p, size, channels, invert):
    """_read_image on a user's file, naming the file when it cannot be read."""
    try:
        return _read_image(str(p), size, channels, invert)
    except Exception as e:
        raise DataError(f"could not read image {p} ({type(e).__name__}); remove or replace it") from None


def load_image_folder_classes(root, image_size=84, channels=3, invert=False):
    """Every class folder under `root` (a folder that directly holds images is a class),
    resized to image_size x image_size; cached (see _cache_path)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; expected {root}/<class>/<images> "
                        f"or {root}/<group>/<class>/<images>")
    class_dirs = sorted(d for d in root.rglob("*") if d.is_dir() and _image_files(d))
    if len(class_dirs) < 2:
        raise DataError(f"found {len(class_dirs)} class folders with images under {root}; "
                        f"expected {root}/<class>/<images> or {root}/<group>/<class>/<images> "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    _refuse_empty_class_folders(root, class_dirs)
    files = {d: _image_files(d) for d in class_dirs}
    key = f"{image_size}:{channels}:{invert}:" + _fingerprint(root, [p for d in class_dirs for p in files[d]])

    def build():
        from tqdm import tqdm
        images, counts, names = [], [], []
        for d in tqdm(class_dirs, desc=f"{root.name}: resize to {image_size}x{image_size}", unit="class"):
            images += [_read_user_image(p, image_size, channels, invert) for p in files[d]]
            counts.append(len(files[d]))
            names.append(str(d.relative_to(root)))
        return np.stack(images), np.array(counts), names

    classes = _to_class_images(*_load_or_build(_cache_path(f"folder{image_size}c{channels}", key), build))
    print(f"{root}: {classes.num_classes} classes, {len(classes.images)} images")
    return classes


def load_image_folder(root, seed=0, image_size=84, channels=3, invert=False, proportions=(64, 16, 20)):
    """An image folder split by class into train/val/test with MiniImageNet's 64/16/20
    proportions, by a seeded permutation."""
    classes = load_image_folder_classes(root, image_size, channels, invert)
    counts = split_counts(classes.num_classes, proportions)
    ids = seeded_class_split(classes.num_classes, counts, seed)
    print(f"{root} split (seed {seed}): {counts[0]} / {counts[1]} / {counts[2]} classes (train/val/test)")
    return {name: classes.subset(i) for name, i in zip(("train", "val", "test"), ids)}


# ---------------------------------------------------------------------------------------------
# Few-shot prediction on a user's own images (--predict)
# ---------------------------------------------------------------------------------------------

@dataclass
class PredictionSets:
    classes: list          # the support folder's class names; label j is classes[j]
    x_support: torch.Tensor    # (S, C, H, W) uint8, S = all support images (any number per class)
    y_support: torch.Tensor    # (S,)
    query_paths: list
    x_query: torch.Tensor      # (M, C, H, W) uint8
    y_query: torch.Tensor      # (M,), or None when the queries do not sit in folders named like the classes


def load_prediction_sets(support_dir, queries, size, channels, invert):
    """The labelled support set, support_dir/<class>/<images>, and the images to classify: files, or
    folders of them (searched recursively). When every query sits in a folder named like a support
    class, those names are the ground truth. Nothing is cached or written."""
    root = Path(support_dir)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and _image_files(d)) if root.is_dir() else []
    if len(classes) < 2:
        raise DataError(f"--support {support_dir}: expected at least 2 class folders <class>/<images>, found "
                        f"{len(classes)} ({', '.join(IMAGE_SUFFIXES)})")
    _refuse_empty_class_folders(f"--support {support_dir}", [root / c for c in classes])
    paths = []
    for q in map(Path, queries):
        if q.is_dir():
            paths += sorted(p for p in q.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif q.is_file():
            paths.append(q)
        else:
            raise DataError(f"--predict {q}: no such image or folder")
    if not paths:
        raise DataError(f"--predict {' '.join(queries)}: no images ({', '.join(IMAGE_SUFFIXES)})")

    def read(p):
        return _read_user_image(p, size, channels, invert)
    support = [(read(p), j) for j, c in enumerate(classes) for p in _image_files(root / c)]
    known = all(p.parent.name in classes for p in paths)
    return PredictionSets(classes, torch.from_numpy(np.stack([x for x, _ in support])),
                          torch.tensor([j for _, j in support]), [str(p) for p in paths],
                          torch.from_numpy(np.stack([read(p) for p in paths])),
                          torch.tensor([classes.index(p.parent.name) for p in paths]) if known else None)


def write_predictions_csv(path, rows):
    """One line per query image: image, class, probability."""
    import csv
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

# ---------------------------------------------------------------------------------------------
# Run plumbing that every script shares (maml.py, anil.py, nil.py, reptile.py, rl.py): the checks
# on the command line, one way to merge a checkpoint's config with it, atomic checkpoints, the
# results file, Ctrl-C, few-shot prediction on a user's images, plots; torchrun at the end. None of
# it is in the papers.
# ---------------------------------------------------------------------------------------------

def task_batches(problem, split, tasks, batch_size, seed, **kw):
    """A fixed, seeded set of `tasks` tasks in batches of `batch_size`. Tasks are drawn one at a
    time, so the set is the same for every model and every batch size."""
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < tasks:
        n = min(batch_size, tasks - done)
        drawn = [problem.sample(split, 1, g, **kw) for _ in range(n)]
        yield tuple(torch.cat(parts) for parts in zip(*drawn))
        done += n


def mean_ci(values):
    """Mean and 95% confidence half-width 1.96·σ/√n over tasks."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))


class NonFiniteLoss(RuntimeError):
    """A NaN or inf loss: training stops before it touches θ, and the last checkpoint is kept."""


class HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default only when it has one; unset flags take the paper's value."""
    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "%(default)" in action.help:                  # `is`: a default of 0 is shown
            return action.help
        return action.help + " (default: %(default)s)"


def check_session_flags(cfg):
    """The checks every entry point shares (maml.py, anil.py, nil.py, reptile.py, rl.py), before any
    data is loaded: flags that go together, matplotlib for --plot, the device, then the numbers, the
    dataset's own flags and the output paths below."""
    if getattr(cfg, "predict", None) or getattr(cfg, "support", None):
        if not (cfg.predict and cfg.support and cfg.load):
            raise SystemExit("error: --predict IMAGES needs --support DIR and --load CHECKPOINT")
        if cfg.dataset == "sinusoid":
            raise SystemExit(f"error: --predict classifies images; {cfg.load} is a sinusoid regressor")
        cfg.eval_only = True
    if getattr(cfg, "dataset", None) == "folder" and not cfg.data_dir and not cfg.eval_only:
        raise SystemExit("error: --dataset folder needs --data-dir DIR (DIR/<class>/<images>)")
    if cfg.eval_only and not cfg.load:
        raise SystemExit("error: --eval-only needs --load CHECKPOINT")
    if cfg.load and not cfg.eval_only:
        raise SystemExit("error: --load is for --eval-only; use --resume CHECKPOINT to continue training")
    if cfg.load and cfg.resume:
        raise SystemExit("error: give either --resume (continue training) or --load (with --eval-only)")
    if cfg.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("error: --plot needs matplotlib, which is optional: pip install matplotlib")
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {cfg.device}: this code runs on cpu or cuda (cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for, but torch sees no CUDA device")
    check_numbers(cfg)
    refuse_unused(cfg)
    check_output_paths(cfg)


# flag: (its default, the datasets where it means something); given elsewhere, it is refused, not ignored
DATASET_FLAGS = {"sinusoid_variant": ("maml", {"sinusoid"}), "no_baseline": (False, {"sinusoid"}),
                 "full": (False, {"sinusoid"}), "rotate_eval": (False, {"omniglot"}),
                 "rotate_tasks": (False, {"omniglot"}), "image_size": (84, {"folder"}), "channels": (3, {"folder"}),
                 "data_dir": (None, {"omniglot", "miniimagenet", "folder"}),
                 "test_dir": (None, {"omniglot", "miniimagenet", "folder"})}


def refuse_unused(cfg):
    for k, (default, datasets) in DATASET_FLAGS.items():
        if hasattr(cfg, "dataset") and getattr(cfg, k, default) != default and cfg.dataset not in datasets:
            raise SystemExit(f"error: --{k.replace('_', '-')} is for --dataset {' or '.join(sorted(datasets))}, "
                             f"not {cfg.dataset}")


STEP_SIZES = ("inner_lr", "outer_lr", "meta_step_size", "max_kl", "clip_grad")


def check_numbers(cfg):
    """Numbers that argparse accepts but no run can use: NaN or inf anywhere, a count (every integer
    flag but the seeds and --eval-steps) below 1, a step size that is not positive, a seed outside
    numpy's range, an image too small for four 2×2 max-pools."""
    for k, v in vars(cfg).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            raise SystemExit(f"error: {flag} {v}: not a finite number")
        if type(v) is int and v < (0 if k == "eval_steps" else 1) and k not in ("seed", "split_seed"):
            raise SystemExit(f"error: {flag} {v}: must be at least {0 if k == 'eval_steps' else 1}")
        if k in STEP_SIZES and v is not None and v <= 0:
            raise SystemExit(f"error: {flag} {v}: a step size must be positive")
        if k in ("seed", "split_seed") and not 0 <= v < 2 ** 32:
            raise SystemExit(f"error: {flag} {v}: seeds lie in [0, 2^32)")
    if getattr(cfg, "image_size", 16) < 16:
        raise SystemExit(f"error: --image-size {cfg.image_size}: the network's four 2×2 max-pools need at least 16")


def check_output_paths(cfg):
    """--out, --save and --plot are checked before any data is loaded or any step is trained, so that
    a typo in a folder name cannot cost a finished run. A missing folder is created, as for --save."""
    plot = None if cfg.plot == "auto" else cfg.plot
    for flag, path in (("--out", cfg.out), ("--save", cfg.save), ("--plot", plot)):
        if not path:
            continue
        if os.path.isdir(path):
            raise SystemExit(f"error: {flag} {path} is a folder; give a file name")
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            blocker = next((p for p in [folder, *Path(folder).parents] if os.path.isfile(p)), None)
            why = f"{blocker} is a file" if blocker else e.strerror
            raise SystemExit(f"error: {flag} {path}: cannot create the folder {folder} ({why})") from None
        if not os.access(folder, os.W_OK):
            raise SystemExit(f"error: {flag} {path}: the folder {folder} is not writable")
    for orphan in glob.glob(glob.escape(os.path.abspath(cfg.save)) + ".*.tmp") if cfg.save else []:
        with contextlib.suppress(FileNotFoundError):    # another torchrun rank may have removed it
            os.remove(orphan)   # a save that a kill -9 interrupted (save_checkpoint names them so)


def write_results(path, results):
    """The --out JSON, written before any figure. If it still cannot be written (disk full, folder
    removed), the results go to a file in the temporary folder and the run exits non-zero, saying where."""
    if path:
        try:
            with open(path, "w") as f:
                json.dump(results, f, indent=1, default=str)
        except OSError as e:
            fd, spare = tempfile.mkstemp(prefix="results-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(results, f, indent=1, default=str)
            raise SystemExit(f"error: could not write --out {path} ({e.strerror}); "
                             f"the results are in {spare}") from None
        print(f"wrote {path}")
    if not all_finite(results.get("test")):
        raise SystemExit("error: the test result is not finite (NaN or inf): the model diverged"
                         + (f"; the numbers are in {path}" if path else ""))
    return results


def all_finite(x):
    if isinstance(x, dict):
        return all(all_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(all_finite(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


@dataclass
class Problem:
    """What the algorithm needs to know about a task distribution."""
    params: dict                     # θ at initialization
    forward: Callable                # forward(params with leading T, x (T, B, ...)) -> (T, B, outputs)
    loss: Callable                   # loss(out, y) -> (T,)
    metric: Callable                 # what evaluation reports per task: accuracy or MSE
    metric_name: str
    sample: Callable                 # sample(split, tasks, generator) -> x_s, y_s, x_q, y_q
    has_val: bool = True             # False when the val split has fewer classes than ways
    splits: dict = None              # the ClassImages of each split (anil.py's similarity draws its own tasks)


def run_predict(cfg, classify, any_ways=False):
    """Few-shot prediction on a user's images: read --support and --predict (py), classify, print
    one line per image (path, class, probability) and, where the folders name the classes, the accuracy.
    any_ways: NIL, which has no head, takes any number of support classes."""
    try:
        sets = load_prediction_sets(cfg.support, cfg.predict, *image_format(cfg))
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    if not any_ways and len(sets.classes) != cfg.ways:
        raise SystemExit(f"error: --support {cfg.support} has {len(sets.classes)} classes, but the model's head "
                         f"has {cfg.ways} (its --ways): give {cfg.ways} class folders")
    device = torch.device(cfg.device)
    x_s, x_q = (x[None].float().div_(255.0).to(device) for x in (sets.x_support, sets.x_query))
    probs = classify(x_s, sets.y_support[None].to(device), x_q)[0].cpu()       # (M, N)
    confidence, label = probs.max(-1)
    rows = [{"image": p, "class": sets.classes[c], "probability": round(float(q), 4)}
            for p, c, q in zip(sets.query_paths, label.tolist(), confidence.tolist())]
    print(f"{len(sets.y_support)} support images of {len(sets.classes)} classes; image, class, probability:")
    for r in rows:
        print(f"{r['image']}\t{r['class']}\t{r['probability']:.4f}")
    results = {"config": vars(cfg), "classes": sets.classes, "predictions": rows}
    if sets.y_query is not None:
        results["accuracy"] = float((label == sets.y_query).float().mean())
        print(f"accuracy on the {len(rows)} images, whose folders name their class: {results['accuracy']:.4f}")
    if cfg.out and cfg.out.endswith(".csv"):
        write_predictions_csv(cfg.out, rows)
        print(f"wrote {cfg.out}")
        return results
    return write_results(cfg.out, results)


def image_format(cfg):
    """(size, channels, invert) of the network's input, from the config alone: Omniglot is 28x28 grey
    with ink = 1, MiniImageNet 84x84 RGB, a folder as --image-size and --channels say."""
    if cfg.dataset == "omniglot":
        return 28, 1, True
    if cfg.dataset == "miniimagenet":
        return 84, 3, False
    return cfg.image_size, cfg.channels, False


def load_splits(cfg):
    if cfg.dataset == "sinusoid" or cfg.predict:
        return {}
    if cfg.test_dir and cfg.eval_only:         # the checkpoint fixes the format: no training data needed
        splits = {"test": load_image_folder_classes(cfg.test_dir, *image_format(cfg))}
    elif cfg.dataset == "omniglot":
        splits = load_omniglot(cfg.data_dir, cfg.split_seed, cfg.rotate_eval, rotated_classes=not cfg.rotate_tasks)
    elif cfg.dataset == "miniimagenet":
        splits = load_miniimagenet(cfg.data_dir)
    else:
        splits = load_image_folder(cfg.data_dir, cfg.split_seed, cfg.image_size, cfg.channels)
    if cfg.test_dir and not cfg.eval_only:
        splits["test"] = load_image_folder_classes(cfg.test_dir, *image_format(cfg))
    if cfg.test_dir and splits["test"].num_classes < 2 * cfg.ways:
        print(f"note: --test-dir has {splits['test'].num_classes} classes, fewer than 2 × ways = {2 * cfg.ways}: "
              f"its {cfg.test_tasks} tasks redraw the same classes, so they are not independent and the "
              f"± understates the uncertainty")
    return splits


def save_checkpoint(path, state):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # named after the checkpoint, so that the next start can remove one that a kill -9 left behind
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)   # atomic: a crash leaves the previous checkpoint intact
    except OSError as e:        # a full disk: the previous checkpoint is still there
        os.unlink(tmp)
        raise SystemExit(f"error: could not write the checkpoint {path} ({e.strerror}); "
                         f"the previous one, if any, is intact") from None
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path):
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch's own message advises weights_only=False, which runs arbitrary code
        raise SystemExit(f"error: checkpoint {path} is corrupt or not a torch file ({type(e).__name__})") from None
    if not isinstance(state, dict) or not {"params", "config", "iteration"} <= set(state):
        raise SystemExit(f"error: {path} is not a checkpoint of this project "
                         f"(expected a dict with params, config, iteration)")
    if state.get("format", 1) > CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} was written by a newer version of this code (format {state['format']})")
    bad = [k for k, v in state["params"].items() if not torch.isfinite(v).all()]
    if bad:   # argmax of NaN logits is class 0: such a model would print an accuracy and exit 0
        raise SystemExit(f"error: {path} holds non-finite parameters ({', '.join(bad)}); no test or prediction "
                         f"can be right with it: use an earlier checkpoint")
    return state


CHECKPOINT_FORMAT = 1   # every checkpoint records it, and the script that wrote it ("algorithm")


def checkpoint_algorithm(saved):
    """The script that wrote a checkpoint. Older Reptile checkpoints lack the entry but carry an inner_state."""
    return saved.get("algorithm") or ("reptile" if "inner_state" in saved else "maml")


def refuse_foreign(saved, source, accepted):
    """Refuse, before anything is trained or written, a checkpoint that another script wrote."""
    kind = checkpoint_algorithm(saved)
    if kind not in accepted:
        raise SystemExit(f"error: {source} was written by {kind}.py; this takes "
                         f"{' or '.join(f'{a}.py' for a in sorted(accepted))} checkpoints (use {kind}.py with it)")


# Flags about this invocation, always taken from the command line.
SESSION_FLAGS = {"device", "out", "save", "resume", "load", "eval_only", "plot", "predict", "support"}


# Flags that may differ from the checkpoint's when given again: the evaluation, the length, and the
# step sizes, so that a run that diverged can resume from its last good checkpoint with smaller ones.
OVERRIDABLE_FLAGS = {"iterations", "full", "test_tasks", "eval_chunk", "bn_mode", "test_dir", "data_dir",
                     "eval_steps", "val_tasks", "inner_lr", "outer_lr"}


def parse_args(parser, argv, algorithm, testable=(), session_flags=SESSION_FLAGS,
               overridable=OVERRIDABLE_FLAGS, test_overridable=()):
    """The command line merged with the --resume or --load checkpoint's config: the one way every
    script does it. --resume takes only `algorithm`'s checkpoints, --load also `testable`
    ones; `test_overridable` flags may differ from the checkpoint's only with --eval-only.
    Returns the merged flags, the checkpoint (or None) and the names of the flags given."""
    args = parser.parse_args(argv)
    given = {k for k, v in vars(args).items() if v != parser.get_default(k)}
    source = args.resume or args.load
    saved = load_checkpoint(source) if source else None
    env, trained = getattr(args, "env", None), saved and saved["config"].get("env")
    if saved and env != trained:           # meta-RL (rl.py) and supervised checkpoints do not mix
        raise SystemExit(f"error: {source} " + (f"is a meta-RL checkpoint: add --env {trained}" if not env else
                                                "is a supervised checkpoint, not a meta-RL one" if not trained
                                                else f"was trained on {trained}, not {env}"))
    if saved:
        refuse_foreign(saved, source, {algorithm} | (set(testable) if args.load else set()))
        overridable = set(overridable) | (set(test_overridable) if args.eval_only else set())
        args = merge_checkpoint_config(args, saved["config"], given, session_flags, overridable)
    return args, saved, given


def check_fit(saved, params, cfg):
    """Refuse a checkpoint whose parameters do not have this model's names and shapes."""
    if {k: v.shape for k, v in saved["params"].items()} != {k: v.shape for k, v in params.items()}:
        raise SystemExit(f"error: the parameters in {cfg.resume or cfg.load} do not fit this model "
                         f"(dataset {cfg.dataset}, ways {cfg.ways})")


def add_dataset_flags(p, papers):
    """The flags that choose the task distribution, the same in maml.py, anil.py, nil.py and reptile.py."""
    a = p.add_argument
    a("--dataset", choices=["sinusoid", "omniglot", "miniimagenet", "folder"], default="sinusoid",
      help=f"task distribution: {papers}, or an image folder")
    a("--data-dir", default=None, help="dataset folder (omniglot default: ./data/omniglot, downloaded "
      "if empty; miniimagenet default: ./data/miniimagenet; folder: required)")
    a("--test-dir", default=None, help="meta-test on every class of this image folder instead of the test split")
    a("--rotate-eval", action="store_true", help="Omniglot: rotated copies of val/test characters are classes too")
    a("--rotate-tasks", action="store_true", help="Omniglot as cbfinn/maml: no rotated classes; each class of "
      "every task, in training and test, is turned by its own random multiple of 90°")
    a("--split-seed", type=int, default=0, help="seed of the train/val/test class split")
    a("--image-size", type=int, default=84, help="folder datasets: images are resized to this")
    a("--channels", type=int, choices=[1, 3], default=3, help="folder datasets: 1 (grayscale) or 3 (RGB)")


def add_session_flags(p, resumable, predict=True):
    """This invocation's flags (SESSION_FLAGS), the same in every script. `resumable`: the training
    flags that a --resume may change; predict: --predict and --support (not in meta-RL)."""
    a = p.add_argument
    a("--seed", type=int, default=0, help="seeds the initialization, the tasks and every random draw of the run")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (meta-RL samples "
      "on the CPU)")
    a("--out", default=None, help="write the config and final metrics to this JSON file")
    a("--save", default=None, help="checkpoint path, written atomically at each validation and at the end")
    a("--resume", default=None, help="continue training from this checkpoint, exactly as if never stopped; "
      f"only {resumable} and the evaluation flags may differ from it")
    a("--load", default=None, help="checkpoint to evaluate (with --eval-only)")
    a("--eval-only", action="store_true", help="only meta-test the --load checkpoint")
    if not predict:
        return
    a("--predict", nargs="+", default=None, metavar="IMAGE_OR_DIR", help="few-shot prediction on your own "
      "images: adapt the --load model to --support as at test time, then classify these images (or folders)")
    a("--support", default=None, help="with --predict: DIR/<class>/<images>, any number of images per class")


def merge_checkpoint_config(cfg, saved, given, session_flags=SESSION_FLAGS, overridable=OVERRIDABLE_FLAGS):
    """The checkpoint's config, with this invocation's flags. A training flag given on the command
    line that contradicts the checkpoint is an error, not silently ignored."""
    merged = argparse.Namespace(**saved)
    for k, v in vars(cfg).items():
        if k in session_flags or (k in overridable and k in given) or k not in saved:
            setattr(merged, k, v)
        elif k in given and saved[k] != v:
            raise SystemExit(f"error: --{k.replace('_', '-')} {v} contradicts the checkpoint's {saved[k]}")
    return merged


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_freed_memory():
    """Speed only: glibc otherwise unmaps large freed tensors at once, and every iteration
    page-faults them back in. Returns whether the setting took (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                  # from glibc's <malloc.h>
    return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1


def run(main):
    """`if __name__ == "__main__": data.run(main)`. Ctrl-C outside training (which saves and stops on
    its own, StopRequest) ends with one line, not a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted; checkpoints on disk are as they were") from None


class StopRequest:
    """Ctrl-C or SIGTERM during training: the current iteration ends, a checkpoint is saved (with
    --save) and the run stops with one line. A second Ctrl-C stops at once. Used as `with`."""

    def __enter__(self):
        self.asked, self.previous = False, {}
        try:
            self.previous = {s: signal.signal(s, self.ask) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:      # not the main thread: signals stay as they are
            pass
        return self

    def ask(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def check(self, done, save, bar, checkpoint):
        """At the end of an iteration."""
        if not self.asked:
            return
        bar.close()
        state = checkpoint(done) if save else None
        if state and all(torch.isfinite(v).all() for v in state["params"].values()):
            save_checkpoint(save, state)
            raise SystemExit(f"stopped at iteration {done}: the checkpoint is {save} (go on with --resume {save})")
        raise SystemExit(f"stopped at iteration {done}: nothing saved" + (" (no --save)" if not save else ""))


class Training:
    """The bookkeeping around an algorithm's own loop, the same in maml.py, reptile.py and rl.py, which
    write the paper's 'while not done' themselves:

        with data.Training(cfg, start, history, validate, checkpoint, desc, advice) as loop:
            for it in loop:
                ...                                # the paper's lines, one meta-iteration
                loop.show({"loss": ...})           # the progress bar's numbers

    Iterations start..cfg.iterations run under a progress bar; after every cfg.val_every of them and
    the last (rank 0), a `key=value` line of validate()'s numbers goes to `history` and
    checkpoint(done) to an atomic file. A non-finite loss (NonFiniteLoss raised in the loop), θ or
    validation number stops the run with the file on disk the last good checkpoint (`advice` names the
    flags to lower); Ctrl-C or SIGTERM saves and stops (StopRequest). loop.state: the final checkpoint."""

    def __init__(self, cfg, start, history, validate, checkpoint, desc, advice):
        self.cfg, self.start, self.history, self.desc, self.advice = cfg, start, history, desc, advice
        self.validate, self.checkpoint = validate, checkpoint
        self.bar, self.it, self.state = None, start, None

    def __enter__(self):
        self.stop = StopRequest().__enter__()
        return self

    def __exit__(self, kind, error, traceback):
        self.stop.__exit__()
        if kind is NonFiniteLoss:
            raise self.stopped(f"{error} at iteration {self.it + 1} (try a smaller {self.advice})") from None
        return False

    def stopped(self, message):
        if self.bar is not None:
            self.bar.close()
        save = self.cfg.save
        kept = f"; the last good checkpoint is {save}" if save and os.path.exists(save) else ""
        return SystemExit(f"error: {message}: training stopped{kept}")

    def show(self, numbers):
        self.bar.set_postfix(numbers, refresh=False)

    def __iter__(self):
        cfg = self.cfg
        if self.start >= cfg.iterations:
            print(f"the checkpoint is already at iteration {self.start} of {cfg.iterations}")
            self.state = self.checkpoint(self.start)
            return
        from tqdm import tqdm
        self.bar = tqdm(range(self.start, cfg.iterations), initial=self.start, total=cfg.iterations, desc=self.desc,
                        dynamic_ncols=True, mininterval=0.5, disable=RANK != 0)
        started = time.time()
        for it in self.bar:
            self.it = it
            yield it                                            # the algorithm's meta-iteration runs here
            done = it + 1
            if (done % cfg.val_every == 0 or done == cfg.iterations) and RANK == 0:
                line = {"iteration": done, **self.validate(), "elapsed_s": round(time.time() - started, 1)}
                self.history.append(line)
                state = self.checkpoint(done)
                if not (all(torch.isfinite(v).all() for v in state["params"].values()) and
                        all(math.isfinite(v) for v in line.values() if isinstance(v, float))):
                    raise self.stopped(f"non-finite parameters or validation at iteration {done} (resume with a "
                                       f"smaller step size)")
                self.bar.write(" ".join(f"{k}={v}" for k, v in line.items()))
                if cfg.save:
                    save_checkpoint(cfg.save, state)
            self.stop.check(done, cfg.save, self.bar, self.checkpoint)
        self.bar.close()
        self.state = self.checkpoint(cfg.iterations)


def format_curve(curve, steps=None):
    """'0:m±c  1:m±c ...': mean ± 95% CI of each row (the inner steps `steps`, by default 0, 1, ...)."""
    steps = range(len(curve)) if steps is None else steps
    return "  ".join(f"{s}:{m:.4f}±{c:.4f}" for s, (m, c) in zip(steps, (mean_ci(r) for r in curve)))


def plot_curves(path, curves, title, xlabel="inner gradient steps at test time", ylabel="query accuracy"):
    """Test curves, mean ± 95% CI against steps: curves is a list of (label, steps, [(mean, ci), ...]),
    each optionally with a dict of matplotlib styles as a fourth item (e.g. a paper's curve dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    many = sum(c[0] is not None for c in curves) > 5          # then the legend goes beside the axes
    fig, ax = plt.subplots(figsize=(8, 4) if many else (5, 3.5))
    for label, steps, stats, *style in curves:
        ax.errorbar(list(steps), [m for m, _ in stats], yerr=[c for _, c in stats], label=label,
                    **{"marker": "o", "capsize": 3, **(style[0] if style else {})})
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))     # steps are whole numbers
    ax.set_title(title)
    if len(curves) > 1:
        ax.legend(**({"fontsize": 7, "loc": "center left", "bbox_to_anchor": (1.02, 0.5)} if many else {}))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def plot_fits(path, grid, truth, x_s, y_s, columns):
    """Sinusoid fits (MAML Fig. 2, Reptile Fig. 1), a row per task and a column per model: the true
    wave, the K support points and the model's curves. grid, truth (T, P, 1); x_s, y_s (T, K, 1);
    columns: [(title, [(label, line style, prediction (T, P, 1)), ...]), ...]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = truth.shape[0]
    fig, axes = plt.subplots(tasks, len(columns), figsize=(4.2 * len(columns), 3 * tasks), squeeze=False,
                             sharey=True)
    for col, (title, curves) in enumerate(columns):
        for t, ax in enumerate(axes[:, col]):
            ax.plot(grid[t, :, 0], truth[t, :, 0], "r", label="ground truth")
            for label, style, prediction in curves:
                ax.plot(grid[t, :, 0], prediction[t, :, 0], style, label=label)
            ax.plot(x_s[t, :, 0], y_s[t, :, 0], "^", color="purple", label=f"K = {x_s.shape[1]} points")
            ax.set_ylim(-6, 6)          # |A| <= 5; a diverged fit leaves the frame
        axes[0, col].set_title(title, fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"saved {path}")


# ---- More processes or GPUs (torchrun), as nanoGPT's train.py does it ----------------------------
# Every rank draws the same full meta-batch from the same seeded generator, adapts its own slice
# of the tasks, and the means over tasks (the meta-gradient, Reptile's φ̃) are averaged across ranks
# with weights tasks per rank. Every rank then takes the same step, so θ stays identical on all.
RANK, WORLD = 0, 1


def setup_distributed(cfg, script):
    """Join torchrun's process group when launched by torchrun (it sets WORLD_SIZE); otherwise one
    process. Ranks other than 0 print nothing and write no file."""
    global RANK, WORLD
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    if cfg.meta_batch_size < int(os.environ["WORLD_SIZE"]):
        raise SystemExit(f"error: --meta-batch-size {cfg.meta_batch_size} is smaller than the "
                         f"{os.environ['WORLD_SIZE']} processes: every process needs at least one task")
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(cfg.device)
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    atexit.register(dist.destroy_process_group)
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    if RANK != 0:
        cfg.save = cfg.out = cfg.plot = None
        sys.stdout = open(os.devnull, "w")
    print(f"torchrun: {WORLD} processes, {script} on {cfg.device}, {cfg.meta_batch_size} tasks per meta-batch")


def refuse_distributed(script, why):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(f"error: {script} does not run under torchrun: {why}")


def rank_tasks(tensors):
    """This rank's slice of the tasks (the leading dimension) of each tensor; all of them in one process.
    The split need not be even: 25 tasks on 2 ranks are 12 and 13."""
    if WORLD == 1:
        return tensors
    T = tensors[0].shape[0]
    return type(tensors)(t[RANK * T // WORLD:(RANK + 1) * T // WORLD] for t in tensors)


def all_reduce_mean(tensors, tasks):
    """Each rank's means over its `tasks` tasks become, in place, the means over every rank's tasks:
    Σ_r tasks_r · mean_r / Σ_r tasks_r, in one all_reduce (float64, then back). A no-op in one process."""
    if WORLD == 1:
        return
    flat = torch.cat([t.detach().reshape(-1).double() * tasks for t in tensors]
                     + [torch.tensor([float(tasks)], dtype=torch.float64, device=tensors[0].device)])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_((flat[offset:offset + t.numel()] / flat[-1]).view_as(t))
        offset += t.numel()

