"""Image data: folders, the CIFAR-10 archive format, .npy arrays, built-in sets, itd data."""

import io
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from itdiffusion.cli import main
from itdiffusion.data.images import (GRID_8BIT, from_uint8, load_data, read_cifar10, read_image_folder, read_npy,
                                unpickle_cifar_batch)

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]


class _Py2Pickler(pickle._Pickler):
    """Writes pickles as Python 2's cPickle did for CIFAR-10 (protocol 2).

    ``bytes`` become Python 2 ``str`` (SHORT_BINSTRING/BINSTRING) and numpy's array
    reconstruction is referenced as ``numpy.core.multiarray._reconstruct``.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_batch(n: int, seed: int) -> tuple[bytes, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    obj = {b"batch_label": b"batch %d" % seed, b"labels": labels, b"data": data,
           b"filenames": [b"img_%d.png" % i for i in range(n)]}
    return py2_pickle(obj), data, labels


NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar_archive(path, n: int = 3, extra: dict | None = None):
    """A small archive in the official layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    files, truth = {}, {"train": [], "test": []}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        blob, data, labels = cifar_batch(n, seed=i)
        files[name] = blob
        truth["test" if name == "test_batch" else "train"].append((data, labels))
    files["batches.meta"] = py2_pickle({b"label_names": [s.encode() for s in NAMES], b"num_cases_per_batch": n,
                                        b"num_vis": 3072})
    files.update(extra or {})
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return {k: (np.concatenate([d for d, _ in v]), sum((lab for _, lab in v), [])) for k, v in truth.items()}


def test_cifar_archive_and_folder_read_without_torchvision(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    truth = make_cifar_archive(archive)
    for split, n in (("train", 15), ("test", 3)):
        data = read_cifar10(archive, split)
        pixels, labels = truth[split]
        assert data.x.shape == (n, 3, 32, 32) and data.x.dtype == torch.float32
        assert torch.equal(data.x, from_uint8(pixels.reshape(-1, 3, 32, 32)))
        assert data.labels.tolist() == labels and data.classes == tuple(NAMES)
        assert data.grid == GRID_8BIT and data.x.min() >= -1 and data.x.max() <= 1
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    for spec in (tmp_path / "x", tmp_path / "x" / "cifar-10-batches-py", archive):
        assert torch.equal(load_data(str(spec), "test").x, read_cifar10(archive, "test").x)


def test_cifar_reader_refuses_pickles_that_import_anything_else(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    archive = tmp_path / "evil.tar.gz"
    make_cifar_archive(archive, extra={"test_batch": pickle.dumps({"data": Evil()}, protocol=2)})
    with pytest.raises(ValueError, match=r"test_batch.*refusing to load (__builtin__|builtins).print"):
        read_cifar10(archive, "test")
    with pytest.raises(ValueError, match="not a CIFAR-10 batch"):
        unpickle_cifar_batch(b"garbage", "data_batch_1")
    with pytest.raises(ValueError, match="missing data_batch_1"):
        read_cifar10(tmp_path, "train")


def test_itd_data_cifar10_exports_png_folders_that_read_back_identically(tmp_path, capsys):
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_archive(archive)
    out = tmp_path / "png"
    assert main(["data", "cifar10", "--from", str(archive), "--out", str(out)]) == 0
    assert "wrote 15 training and 3 test images" in capsys.readouterr().out
    for split in ("train", "test"):
        ref = read_cifar10(archive, split)
        back = load_data(str(out), split)  # the split's sub-folder
        assert len(back) == len(ref) and back.classes == tuple(sorted(set(back.classes)))
        for i, name in enumerate(back.names):
            cls, index = name[:-4].split("_")
            j = int(index)
            assert torch.equal(back.x[i], ref.x[j]) and cls == NAMES[int(ref.labels[j])]
    # nothing half-written: an existing non-empty output is refused before anything is read
    assert main(["data", "cifar10", "--from", str(archive), "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["data", "cifar10", "--from", str(tmp_path / "missing.tar.gz"), "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


def _save_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_image_folder_grey_colour_labels_and_recursion(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(4, 6, 8), dtype=np.uint8)
    for i, img in enumerate(grey):
        _save_png(tmp_path / "g" / ("a" if i % 2 else "b") / f"{'cat' if i < 2 else 'dog'}_{i}.png", img)
    (tmp_path / "g" / "notes.txt").write_text("ignored")
    (tmp_path / "g" / ".hidden.png").write_bytes(b"not an image, and hidden")
    data = read_image_folder(tmp_path / "g")
    assert data.x.shape == (4, 1, 6, 8) and data.grid == GRID_8BIT
    assert data.classes == ("cat", "dog") and sorted(data.labels.tolist()) == [0, 0, 1, 1]
    by_name = dict(zip(data.names, data.x))
    assert torch.equal(by_name["a/cat_1.png"][0], from_uint8(grey[1][None, None])[0, 0])
    rgba = rng.integers(0, 256, size=(5, 5, 4), dtype=np.uint8)
    _save_png(tmp_path / "c" / "x.png", rgba, "RGBA")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "c" / "y.jpg", quality=95)
    colour = read_image_folder(tmp_path / "c")
    assert colour.x.shape == (2, 3, 5, 5) and colour.labels is None
    assert torch.equal(colour.x[0], from_uint8(rgba[..., :3].transpose(2, 0, 1)[None])[0])
    sample = load_data(str(tmp_path / "g"), limit=2, seed=3)
    assert len(sample) == 2 and set(sample.names) <= set(data.names)


def test_corrupt_and_mismatched_images_are_named(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        _save_png(tmp_path / f"ok_{i}.png", rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
    good = (tmp_path / "ok_0.png").read_bytes()
    (tmp_path / "broken_a.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "broken_b.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match=r"2 unreadable image file\(s\): broken_a.png .*broken_b.jpg"):
        read_image_folder(tmp_path)
    (tmp_path / "broken_a.png").unlink()
    (tmp_path / "broken_b.jpg").unlink()
    _save_png(tmp_path / "big_0.png", rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="differ in size.*big_0.png"):
        read_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no png/jpg/jpeg images"):
        read_image_folder(tmp_path / "empty")


def test_npy_arrays(tmp_path):
    rng = np.random.default_rng(2)
    nhwc = rng.integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", nhwc)
    data = read_npy(tmp_path / "a.npy")
    assert data.x.shape == (5, 3, 4, 4) and data.grid == GRID_8BIT
    assert torch.equal(data.x, from_uint8(nhwc.transpose(0, 3, 1, 2)))
    np.save(tmp_path / "f.npy", data.x.numpy())
    assert torch.equal(load_data(str(tmp_path / "f.npy")).x, data.x)
    assert load_data(str(tmp_path / "f.npy")).grid == GRID_8BIT
    digits = load_data("digits", "test")
    np.save(tmp_path / "d.npy", digits.x.numpy())
    assert read_npy(tmp_path / "d.npy").grid.levels == 17
    np.save(tmp_path / "c.npy", np.full((3, 1, 2, 2), 0.123, dtype=np.float32))
    assert read_npy(tmp_path / "c.npy").grid is None
    np.save(tmp_path / "big.npy", np.full((3, 1, 2, 2), 3.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"scaled to \[-1, 1\]"):
        read_npy(tmp_path / "big.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled objects"):
        read_npy(tmp_path / "obj.npy")


def test_builtin_digits_and_bad_specs():
    train, test = load_data("digits", "train"), load_data("digits", "test")
    assert train.shape == (1, 8, 8) and test.shape == (1, 8, 8) and train.grid.levels == 17
    assert len(train) == 1497 and len(test) == 300
    assert train.fingerprint() != test.fingerprint() and test.fingerprint() == load_data("digits", "test").fingerprint()
    with pytest.raises(ValueError, match="not a built-in set"):
        load_data("no-such-thing")
    with pytest.raises(ValueError, match="split"):
        load_data("digits", "val")


def test_itd_data_info(capsys):
    assert main(["data", "info", "--data", "digits", "--split", "test"]) == 0
    assert "300 images of shape (1, 8, 8), 17 levels" in capsys.readouterr().out
