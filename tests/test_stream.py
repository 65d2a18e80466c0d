"""Streaming image sources equal the in-memory readers, value for value, with bounded memory."""

import numpy as np
import pytest
import torch
from PIL import Image

from itdiffusion.core.spectrum import GaussianSpectrum
from itdiffusion.data.images import load_data
from itdiffusion.data.stream import open_images

from test_images import make_cifar_archive


def _folder(tmp_path, n=7):
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)).save(tmp_path / f"c{i % 2}_{i:03d}.png")
    return tmp_path


def _same(spec, split="train", **kw):
    ref = load_data(str(spec), split, **kw)
    src = open_images(str(spec), split, **kw)
    got = src.load()
    assert torch.equal(got.x, ref.x) and got.grid == ref.grid and len(src) == len(ref) and src.shape == ref.shape
    assert (got.labels is None) == (ref.labels is None)
    if ref.labels is not None:
        assert torch.equal(got.labels, ref.labels) and got.classes == ref.classes
    assert src.fingerprint() == ref.fingerprint()
    return src, ref


@pytest.mark.parametrize("limit", [None, 3])
def test_every_kind_of_source_equals_load_data(tmp_path, limit):
    (tmp_path / "f").mkdir()
    _same(_folder(tmp_path / "f"), limit=limit)
    rng = np.random.default_rng(1)
    np.save(tmp_path / "u8.npy", rng.integers(0, 256, (9, 2, 3, 3), dtype=np.uint8))
    np.save(tmp_path / "f.npy", rng.uniform(-1, 1, (9, 3, 2, 2)).astype(np.float32))
    np.save(tmp_path / "grid.npy", (rng.integers(0, 256, (9, 4, 4)) / 127.5 - 1).astype(np.float32))
    for name in ("u8.npy", "f.npy", "grid.npy"):
        _same(tmp_path / name, limit=limit)
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_archive(archive)
    for split in ("train", "test"):
        _same(archive, split, limit=limit)
    _same("digits", "test", limit=limit)


def test_indexing_chunks_and_dataloader(tmp_path):
    src, ref = _same(_folder(tmp_path))
    assert torch.equal(src[3], ref.x[3]) and torch.equal(src[-1], ref.x[-1])
    order = torch.tensor([5, 0, 2, 2])
    assert torch.equal(src[order], ref.x[order])
    assert torch.equal(torch.cat(list(src.chunks(3, 1, 6))), ref.x[1:6])
    loader = torch.utils.data.DataLoader(src, batch_size=4, num_workers=1)
    assert torch.equal(torch.cat(list(loader)), ref.x)
    with pytest.raises(IndexError):
        src[7]


def test_npy_is_memory_mapped_and_checked(tmp_path):
    x = np.zeros((4, 1, 2, 2), np.float32)
    x[2, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(ValueError, match="NaN"):
        open_images(str(tmp_path / "nan.npy"))
    np.save(tmp_path / "big.npy", np.full((4, 1, 2, 2), 3.0, np.float32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        open_images(str(tmp_path / "big.npy"))
    np.save(tmp_path / "ok.npy", np.zeros((4, 1, 2, 2), np.uint8))
    data = open_images(str(tmp_path / "ok.npy"))
    assert data.grid is not None and len(data) == 4


def test_streamed_spectrum_equals_in_memory_spectrum(tmp_path):
    rng = np.random.default_rng(2)
    np.save(tmp_path / "d.npy", rng.integers(0, 256, (3000, 1, 4, 4), dtype=np.uint8))
    ref = GaussianSpectrum.from_data(load_data(str(tmp_path / "d.npy")).x)
    got = GaussianSpectrum.from_batches(open_images(str(tmp_path / "d.npy")).chunks(700))
    for a, b in ((got.mean, ref.mean), (got.log_eigs, ref.log_eigs)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    # eigenvectors agree up to sign
    dots = (got.eigvecs * ref.eigvecs).sum(0).abs()
    assert torch.allclose(dots, torch.ones_like(dots), atol=1e-8)


def _png16(path, array, color):
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour): ``color`` 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA."""
    import struct
    import zlib

    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)  # noqa: E731
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("color,channels", [(0, 1), (2, 3), (4, 2), (6, 4)])
def test_16_bit_pngs_are_refused_not_cut_to_8_bits(tmp_path, color, channels):
    rng = np.random.default_rng(color)
    _png16(tmp_path / "a.png", rng.integers(0, 65536, (4, 4, channels)), color)
    for read in (lambda: load_data(str(tmp_path)), lambda: open_images(str(tmp_path))):
        with pytest.raises(ValueError, match=r"a\.png.*(16-bit PNG|not 8-bit)"):
            read()


def test_a_fifo_named_like_an_image_is_refused_not_read(tmp_path):
    import os

    _folder(tmp_path, 2)
    os.mkfifo(tmp_path / "c0_fifo.png")
    for read in (lambda: load_data(str(tmp_path)), lambda: open_images(str(tmp_path))):
        with pytest.raises(ValueError, match="c0_fifo.png"):
            read()


def test_workers_read_the_same_values_in_the_same_order(tmp_path):
    """DataLoader workers decode ahead of use; the chunks are those of the main process, in order."""
    from PIL import Image

    from itdiffusion.data.stream import Chunks, open_images

    rng = np.random.default_rng(0)
    for i in range(23):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    source = open_images(str(tmp_path))
    plain = list(Chunks(source, 5, 2, 21))
    ahead = list(Chunks(source, 5, 2, 21, workers=2))
    assert [len(c) for c in ahead] == [5, 5, 5, 4]
    assert all(torch.equal(a, b) for a, b in zip(plain, ahead))


def test_spectrum_with_workers_equals_without(tmp_path):
    from itdiffusion.cli import main as cli_main

    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    outs = []
    for workers in ("0", "2"):
        out = tmp_path / f"s{workers}.npz"
        assert cli_main(["spectrum", "--data", str(tmp_path), "--out", str(out), "--workers", workers]) == 0
        outs.append(GaussianSpectrum.load(out))
    assert torch.equal(outs[0].mean, outs[1].mean) and torch.equal(outs[0].log_eigs, outs[1].log_eigs)
