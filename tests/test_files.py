"""Whole-file writes: a failed write leaves the old file and no temporary file."""

from __future__ import annotations

import pytest

from tta_norm._files import write_atomically


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    assert write_atomically(path, lambda tmp: tmp.write_text("old")) == path and path.read_text() == "old"

    def fail_half_way(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fail_half_way)
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]
    (tmp_path / "adir").mkdir()
    with pytest.raises(OSError):
        write_atomically(tmp_path / "adir", lambda tmp: tmp.write_text("x"))  # the rename fails: tmp removed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unwritable_ancestor_names_the_blocking_path(tmp_path):
    from tta_norm._files import unwritable_ancestor

    assert unwritable_ancestor(tmp_path / "new" / "deeper") is None  # can be made
    (tmp_path / "afile").write_text("x")
    assert unwritable_ancestor(tmp_path / "afile" / "sub") == tmp_path / "afile"
    assert unwritable_ancestor(tmp_path / "afile") == tmp_path / "afile"
