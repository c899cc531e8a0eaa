"""The one atomic writer: the target appears whole or not at all, and no temporary is left behind."""

import os
import stat

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


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_mode_a_plain_open_would_give(tmp_path, umask, mode):
    """mkstemp's temporaries are owner-only; the renamed output must follow the umask, as any tool's output does (a
    shared --out or report folder)."""
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "out.txt", "x")
        with atomic_path(tmp_path / "durable.bin", durable=True) as tmp:
            tmp.write_bytes(b"y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "durable.bin").stat().st_mode) == mode
    assert (tmp_path / "durable.bin").read_bytes() == b"y"


def test_a_scan_table_part_cut_short_is_skipped_not_fatal(tmp_path):
    """A zero-length part (a crash before parts were fsynced) must not stop every later rerun and report: it is
    skipped, and its inputs, absent from the done index, are scanned again."""
    pa = pytest.importorskip("pyarrow")
    from diffiml.runtime.scan.table import COLUMNS, SCHEMA, done_index, part_files, write_part

    row = {name: None for name in COLUMNS} | {"path": "/a.png", "sha256": "ab", "error_kind": None}
    write_part(tmp_path, pa.Table.from_pylist([row], schema=SCHEMA), "run1", 0)
    (tmp_path / "rows" / "part-run1-000001.parquet").write_bytes(b"")
    assert len(part_files(tmp_path)) == 2
    assert [(r["path_bytes"], r["sha256"]) for r in done_index(tmp_path).to_pylist()] == [(b"/a.png", "ab")]
