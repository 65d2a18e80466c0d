"""Outputs never replace inputs, are checked before work starts, have one writer at a time, and
get the permissions a user's umask asks for (issue 16, groups 1, 4 and 5)."""

import os
import stat

import pytest

from itdiffusion import fileio
from itdiffusion.guard import OutputLock, check_outputs


def test_an_output_that_is_an_input_is_refused(tmp_path):
    data = tmp_path / "d.npy"
    data.write_bytes(b"x")
    with pytest.raises(ValueError, match="would replace the input"):
        check_outputs([data], [data], flag="--out")
    with pytest.raises(ValueError, match="would replace the input"):  # another spelling of the same file
        check_outputs([tmp_path / "sub" / ".." / "d.npy"], [str(data)])
    link = tmp_path / "link.npy"
    link.symlink_to(data)
    with pytest.raises(ValueError, match="would replace the input"):
        check_outputs([link], [data])
    with pytest.raises(ValueError, match="folder holding the input"):
        check_outputs([tmp_path], [data])
    check_outputs([tmp_path / "other.npy"], [data, "ddpm-cifar10", None, ""])  # names that are not paths: ignored


def test_unwritable_folders_and_long_names_are_refused_up_front(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="too long"):
        check_outputs([tmp_path / ("r" * 240 + ".json")], [])
    check_outputs([tmp_path / "new" / "deeper" / "r.json"], [])  # folders to be created: fine
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="is not a folder"):
        check_outputs([blocker / "r.json"], [])
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    with pytest.raises(ValueError, match="not writable"):
        check_outputs([tmp_path / "r.json"], [], flag="--out")


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "r.json"
    with OutputLock(out):
        with pytest.raises(ValueError, match="another itd run is writing it"):
            OutputLock(out).acquire()
    assert not (tmp_path / ".r.json.lock").exists()
    with OutputLock(out):  # free again
        pass
    (tmp_path / ".r.json.lock").write_text("12345\n")  # left by a killed run: reused
    with OutputLock(out):
        pass


@pytest.mark.parametrize("umask, want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_follow_the_umask(tmp_path, umask, want):
    old = os.umask(umask)
    try:
        assert fileio.current_umask() == umask
        fileio.save_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == want


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("{}")
    path.chmod(0o640)
    fileio.save_json_atomic(path, {"a": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_readers_refuse_fifos_and_huge_files_without_blocking(tmp_path):
    fifo = tmp_path / "a.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        fileio.load_json(fifo)
    for loader in (fileio.load_npz, fileio.load_npy):
        with pytest.raises(ValueError, match="not a regular file"):
            loader(fifo)
    big = tmp_path / "big.bin"
    big.write_bytes(b" " * 101)
    with pytest.raises(ValueError, match="larger than 100 bytes"):
        fileio.read_bytes(big, 100)


def test_cli_refuses_to_write_over_its_input(tmp_path, capsys):
    import numpy as np

    from itdiffusion.cli import main

    data = tmp_path / "d.npy"
    np.save(data, np.zeros((40, 1, 4, 4), np.uint8))
    before = data.read_bytes()
    assert main(["spectrum", "--data", str(data), "--out", str(data), "--diagonal"]) == 2
    assert "would replace the input" in capsys.readouterr().err
    assert data.read_bytes() == before
    spectrum = tmp_path / "s.npz"
    assert main(["spectrum", "--data", str(data), "--out", str(spectrum), "--diagonal"]) == 0
    results = tmp_path / "r.json"
    results.write_text("{}")
    assert main(["report", str(results), "--out", str(tmp_path / "table.md")]) == 2
    # a report folder that also holds the results is fine: only the report's own files are written
    assert "would replace" not in capsys.readouterr().err
