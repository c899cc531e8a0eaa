"""``diffiml bench memory``: peak resident memory of one whole localization of a huge JPEG, in a fresh process.

The peak is the child's ``VmHWM`` (the high-water mark of its own address space), not ``getrusage().ru_maxrss``: on
Linux, ru_maxrss survives ``execve``, so a child reports its parent's resident size at spawn time if that was larger.
The child has a plain environment: what an application embedding the runtime sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

PEAK_OF_THIS_PROCESS = textwrap.dedent("""
    def peak_kib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
""")


def run_child(code: str) -> str:
    """Run ``code`` (with ``peak_kib()`` defined) in a fresh interpreter with a plain environment; its stdout."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "OMP_NUM_THREADS") if k in os.environ}
    return subprocess.run([sys.executable, "-c", PEAK_OF_THIS_PROCESS + code], capture_output=True, text=True,
                          check=True, env=env).stdout


def peak_memory_of_localization(bundle: str | Path, size: int, workdir: str | Path) -> dict[str, Any]:
    """Write a size × size JPEG into ``workdir``, localize it (full-size mask included) in a child, report its peak."""
    if not Path("/proc/self/status").exists():
        raise RuntimeError("bench memory reads the peak from /proc (Linux only)")
    big = Path(workdir) / f"square_{size}.jpg"
    run_child(textwrap.dedent(f"""
        import cv2, numpy as np
        img = np.zeros(({size}, {size}, 3), np.uint8)
        img[{size // 4}:{size // 2}, {size // 4}:{size // 2}] = 200
        cv2.imwrite({str(big)!r}, img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    """))
    try:
        peak_kib = int(run_child(textwrap.dedent(f"""
            from diffiml.runtime import Localizer
            r = Localizer.open({str(Path(bundle).resolve())!r}, backend="ort-cpu").localize({str(big)!r})
            assert r.mask.shape == ({size}, {size})
            print(peak_kib())
        """)))
    finally:
        big.unlink(missing_ok=True)
    return {"bundle": str(bundle), "image": f"{size}x{size} JPEG", "peak_rss_mib": round(peak_kib / 1024, 1)}
