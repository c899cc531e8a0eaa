"""A user's mistake on the command line is one line on stderr and a non-zero exit, never a traceback."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args", [
    ["localize", "/nonexistent-diffiml-dir/*.png", "--out", "OUT"],
    ["make-synthetic", "OUT", "--photos", "/nonexistent-diffiml-photos", "--n", "2"],
])
def test_cli_mistakes_are_one_line_without_traceback(args, tmp_path):
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    done = subprocess.run([sys.executable, "-m", "diffiml.cli", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"diffiml {args[0]}: error:")
