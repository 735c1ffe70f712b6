"""Output folders: atomic writes and the early check that refuses an unusable output folder."""

from __future__ import annotations

import os

import pytest

from monai_multiad.errors import MultiADInputError
from monai_multiad.outputs import check_output_dir, folder_lock, write_json


def test_usable_output_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_dir("new/deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing is created by the check
    (tmp_path / "old").mkdir()
    assert check_output_dir("old") == tmp_path / "old"
    write_json("new/deeper/x.json", {"a": 1})
    assert (tmp_path / "new" / "deeper" / "x.json").read_text() == '{\n  "a": 1\n}\n'


@pytest.mark.parametrize("path, problem", [
    ("a_file", "is a file: the output folder must be a folder"),
    ("a_file/below", "a_file is a file, not a folder"),
    ("data", "is an input folder"),
    ("data/../data", "is an input folder"),
])
def test_unusable_output_folders_name_the_path(tmp_path, monkeypatch, path, problem):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "data").mkdir()
    with pytest.raises(MultiADInputError) as err:
        check_output_dir(path, inputs=("data", ""))
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and problem in msg and len(msg.splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_folder_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(MultiADInputError, match="no write permission"):
        check_output_dir(locked / "out")


def test_a_failed_command_leaves_no_folder_it_made(tmp_path):
    """The lock's folder and the parents it had to make go again when nothing was written there."""
    with pytest.raises(MultiADInputError):
        with folder_lock(tmp_path / "eval" / "bad", "multiad evaluate"):
            raise MultiADInputError("mask.png: 32x64 for a 64x64 image")
    assert list(tmp_path.iterdir()) == []
    with folder_lock(tmp_path / "eval" / "good", "multiad evaluate") as out:
        (out / "metrics.json").write_text("{}")
    with folder_lock(tmp_path / "eval" / "empty", "multiad evaluate"):
        pass
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["good"]  # kept: written, and its parent
    assert [p.name for p in (tmp_path / "eval" / "good").iterdir()] == ["metrics.json"]  # the lock gone
