"""``diffiml scan`` on Ray Data: one row per input, the masks of ``localize``, nothing lost or done twice when the
driver or a worker is killed, and the same outputs on a cluster the test starts (``--address``).

Every Ray here runs in its own short temporary folder (RAY_TMPDIR / --temp-dir) and in its own session, so the
tests find, and end, only their own Ray processes (never ``ray stop``, which ends every Ray of the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("ray")

from diffiml.cli import main  # noqa: E402
from diffiml.runtime.scan.driver import choose_layout  # noqa: E402
from diffiml.runtime.scan.inputs import list_inputs, map_stem  # noqa: E402
from diffiml.runtime.scan.table import SCHEMA, read_all_rows, read_scan_table, write_part  # noqa: E402

SETTINGS = ["--seed", "3", "--ensemble", "2", "--steps", "2", "--uncertainty", "--backend", "ort-cpu"]
MAP_KINDS = ("mask", "prob", "overlay", "uncertainty")


@pytest.fixture
def ray_tmp(monkeypatch):
    """A short private folder for Ray's sockets and logs (a Unix socket path must stay under 108 bytes)."""
    path = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth color fields with a pasted block: PNGs that compress like photos, not like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([np.sin(x / rng.uniform(5, 40) + c) * np.cos(y / rng.uniform(5, 40)) for c in range(3)], -1)
    img = ((img + 1) * 127).astype(np.uint8)
    img[h // 4 : h // 2, w // 3 : w // 2] = rng.integers(0, 255, 3, dtype=np.uint8)
    return img


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """(root, good, bad) inputs as scan names them. Good: PNG, JPEG, two files of one stem in different folders,
    one named by a ``file://`` URI in a list file. Bad: random bytes, a text file named .png, a truncated JPEG, a
    PNG whose header claims 30000 x 30000 pixels, a path that does not exist."""
    import struct
    import zlib

    root = tmp_path_factory.mktemp("mixed")
    for sub in "abc":
        (root / sub).mkdir()
    good = [root / "a" / "same.png", root / "b" / "same.png", root / "a" / "wide.jpg", root / "a" / "tall.png",
            root / "c" / "by_uri.png"]
    for i, (path, (h, w)) in enumerate(zip(good, [(48, 64), (64, 48), (60, 90), (90, 40), (50, 50)], strict=True)):
        cv2.imwrite(str(path), _photo(h, w, i))
    (root / "list.txt").write_text(f"{good[-1].as_uri()}\n")
    bad = [root / "a" / "corrupt.jpg", root / "a" / "text.png", root / "a" / "truncated.jpg", root / "a" / "huge.png"]
    bad[0].write_bytes(np.random.default_rng(9).integers(0, 255, 3000, dtype=np.uint8).tobytes())
    bad[1].write_text("this is not an image\n")
    ok, jpeg = cv2.imencode(".jpg", _photo(80, 80, 7))
    bad[2].write_bytes(jpeg.tobytes()[: len(jpeg) // 3])
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    bad[3].write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)))
    return root, [str(p) for p in good[:-1]] + [good[-1].as_uri()], [str(p) for p in bad] + [str(root / "gone.png")]


def _scan_args(root: Path) -> list[str]:
    return [str(root / "a"), str(root / "b"), str(root / "list.txt"), str(root / "gone.png")]


@pytest.fixture(scope="module")
def local_scan(tiny_bundle, mixed_folder, tmp_path_factory) -> tuple[Path, dict]:
    """One local scan of the mixed inputs (the reference for the cluster test too)."""
    root, _, _ = mixed_folder
    out = tmp_path_factory.mktemp("scan")
    ray_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    done = subprocess.run([sys.executable, "-m", "diffiml.cli", "scan", *_scan_args(root), "--out", str(out),
                           "--bundle", str(tiny_bundle), "--actors", "2", "--threads-per-actor", "1",
                           "--batch-size", "3", "--no-progress", *SETTINGS],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_TMPDIR": ray_dir})
    shutil.rmtree(ray_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    return out, json.loads(done.stdout.strip().splitlines()[-1])


def test_every_input_has_one_row_and_bad_ones_say_why(local_scan, mixed_folder):
    out, summary = local_scan
    _, good, bad = mixed_folder
    rows = {r["path"]: r for r in read_scan_table(out)}
    assert sorted(rows) == sorted(good + bad)
    assert read_all_rows(out).num_rows == len(rows)
    assert (summary["localized"], summary["failed"], summary["skipped"]) == (len(good), len(bad), 0)
    reasons = {"corrupt.jpg": "not a decodable image", "text.png": "not a decodable image",
               "truncated.jpg": "not a decodable image", "huge.png": "exceeds the limit", "gone.png": "no such file"}
    for path in bad:
        row = rows[path]
        assert row["error"].startswith(path) and reasons[Path(path).name] in row["error"], row["error"]
        assert json.loads(row["outputs"]) == {}
        if Path(path).name == "gone.png":  # unreadable: no content to judge, so the next run tries it again
            assert row["error_kind"] == "read" and row["sha256"] is None
        else:
            assert row["error_kind"] == "input" and row["sha256"]
    for path in good:
        row = rows[path]
        local = path.removeprefix("file://")
        assert row["error"] is None and (row["width"], row["height"]) == cv2.imread(local).shape[1::-1]
        assert row["members"] == 2 and row["steps"] == 2 and row["seed"] == 3 and row["backend"] == "ort-cpu"
        assert set(json.loads(row["outputs"])) == set(MAP_KINDS)
    settings = json.loads((out / "scan.json").read_text())
    assert settings["seed"] == 3 and settings["actors"] == 2 and settings["runs"][-1]["localized"] == len(good)


def test_maps_are_the_bytes_localize_writes_for_the_same_seed(local_scan, mixed_folder, tiny_bundle, tmp_path,
                                                              capsys, monkeypatch):
    monkeypatch.setenv("DIFFIML_THREADS", "1")  # as the scan's actors run: one onnxruntime thread each
    out, _ = local_scan
    _, good, _ = mixed_folder
    rows = {r["path"]: r for r in read_scan_table(out)}
    for i, path in enumerate(good):  # one folder each: the two `same.png` would overwrite each other
        local = Path(path.removeprefix("file://"))
        assert main(["localize", str(local), "--out", str(tmp_path / str(i)), "--bundle", str(tiny_bundle),
                     *SETTINGS]) == 0
        outputs = json.loads(rows[path]["outputs"])
        for kind in MAP_KINDS:
            ours = (out / outputs[kind]).read_bytes()
            assert ours == (tmp_path / str(i) / f"{local.stem}_{kind}.png").read_bytes(), (path, kind)
    capsys.readouterr()


def test_equal_stems_in_different_folders_get_different_map_names(local_scan, mixed_folder):
    out, _ = local_scan
    _, good, _ = mixed_folder
    a, b = (json.loads(r["outputs"])["mask"] for r in read_scan_table(out) if r["path"] in good[:2])
    assert a != b and (out / a).read_bytes() != (out / b).read_bytes()
    shard, stem = map_stem(good[0])
    assert Path(a).name == f"{stem}_mask.png" and stem.startswith("same_") and Path(a).parent.name == shard


def test_the_report_reads_the_scan_table(local_scan, mixed_folder):
    from diffiml.runtime.report import writer as report

    out, _ = local_scan
    _, good, bad = mixed_folder
    page = report.write_report(out).read_text()
    rows = "".join(f.read_text() for f in sorted((out / report.ROWS_DIR).glob("*.js")))
    assert all(Path(p).name in rows for p in good + bad)
    assert all(Path(p).name in page for p in bad)  # the failures' first screen is in the page itself


def test_list_files_name_inputs_relative_to_themselves(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "imgs").mkdir()
    (tmp_path / "list.txt").write_text("# photos\nimgs/x.png\n\n/abs/y.jpg\ns3://bucket/z.png\nimgs/x.png\n")
    (tmp_path / "list.csv").write_text("path,label\nimgs/w.png,1\n")
    pq.write_table(pa.table({"path": ["imgs/v.png"]}), tmp_path / "list.parquet")
    got = list_inputs([str(tmp_path / "list.txt"), str(tmp_path / "list.csv"), str(tmp_path / "list.parquet")])
    assert got == [str(tmp_path / "imgs/x.png"), "/abs/y.jpg", "s3://bucket/z.png", str(tmp_path / "imgs/w.png"),
                   str(tmp_path / "imgs/v.png")]


def test_a_csv_list_without_a_path_column_is_one_line(tmp_path, tiny_bundle, capsys):
    (tmp_path / "list.csv").write_text("file\nx.png\n")
    assert main(["scan", str(tmp_path / "list.csv"), "--out", str(tmp_path / "o"), "--bundle", str(tiny_bundle)]) == 2
    assert "needs a 'path' column" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [(["--actors", "0"], "--actors must be >= 1"),
                                           (["--batch-size", "0"], "--batch-size must be >= 1"),
                                           (["--steps", "3"], "no schedule for 3 steps")])
def test_bad_arguments_are_one_line_before_ray_starts(args, message, tiny_bundle, mixed_folder, tmp_path, capsys):
    code = main(["scan", str(mixed_folder[0] / "a"), "--out", str(tmp_path / "o"), "--bundle", str(tiny_bundle),
                 *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_rerunning_into_a_folder_with_other_settings_is_refused(local_scan, mixed_folder, tiny_bundle, capsys):
    out, _ = local_scan
    changed = [a if a != "3" else "4" for a in SETTINGS]  # another seed
    assert main(["scan", str(mixed_folder[0] / "a"), "--out", str(out), "--bundle", str(tiny_bundle), *changed]) == 2
    assert "other settings (seed 3 -> 4)" in capsys.readouterr().err


def test_an_unreachable_address_is_one_line(mixed_folder, tiny_bundle, tmp_path, capsys):
    code = main(["scan", str(mixed_folder[0] / "a"), "--out", str(tmp_path / "o"), "--bundle", str(tiny_bundle),
                 "--address", f"127.0.0.1:{_free_port()}"])
    assert code == 2 and "cannot reach the Ray cluster" in capsys.readouterr().err


def test_the_table_keeps_the_newest_row_per_path(tmp_path):
    import pyarrow as pa

    def rows(run: str, *items: tuple[str, str, str | None]) -> pa.Table:
        return pa.Table.from_pylist([{"path": p, "sha256": s, "error_kind": k, "error": k, "run_id": run}
                                     for p, s, k in items], schema=SCHEMA)

    write_part(tmp_path, rows("1", ("x", "aa", None), ("y", None, "read"), ("z", "cc", "input")), "1", 0)
    write_part(tmp_path, rows("2", ("x", "bb", None), ("y", "dd", None)), "2", 0)
    from diffiml.runtime.scan.table import done_index

    assert [(r["path"], r["sha256"]) for r in read_scan_table(tmp_path)] == [("z", "cc"), ("x", "bb"), ("y", "dd")]
    done = done_index(tmp_path).to_pylist()
    assert {r["path_bytes"]: r["sha256"] for r in done} == {b"x": "bb", b"y": "dd", b"z": "cc"}


def test_layouts_leave_cpu_for_the_reads_and_give_gpus_one_actor_each():
    two = choose_layout({"CPU": 2.0})
    assert (two.actors, two.threads) == (2, 1) and two.actors * two.actor_cpus <= 2 - 0.5
    assert choose_layout({"CPU": 2.0}, threads=2).actors == 1
    big = choose_layout({"CPU": 64.0, "GPU": 4.0})
    assert (big.actors, big.actor_gpus) == (4, 1.0) and big.actors * big.actor_cpus < 64
    assert choose_layout({"CPU": 64.0, "GPU": 4.0}, backend="ort-cpu").actor_gpus == 0
    assert choose_layout({"CPU": 8.0}, actors=3, threads=4, batch_size=5).batch_size == 5
    assert choose_layout({"CPU": 2.0}, inputs=6).batch_size == 2  # two batches per actor at least


# --- killing the driver or a worker ------------------------------------------------------------------------------

def _session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of one session: the scan's driver and every Ray process it started."""
    from diffiml.benchmarks.scan_bench import proc_stat_fields

    return [pid for pid, fields in proc_stat_fields().items() if int(fields[3]) == sid and fields[0] != "Z"]


def _end_session(sid: int, wait_s: float = 20.0) -> list[int]:
    """Wait for a killed driver's Ray processes to end, then SIGKILL what is left; returns those left over."""
    deadline = time.monotonic() + wait_s
    while _session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _session_processes(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    """Enough work (large PNGs to decode and write) that a scan is still running when its first part appears."""
    folder = tmp_path_factory.mktemp("big")
    for i in range(16):
        cv2.imwrite(str(folder / f"img{i:02d}.png"), _photo(900, 1200, i))
    return folder


def _start_scan(folder: Path, out: Path, bundle: Path, ray_dir: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "diffiml.cli", "scan", str(folder), "--out", str(out),
                             "--bundle", str(bundle), "--batch-size", "1", "--actors", "1", "--no-progress",
                             *SETTINGS], start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "RAY_TMPDIR": ray_dir})


def _wait_for_parts(out: Path, proc: subprocess.Popen, n: int = 1, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list((out / "rows").glob("part-*.parquet"))) < n:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no part was written"
        time.sleep(0.05)


def test_a_killed_driver_resumes_without_losing_or_redoing_work(big_folder, tiny_bundle, tmp_path, ray_tmp,
                                                               capsys):
    out = tmp_path / "out"
    proc = _start_scan(big_folder, out, tiny_bundle, ray_tmp)
    try:
        _wait_for_parts(out, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        left = _end_session(proc.pid, wait_s=60)  # usually 2 s; a worker may wait ~25 s to notice its raylet died
    assert left == [], f"Ray processes outlived the killed driver by a minute: {left}"
    first = read_all_rows(out).to_pylist()
    assert 0 < len(first) < 16, "the driver was killed after it had finished: no resume to test"
    mtimes = {o: (out / o).stat().st_mtime_ns for r in first for o in json.loads(r["outputs"]).values()}
    assert all((out / o).is_file() for o in mtimes)  # a row exists only when its files do

    assert main(["scan", str(big_folder), "--out", str(out), "--bundle", str(tiny_bundle), "--batch-size", "4",
                 "--no-progress", *SETTINGS]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = read_all_rows(out).to_pylist()
    assert len(rows) == 16 and len({r["path"] for r in rows}) == 16  # every input once: nothing lost or twice
    assert summary["skipped"] == len(first) and summary["localized"] == 16 - len(first)
    assert {r["run_id"] for r in rows if r["path"] in {f["path"] for f in first}} == {first[0]["run_id"]}
    assert {o: (out / o).stat().st_mtime_ns for o in mtimes} == mtimes  # the first run's maps were not rewritten


def test_a_killed_worker_costs_its_batch_not_the_job(big_folder, tiny_bundle, tmp_path, ray_tmp):
    out = tmp_path / "out"
    proc = _start_scan(big_folder, out, tiny_bundle, ray_tmp)
    try:
        _wait_for_parts(out, proc)
        workers = [p for p in _session_processes(proc.pid)
                   if b"ScanWorker" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 1
        before_kill = read_all_rows(out).num_rows
        os.kill(workers[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        _end_session(proc.pid, wait_s=0)
    assert proc.returncode == 0, stderr.decode()
    assert before_kill < 16  # the actor died with images left to do: a replacement finished them
    rows = read_all_rows(out).to_pylist()
    assert len(rows) == 16 and len({r["path"] for r in rows}) == 16 and all(r["error"] is None for r in rows)
    assert json.loads(stdout.decode().splitlines()[-1])["localized"] == 16


# --- a cluster started by the test ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_address_runs_on_an_existing_cluster_with_the_same_outputs(local_scan, mixed_folder, tiny_bundle, tmp_path,
                                                                    ray_tmp):
    port = _free_port()
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--num-cpus=2",
                             "--disable-usage-stats", "--include-dashboard=false", f"--port={port}",
                             f"--temp-dir={ray_tmp}", "--block"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(Path(ray_tmp).glob("session_*/sockets/raylet")):
            assert head.poll() is None and time.monotonic() < deadline, "ray start did not come up"
            time.sleep(0.2)
        root, _, _ = mixed_folder
        out = tmp_path / "cluster"
        # An explicit address sends the token only when asked to (RAY_AUTH_MODE=token; README, "On a cluster").
        done = subprocess.run([sys.executable, "-m", "diffiml.cli", "scan", *_scan_args(root), "--out", str(out),
                               "--bundle", str(tiny_bundle), "--address", f"127.0.0.1:{port}", "--no-progress",
                               *SETTINGS], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "RAY_AUTH_MODE": "token"})
    finally:
        head.terminate()
        _end_session(head.pid, wait_s=5)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "scan.json").read_text())["address"] == f"127.0.0.1:{port}"
    local = {r["path"]: r for r in read_scan_table(local_scan[0])}
    remote = {r["path"]: r for r in read_scan_table(out)}
    assert sorted(local) == sorted(remote)
    for path, row in remote.items():
        assert (row["error"], row["score"]) == (local[path]["error"], local[path]["score"])
        for kind, name in json.loads(row["outputs"]).items():
            assert (out / name).read_bytes() == (local_scan[0] / name).read_bytes(), (path, kind)


def test_a_bundle_with_other_cue_settings_does_not_resume_an_old_scan(tiny_bundle, tmp_path):
    """The cue's settings (not only whether it ran) and the detector are part of what a rerun must share: a re-export
    with another residual threshold would otherwise resume into the old folder and mix rows."""
    import argparse

    from diffiml.runtime.errors import DiffimlError
    from diffiml.runtime.scan.driver import _check_same_settings, scan_settings

    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["copy_move_cue"]["residual_threshold"] = 0.5
    (other / "manifest.json").write_text(json.dumps(manifest))

    def settings(bundle):
        return scan_settings(argparse.Namespace(bundle=str(bundle), steps=None, precision="fp32", ensemble=None,
                                                backend="ort-cpu", tta=False, seed=0, uncertainty=False,
                                                copy_move=True, follow_decision=False))

    first = settings(tiny_bundle)
    (tmp_path / "scan.json").write_text(json.dumps(first))
    _check_same_settings(tmp_path, settings(tiny_bundle))  # the same bundle resumes
    with pytest.raises(DiffimlError, match="cue_settings"):
        _check_same_settings(tmp_path, settings(other))
    assert first["opencv"] == cv2.__version__ and first["detector_sha256"] is None


# --- a million inputs: names, the index, the lock, poison inputs -------------------------------------------------

def test_a_rerun_skips_by_path_size_and_mtime_and_verify_rehashes(tmp_path):
    import pyarrow as pa

    from diffiml.runtime.scan.driver import plan_work
    from diffiml.runtime.scan.table import done_index

    files = [tmp_path / f"{c}.png" for c in "abc"]
    for f in files:
        f.write_bytes(b"x" * 10)
    st = [f.stat() for f in files]
    rows = [{"path": str(f), "sha256": "s", "size": s.st_size, "mtime_ns": s.st_mtime_ns, "run_id": "1"}
            for f, s in zip(files, st, strict=True)]
    rows[2]["error_kind"], rows[2]["error"] = "run", "failed"  # not final: computed again
    write_part(tmp_path, pa.Table.from_pylist(rows, schema=SCHEMA), "1", 0)
    os.utime(files[1], ns=(st[1].st_atime_ns, st[1].st_mtime_ns + 1))  # touched: read again (hashed)
    inputs = [str(f) for f in files] + ["s3://bucket/x.png"]
    work, skipped = plan_work(inputs, done_index(tmp_path))
    assert skipped == 1 and [os.fsdecode(k) for k in work.column("path_bytes").to_pylist()] == inputs[1:]
    assert work.column("done_sha256").to_pylist() == ["s", None, None]  # the touched file is skipped if unchanged
    work, skipped = plan_work(inputs, done_index(tmp_path), verify=True)
    assert skipped == 0 and work.num_rows == 4


def test_compaction_keeps_the_newest_row_per_input_in_one_part(tmp_path):
    import pyarrow as pa

    from diffiml.runtime.scan.table import compact, part_files

    for run, sha in (("1", "old"), ("2", "new")):
        write_part(tmp_path, pa.Table.from_pylist([{"path": p, "sha256": sha, "run_id": run} for p in "xy"],
                                                  schema=SCHEMA), run, 0)
    write_part(tmp_path, pa.Table.from_pylist([{"path": "z", "sha256": "only", "run_id": "2"}], schema=SCHEMA), "2", 1)
    before = read_scan_table(tmp_path)
    compact(tmp_path, "2")
    assert len(part_files(tmp_path)) == 1
    assert read_scan_table(tmp_path) == before and read_all_rows(tmp_path).num_rows == 3


def test_a_second_scan_into_a_locked_folder_is_one_line(tmp_path, tiny_bundle, mixed_folder, capsys):
    from diffiml.files import exclusive_lock

    out = tmp_path / "o"
    out.mkdir()
    with exclusive_lock(out / ".scan.lock") as held:
        assert held
        code = main(["scan", str(mixed_folder[0] / "a"), "--out", str(out), "--bundle", str(tiny_bundle)])
    err = capsys.readouterr().err
    assert code == 2 and "another scan is writing" in err and len(err.strip().splitlines()) == 1
    with exclusive_lock(out / ".scan.lock") as held:
        assert held  # released with its holder


def test_the_printed_cause_of_a_ray_failure_is_the_error_not_rays_hint():
    import ray.exceptions

    from diffiml.runtime.scan.driver import _cause

    try:
        "caf\udce9".encode()
    except UnicodeEncodeError as exc:
        wrapped = ray.exceptions.RayTaskError("read_batch", "Traceback (most recent call last):\n  File x\n"
                                              "UnicodeEncodeError: ...\n\nRetry the task if ...", exc)
    assert _cause(wrapped).startswith("UnicodeEncodeError: 'utf-8' codec can't encode")


def test_names_that_are_not_utf8_and_an_input_that_kills_its_worker(tiny_bundle, tmp_path, ray_tmp):
    """A name in Latin-1 bytes is scanned like any other and shown escaped; an input that ends its worker process
    is tried MAX_ATTEMPTS times, then has a row saying so, and the rest of the job finishes; a rerun redoes nothing."""
    from diffiml.runtime.scan.worker import FAULT_ENV, MAX_ATTEMPTS

    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate((b"good.png", b"caf\xe9.png", b"poison.png")):
        Path(os.fsdecode(os.path.join(os.fsencode(folder), name))).write_bytes(
            cv2.imencode(".png", _photo(40, 56, i))[1].tobytes())
    out = tmp_path / "out"
    command = [sys.executable, "-m", "diffiml.cli", "scan", str(folder), "--out", str(out), "--bundle",
               str(tiny_bundle), "--batch-size", "1", "--actors", "1", "--no-progress", "--report", *SETTINGS]
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, FAULT_ENV: "poison"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    rows = {r["path"]: r for r in read_scan_table(out)}
    latin = str(folder) + "/caf\\xe9.png"
    assert set(rows) == {str(folder / "good.png"), latin, str(folder / "poison.png")}
    assert rows[latin]["error"] is None and rows[latin]["path_bytes"] == os.fsencode(folder) + b"/caf\xe9.png"
    poison = rows[str(folder / "poison.png")]
    assert poison["error_kind"] == "input" and f"ended its worker process {MAX_ATTEMPTS} times" in poison["error"]
    assert "caf\\\\xe9.png" in (out / "report-rows" / "ranked-00000.js").read_text()  # escaped, in the rows' JSON
    again = subprocess.run(command, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "RAY_TMPDIR": ray_tmp})
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["skipped"] == 3


def test_the_driver_bench_skips_every_input_of_a_finished_table(tmp_path):
    from diffiml.benchmarks.scan_driver import bench_scan_driver

    row = bench_scan_driver(tmp_path, 50)
    assert (row["inputs"], row["skipped"], row["to_compute"]) == (50, 50, 0)



def test_changed_bytes_are_computed_again_and_the_same_bytes_skipped(tmp_path):
    """The read stage skips an input only for the sha256 of its final row, never for its path alone."""
    from diffiml.runtime.scan.worker import _read_one

    path = tmp_path / "x.png"
    path.write_bytes(b"first")
    first = _read_one(os.fsencode(path), None)
    assert not first["skip"] and _read_one(os.fsencode(path), first["sha256"])["skip"]
    path.write_bytes(b"other")
    again = _read_one(os.fsencode(path), first["sha256"])
    assert not again["skip"] and again["data"] == b"other"


def test_scan_takes_localizes_options_the_ensemble_tolerance_included(tiny_bundle):
    import argparse

    from diffiml.runtime.scan.driver import scan_settings

    base = dict(bundle=str(tiny_bundle), steps=None, precision="fp32", backend="ort-cpu", tta=False, seed=0,
                uncertainty=False, copy_move=True, follow_decision=False)
    settings = scan_settings(argparse.Namespace(**base, ensemble="auto", ensemble_tolerance=0.01))
    assert settings["adaptive"] == 0.01
    parser = argparse.ArgumentParser()
    main_sub = parser.add_subparsers()
    from diffiml.runtime.scan.driver import add_parser

    add_parser(main_sub)
    args = parser.parse_args(["scan", "x", "--out", "o", "--ensemble", "auto", "--ensemble-tolerance", "0.05",
                              "--fast"])
    assert args.ensemble_tolerance == 0.05 and args.fast
