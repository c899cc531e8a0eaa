"""The one atomic writer: the target appears whole or not at all, and no temporary is left behind."""

import numpy as np
import pytest

from diffiml.files import atomic_path, write_png_atomic, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_the_temporary_keeps_the_suffix_so_encoders_pick_the_format(tmp_path):
    with atomic_path(tmp_path / "x.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp.name.startswith(".x.")
    write_png_atomic(tmp_path / "m.png", np.zeros((4, 5), np.uint8))
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(OSError, match="could not be written"):
        write_png_atomic(tmp_path / "bad.png", np.zeros((0, 0), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "x.png"]
