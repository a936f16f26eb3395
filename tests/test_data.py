"""data.py: sampler invariants, the dataset readers on tiny fixtures, and every clear error."""

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from conftest import make_image_folder, make_omniglot


def toy_split(classes=10, images=6, size=4):
    """Class c's images are all filled with the value c, so a pixel tells the class."""
    per_class = [np.full((images, 1, size, size), c, np.uint8) for c in range(classes)]
    return data.ClassImages.from_lists(per_class, [f"c{c}" for c in range(classes)])


def pixel_class(x):
    return (x[..., 0, 0, 0] * 255).round().long()


def test_episode_invariants():
    split = toy_split(classes=12, images=6)
    # each image gets a unique id in its corner so that support/query disjointness is visible
    split.images[:, 0, 1, 1] = torch.arange(len(split.images), dtype=torch.uint8)
    sampler = data.EpisodeSampler(split, ways=5, shots=2, query=3)
    g = torch.Generator().manual_seed(0)
    x_s, y_s, x_q, y_q = sampler.sample(50, g)
    assert x_s.shape == (50, 10, 1, 4, 4) and x_q.shape == (50, 15, 1, 4, 4)
    assert x_s.dtype == torch.float32 and 0 <= x_s.min() and x_s.max() <= 1
    mappings = set()
    for t in range(50):
        cls_s, cls_q = pixel_class(x_s[t]), pixel_class(x_q[t])
        # one class per label, the same in support and query, and N distinct classes per task
        label_to_class = {int(y): int(c) for y, c in zip(y_s[t], cls_s)}
        assert len(label_to_class) == 5 and len(set(label_to_class.values())) == 5
        assert all(label_to_class[int(y)] == int(c) for y, c in zip(y_q[t], cls_q))
        assert sorted(y_s[t].tolist()) == sorted(list(range(5)) * 2)
        # support and query images are different images
        ids_s = set((x_s[t, :, 0, 1, 1] * 255).round().long().tolist())
        ids_q = set((x_q[t, :, 0, 1, 1] * 255).round().long().tolist())
        assert len(ids_s) == 10 and len(ids_q) == 15 and not ids_s & ids_q
        mappings.add(tuple(label_to_class[i] for i in range(5)))
    # labels are a fresh random permutation: the label->class maps differ between tasks
    assert len(mappings) > 40


def test_sampler_is_reproducible_and_uses_only_its_generator():
    sampler = data.EpisodeSampler(toy_split(), 3, 1, 2)
    a = sampler.sample(4, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG must not matter
    b = sampler.sample(4, torch.Generator().manual_seed(7))
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_classes_with_different_image_counts_never_pick_padding():
    per_class = [np.full((n, 1, 2, 2), c, np.uint8) for c, n in enumerate([2, 9, 3, 2])]
    split = data.ClassImages.from_lists(per_class, list("abcd"))
    sampler = data.EpisodeSampler(split, 4, 1, 1)
    x_s, y_s, x_q, y_q = sampler.sample(200, torch.Generator().manual_seed(0))
    assert torch.equal(pixel_class(x_s).sort(1).values, torch.arange(4).expand(200, 4))


def test_sampler_errors():
    split = toy_split(classes=4, images=3)
    with pytest.raises(data.DataError, match="ways=5 is larger than the 4 classes"):
        data.EpisodeSampler(split, 5, 1, 1, split_name="test")
    with pytest.raises(data.DataError, match=r"shots \+ query = 2 \+ 2 = 4 is more than the 3 images"):
        data.EpisodeSampler(split, 2, 2, 2)


def test_sinusoid_tasks():
    g = torch.Generator().manual_seed(0)
    b = data.sinusoid_tasks(1000, 5, 7, g)
    assert b["x_support"].shape == (1000, 5, 1) and b["y_query"].shape == (1000, 7, 1)
    assert 0.1 <= b["amplitude"].min() and b["amplitude"].max() <= 5.0
    assert 0 <= b["phase"].min() and b["phase"].max() <= np.pi and b["phase"].max() > 3.0
    assert -5 <= b["x_support"].min() and b["x_support"].max() <= 5
    expected = b["amplitude"][:, None, None] * torch.sin(b["x_query"] - b["phase"][:, None, None])
    torch.testing.assert_close(b["y_query"], expected)
    r = data.sinusoid_tasks(1000, 10, 1, g, variant="reptile")
    assert r["phase"].max() > 4.0 and r["phase"].max() <= 2 * np.pi   # U[0, 2π]
    torch.testing.assert_close(r["x_query"][3, :, 0], torch.linspace(-5, 5, 50))
    with pytest.raises(ValueError, match="unknown sinusoid variant"):
        data.sinusoid_tasks(1, 1, 1, g, variant="other")


def test_split_counts():
    assert data.split_counts(1623) == (1100, 100, 423)
    assert data.split_counts(242) == (164, 15, 63)       # the two minimal splits together
    assert data.split_counts(100, (64, 16, 20)) == (64, 16, 20)
    for n in range(3, 300):
        counts = data.split_counts(n)
        assert sum(counts) == n and min(counts) >= 1


def test_omniglot_zip_reading_split_and_rotations(omniglot_dir):
    splits = data.load_omniglot(omniglot_dir, seed=0)
    n_train, n_val, n_test = data.split_counts(30)
    assert (splits["train"].num_classes, splits["val"].num_classes, splits["test"].num_classes) == \
        (4 * n_train, n_val, n_test)
    # splits are disjoint by character
    chars = {s: {n.split("/rot")[0] for n in splits[s].names} for s in splits}
    assert not chars["train"] & chars["val"] and not chars["train"] & chars["test"] and not chars["val"] & chars["test"]
    # 28x28, inverted (ink = 255 on a 0 background), uint8
    imgs = splits["test"].images
    assert imgs.shape[1:] == (1, 28, 28) and imgs.dtype == torch.uint8
    assert (imgs == 0).float().mean() > 0.5
    # rotations are new classes holding the rotated images of the same character
    train = splits["train"]
    base = train.names[0]
    for k in (1, 2, 3):
        c = train.names.index(f"{base}/rot{90 * k}")
        o0, o = int(train.offsets[0]), int(train.offsets[c])
        n = int(train.counts[0])
        assert torch.equal(train.images[o:o + n], torch.rot90(train.images[o0:o0 + n], k, dims=(2, 3)))
    # a different split seed gives a different split; the same seed the same one
    assert data.load_omniglot(omniglot_dir, seed=0)["test"].names == splits["test"].names
    assert data.load_omniglot(omniglot_dir, seed=1)["test"].names != splits["test"].names
    assert data.load_omniglot(omniglot_dir, rotate_eval=True)["test"].num_classes == 4 * n_test


def test_per_task_rotation_turns_each_class_of_a_task_by_one_multiple_of_90_degrees(omniglot_dir):
    """cbfinn/maml's augmentation (--rotate-tasks): no rotated classes; the same episode as without
    rotation, with all K + Q images of a class (K = 1, Q = 3 here) turned by that class's own k·90°."""
    plain = data.load_omniglot(omniglot_dir, seed=0, rotated_classes=False)
    assert plain["train"].num_classes == data.split_counts(30)[0]
    sampler = data.EpisodeSampler(plain["train"], 5, 1, 3)
    turned = data.EpisodeSampler(plain["train"], 5, 1, 3, rotate_tasks=True)
    a = sampler.sample(8, torch.Generator().manual_seed(0))
    b = turned.sample(8, torch.Generator().manual_seed(0))   # same classes and images: k is drawn after them
    seen = set()
    for t in range(8):
        for c in range(5):
            xa = torch.cat([a[0][t, c:c + 1], a[2][t, c * 3:(c + 1) * 3]])
            xb = torch.cat([b[0][t, c:c + 1], b[2][t, c * 3:(c + 1) * 3]])
            ks = [k for k in range(4) if torch.equal(xb, torch.rot90(xa, k, (-2, -1)))]
            assert ks, "a class's images are not one rotation of the unrotated ones"
            seen.add(ks[0])
    assert seen == {0, 1, 2, 3}


def test_omniglot_cache_and_folders_and_duplicates(tmp_path):
    root = make_omniglot(tmp_path / "o", as_zip=True)
    before = sorted(p.name for p in root.iterdir())
    first = data.load_omniglot_characters(root)
    assert sorted(p.name for p in root.iterdir()) == before        # nothing written into the user's folder
    caches = list((Path(os.environ["XDG_CACHE_HOME"]) / "meta-learning-from-scratch").glob("omniglot28-*.npz"))
    assert len(caches) == 1
    again = data.load_omniglot_characters(root)
    assert torch.equal(first.images, again.images) and first.names == again.names
    # the same archive extracted gives the same images
    with zipfile.ZipFile(root / "images_background.zip") as z:
        z.extractall(tmp_path / "x")
    extracted = data.load_omniglot_characters(tmp_path / "x")
    assert torch.equal(extracted.images, first.images)
    # a second archive repeating characters (Greek and Latin in both minimal splits) adds them once
    make_omniglot(root, alphabets=4, name="images_background_small2")
    both = data.load_omniglot_characters(root)
    assert both.num_classes == 40
    # a corrupt cache is rebuilt, not trusted
    for cache in (Path(os.environ["XDG_CACHE_HOME"]) / "meta-learning-from-scratch").glob("omniglot28-*.npz"):
        cache.write_bytes(b"not a cache")
    assert torch.equal(data.load_omniglot_characters(root).images, both.images)


def test_omniglot_missing_and_corrupt(tmp_path, monkeypatch):
    with pytest.raises(data.DataError, match="images_background.zip and images_evaluation.zip"):
        data.load_omniglot_characters(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "images_background.zip").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="not a readable zip"):
        data.load_omniglot_characters(tmp_path / "bad")
    # a member that is not an image is named, not shown as an in-memory buffer
    with zipfile.ZipFile(tmp_path / "broken.zip", "w") as z:
        z.writestr("images_background/Alpha/character01/0101_01.png", b"not a png")
    (tmp_path / "one").mkdir()
    (tmp_path / "broken.zip").rename(tmp_path / "one" / "images_background.zip")
    with pytest.raises(data.DataError, match=r"could not read Alpha/character01/0101_01.png in .*images_background"
                                             r".zip \(UnidentifiedImageError\)") as e:
        data.load_omniglot_characters(tmp_path / "one")
    assert "BytesIO" not in str(e.value)

    # no directory given, nothing present, offline: a clear error naming the files
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataError, match=r"could not download images_background.zip.*images_evaluation.zip"):
        data.load_omniglot_characters(None)


def test_miniimagenet_pickles(mini_dir):
    splits = data.load_miniimagenet(mini_dir)
    assert [splits[s].num_classes for s in ("train", "val", "test")] == [6, 5, 5]
    assert splits["train"].images.shape[1:] == (3, 84, 84)
    import pickle
    with open(mini_dir / "mini-imagenet-cache-train.pkl", "rb") as f:
        raw = pickle.load(f)
    name = sorted(raw["class_dict"])[2]
    o = int(splits["train"].offsets[2])
    first = raw["image_data"][raw["class_dict"][name][0]]
    assert torch.equal(splits["train"].images[o], torch.from_numpy(first).permute(2, 0, 1))


def test_miniimagenet_csv_layout(tmp_path):
    from PIL import Image
    root = tmp_path / "mini"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        lines = ["filename,label"]
        for c in range(3):
            for i in range(2):
                name = f"{split}{c}_{i}.jpg"
                Image.fromarray(rng.integers(0, 256, (100, 90, 3), dtype=np.uint8)).save(root / "images" / name)
                lines.append(f"{name},n{split}{c}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    splits = data.load_miniimagenet(root)
    assert splits["val"].num_classes == 3 and splits["val"].images.shape == (6, 3, 84, 84)


def test_miniimagenet_errors(tmp_path):
    with pytest.raises(data.DataError, match="mini-imagenet-cache-train.pkl"):
        data.load_miniimagenet(tmp_path)
    for s in ("train", "validation", "test"):
        (tmp_path / f"mini-imagenet-cache-{s}.pkl").write_bytes(b"\x80corrupt")
    with pytest.raises(data.DataError, match="not a readable MiniImageNet cache"):
        data.load_miniimagenet(tmp_path)


def test_image_folder(folder_dir, tmp_path):
    splits = data.load_image_folder(folder_dir, image_size=16, channels=3)
    assert sum(s.num_classes for s in splits.values()) == 10
    assert splits["train"].images.shape[1:] == (3, 16, 16)
    flat = make_image_folder(tmp_path / "flat", groups=1, classes=3)
    classes = data.load_image_folder_classes(flat / "group0", image_size=8, channels=1)
    assert classes.names == ["class0", "class1", "class2"] and classes.images.shape[1:] == (1, 8, 8)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_image_folder_classes(tmp_path / "missing")
    (flat / "group0" / "class1" / "9.png").write_bytes(b"broken png")
    with pytest.raises(data.DataError, match="could not read image .*9.png"):
        data.load_image_folder_classes(flat / "group0", image_size=8)


def test_every_image_mode_decodes_to_its_grey_levels():
    """16-bit, 32-bit, float, 1-bit, palette, grey + alpha, RGBA and CMYK files all decode to the grey
    levels they show; Pillow's plain convert('L') would saturate the 16-bit one (99% of pixels 255)."""
    import io
    from PIL import Image
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))             # 64x64, levels 0..252
    images = {
        "I;16": Image.fromarray(grey.astype(np.uint16) * 257),                # 16-bit PNG
        "I": Image.fromarray(grey.astype(np.int32) * 257),
        "F": Image.fromarray(grey.astype(np.float32) / 255.0),
        "P": Image.fromarray(grey).convert("P"),
        "LA": Image.fromarray(grey).convert("LA"),
        "RGBA": Image.fromarray(grey).convert("RGBA"),
        "CMYK": Image.fromarray(grey).convert("CMYK"),
    }
    for mode, img in images.items():
        buf = io.BytesIO()
        img.save(buf, format="TIFF" if mode in ("CMYK", "F", "I") else "PNG")
        assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith(mode[0]), mode
        out = data._read_image(buf.getvalue(), 64, 1)[0].astype(int)
        assert np.abs(out - grey).max() <= 1, mode
    rgb = data._read_image(buf.getvalue(), 64, 3)                            # CMYK as RGB too
    assert rgb.shape == (3, 64, 64) and np.abs(rgb.astype(int) - grey).max() <= 1
    one_bit = Image.fromarray(grey >= 128)                                   # mode '1'
    buf = io.BytesIO()
    one_bit.save(buf, format="PNG")
    assert set(np.unique(data._read_image(buf.getvalue(), 64, 1))) == {0, 255}
    see_through = Image.fromarray(np.zeros((64, 64, 4), dtype=np.uint8), "RGBA")   # black, fully transparent
    buf = io.BytesIO()
    see_through.save(buf, format="PNG")
    assert (data._read_image(buf.getvalue(), 64, 1) == 255).all()            # transparent pixels are white


def test_the_image_cache_sees_a_file_replaced_in_place_and_stays_out_of_the_users_folder(tmp_path):
    """The cache key holds each file's size, mtime and CRC of its start: an image replaced by another
    of exactly the same size, with its mtime set back, is not served stale."""
    from PIL import Image
    rng = np.random.default_rng(0)
    root = tmp_path / "mine"
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.bmp")
    before = sorted(str(p) for p in root.rglob("*"))
    first = data.load_image_folder_classes(root, 16, 1)
    assert sorted(str(p) for p in root.rglob("*")) == before          # nothing written into the user's folder
    victim = root / "class0" / "0.bmp"
    st = victim.stat()
    Image.fromarray(255 - np.asarray(Image.open(victim))).save(victim)  # uncompressed: the same byte count
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    again = data.load_image_folder_classes(root, 16, 1)
    assert not torch.equal(first.images, again.images)


def test_an_interrupt_outside_training_ends_with_one_line():
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit, match="^interrupted; checkpoints on disk are as they were$"):
        data.run(interrupted)
    data.run(lambda: None)          # a finished main() returns normally
