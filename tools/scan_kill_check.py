"""The issue's acceptance check for ``diffiml scan`` at full size (too slow for ``make test``, whose tests do the same
on a few images): a folder of N images, a tenth of them bad, scanned once without interruption and once killed
(SIGKILL of the driver's process group) half-way and run again into the same folder. Prints whether every input has
exactly one row and whether the two tables agree (rows, scores, mask PNG bytes).

    python tools/scan_kill_check.py --photos PHOTO_DIR --n 200 --work out/scan-check [--json RESULT.json]
        [-- extra scan arguments]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def make_folder(folder: Path, photos: Path, n: int) -> list[Path]:
    """n - n/10 photos copied, n/10 bad files (corrupt bytes, a text file, a truncated JPEG, an empty file)."""
    folder.mkdir(parents=True)
    found = sorted(p for p in photos.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    bad = n // 10
    good = [folder / f"{i:04d}_{p.name}" for i, p in enumerate(found[: n - bad])]
    for src, dst in zip(found, good, strict=False):
        shutil.copyfile(src, dst)
    jpeg = next(p for p in good if p.suffix.lower() in (".jpg", ".jpeg"))
    for i in range(bad):
        path = folder / f"bad_{i:03d}.{('png', 'jpg', 'png', 'jpg')[i % 4]}"
        path.write_bytes([os.urandom(5000), b"not an image\n", jpeg.read_bytes()[:3000], b""][i % 4])
    return sorted(folder.iterdir())


def scan(folder: Path, out: Path, extra: list[str], kill_after_rows: int | None = None) -> int:
    cmd = [sys.executable, "-m", "diffiml.cli", "scan", str(folder), "--out", str(out), "--no-progress", *extra]
    proc = subprocess.Popen(cmd, start_new_session=True)
    if kill_after_rows is None:
        return proc.wait()
    while proc.poll() is None:
        if rows(out) >= kill_after_rows:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            time.sleep(5)  # the killed driver's Ray processes exit on their own
            return -9
        time.sleep(0.5)
    return proc.returncode


def rows(out: Path) -> int:
    from diffiml.runtime.scan.table import read_all_rows

    return read_all_rows(out).num_rows if (out / "rows").is_dir() else 0


def table(out: Path) -> dict[str, tuple]:
    import json

    from diffiml.runtime.scan.table import read_all_rows

    result = {}
    for r in read_all_rows(out).to_pylist():
        mask = json.loads(r["outputs"]).get("mask")
        digest = hashlib.sha256((out / mask).read_bytes()).hexdigest() if mask else None
        result.setdefault(r["path"], []).append((r["sha256"], r["score"], r["error_kind"], digest))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--work", required=True, help="an empty or missing folder for the images and both scans")
    parser.add_argument("--json", default=None, help="also write the result here (atomically)")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    work = Path(args.work)
    inputs = make_folder(work / "images", Path(args.photos), args.n)
    t0 = time.perf_counter()
    whole_rc = scan(work / "images", work / "whole", extra)
    whole_s = time.perf_counter() - t0
    killed_rc = scan(work / "images", work / "killed", extra, kill_after_rows=args.n // 2)
    killed_rows = rows(work / "killed")
    rerun_rc = scan(work / "images", work / "killed", extra)
    a, b = table(work / "whole"), table(work / "killed")
    paths = {str(p.resolve()) for p in inputs}
    one_row_each = set(a) == paths == set(b) and all(len(v) == 1 for v in (*a.values(), *b.values()))
    same = {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}
    result = {"inputs": len(inputs), "bad": args.n // 10, "uninterrupted_exit": whole_rc,
              "uninterrupted_s": round(whole_s, 1), "killed_after_rows": killed_rows, "killed_exit": killed_rc,
              "rerun_exit": rerun_rc, "one_row_per_input_in_both": one_row_each,
              "same_rows_scores_errors_mask_bytes": same, "scan_arguments": extra,
              "date": time.strftime("%Y-%m-%d")}
    if args.json:
        import json

        from diffiml.files import write_text_atomic

        write_text_atomic(Path(args.json), json.dumps(result, indent=2) + "\n")
    print(f"inputs {len(inputs)} ({args.n // 10} bad); uninterrupted: exit {whole_rc}, {whole_s:.0f} s; killed after "
          f"{killed_rows} rows (exit {killed_rc}), rerun exit {rerun_rc}; every input exactly one row in both: "
          f"{one_row_each}; same rows, scores, errors and mask bytes: {same}")
    return 0 if one_row_each and same and whole_rc == rerun_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
