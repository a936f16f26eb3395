"""data.py: the shared episode sampler for every script in this project.

Few-shot tasks, as MAML (Finn et al. 2017) §5 and Reptile (Nichol et al. 2018) §4 define them:

    sinusoid_tasks(...)      regression tasks y = A sin(x - φ)           (MAML §5.1, Reptile §4)
    load_omniglot(...)       1623 handwritten characters, 20 drawings each (MAML §5.2)
    load_miniimagenet(...)   100 ImageNet classes, 600 images each, 84x84  (Ravi & Larochelle 2017)
    load_image_folder(...)   any directory of class folders, for your own data
    EpisodeSampler           N-way K-shot episodes with Q queries per class

Every loader returns a dict of splits {"train", "val", "test"}, each a ClassImages: all images
of the split as one uint8 tensor plus per-class offsets, so that drawing an episode is a
handful of indexing operations and never the bottleneck (tests/benchmark.py measures it).

Symbols: N ways, K shots, Q query (per class), T tasks in a batch.
"""

import hashlib
import io
import os
import pickle
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
    return {k: v.to(device=device, dtype=torch.float32) for k, v in out.items()}


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
