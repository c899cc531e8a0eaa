"""The memory bound of a huge input: a whole localization of a 20000x20000 JPEG stays under 2 GiB.

Measured by ``diffiml.benchmarks.memory`` from the child's own ``VmHWM``: ``getrusage().ru_maxrss`` survives
``execve`` on Linux, and read that way this test once reported pytest's 3.9 GiB instead of the child's peak.
"""

from pathlib import Path

import pytest

from diffiml.benchmarks.memory import peak_memory_of_localization, run_child

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak from /proc (Linux)")


def test_peak_is_read_from_the_child_not_inherited_from_the_parent():
    """A parent holding 1 GiB spawns a child that allocates nothing: the child's own peak must be small."""
    ballast = bytearray(1 << 30)  # touched by the zero fill
    out = run_child("print(peak_kib())")
    del ballast
    assert int(out) < 512 * 1024


@pytest.mark.slow
def test_a_20000_pixel_square_stays_under_2_gib(tiny_bundle, tmp_path):
    """Peak resident memory of a whole localization (decode, run, full-size mask) of a 20000x20000 JPEG."""
    result = peak_memory_of_localization(tiny_bundle, 20000, tmp_path)
    assert result["peak_rss_mib"] < 2048, f"peak RSS {result['peak_rss_mib']} MiB"
