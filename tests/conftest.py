"""Tiny fixtures that stand in for the real datasets, built in temporary folders: tests never
read ../shared or download anything."""

import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _drawing(rng, size=105):
    """A 1-bit 'character': a few random rectangles of ink (black) on white, like Omniglot PNGs."""
    a = np.full((size, size), 255, np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, size - 20, 2)
        w, h = rng.integers(4, 20, 2)
        a[y:y + h, x:x + w] = 0
    return Image.fromarray(a).convert("1")


def make_omniglot(root, alphabets=3, characters=10, drawings=4, as_zip=True, name="images_background", seed=0):
    """root/images_background.zip (or the extracted folder) in the official layout
    images_background/<Alphabet>/characterNN/<id>_<drawer>.png."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for a in range(alphabets):
        for c in range(1, characters + 1):
            for d in range(1, drawings + 1):
                path = f"{name}/Alphabet{a}/character{c:02d}/{a:02d}{c:02d}_{d:02d}.png"
                files[path] = _drawing(rng)
    if as_zip:
        with zipfile.ZipFile(root / f"{name}.zip", "w") as z:
            for path, img in files.items():
                tmp = root / "tmp.png"
                img.save(tmp)
                z.write(tmp, path)
                tmp.unlink()
    else:
        for path, img in files.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            img.save(root / path)
    return root


def make_miniimagenet(root, classes=(6, 5, 5), images=4, seed=0):
    """The common pickle caches mini-imagenet-cache-{train,validation,test}.pkl."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, n_classes in zip(("train", "validation", "test"), classes):
        data = rng.integers(0, 256, (n_classes * images, 84, 84, 3), dtype=np.uint8)
        class_dict = {f"n{split[:2]}{c:05d}": list(range(c * images, (c + 1) * images)) for c in range(n_classes)}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f)
    return root


def make_image_folder(root, groups=2, classes=5, images=4, size=32, seed=0):
    """root/<group>/<class>/*.png, RGB, of varying sizes."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for g in range(groups):
        for c in range(classes):
            d = root / f"group{g}" / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(images):
                s = size + int(rng.integers(0, 8))
                Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture
def omniglot_dir(tmp_path):
    return make_omniglot(tmp_path / "omniglot")


@pytest.fixture
def mini_dir(tmp_path):
    return make_miniimagenet(tmp_path / "mini")


@pytest.fixture
def folder_dir(tmp_path):
    return make_image_folder(tmp_path / "folder")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Caches land here, not in the user's ~/.cache.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
