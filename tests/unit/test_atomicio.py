"""The one atomic-write helper: whole replacement, permissions kept, nothing left behind on failure."""

import os

import pytest

from loragate.common import atomicio


def test_replaces_whole_file_keeps_mode_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomicio.atomic_write(target, "first")
    assert target.read_text() == "first" and oct(target.stat().st_mode & 0o777) == oct(0o644)
    os.chmod(target, 0o600)
    atomicio.atomic_write(target, b"second \xc3\xa9")
    assert target.read_text() == "second é" and oct(target.stat().st_mode & 0o777) == oct(0o600)
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_failed_rename_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "routes.yaml"
    target.write_text("old")

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomicio.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        atomicio.atomic_write(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routes.yaml"]
