"""The runtime's core (bundle, backends, localizer, CLI) must import and localize with none of the optional
dependencies of its subpackages installed: Ray and pyarrow (scan, report) and PyTriton (serving). Each is blocked
here by a finder that refuses it, in a fresh interpreter so nothing imported earlier hides a dependency."""

from __future__ import annotations

import subprocess
import sys
import textwrap

OPTIONAL = ("ray", "pyarrow", "pytriton", "tritonclient", "torch")

_PROBE = textwrap.dedent("""
    import sys
    blocked = set(sys.argv[1].split(","))

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ImportError(f"blocked optional dependency: {name}")
            return None

    sys.meta_path.insert(0, Refuse())
    import diffiml.cli
    import diffiml.runtime
    import diffiml.runtime.commands
    import diffiml.runtime.localizer
    import diffiml.runtime.outputs
    import diffiml.runtime.backends.ort_backend
    diffiml.cli.build_parser()
    if len(sys.argv) > 2:  # a bundle and an image: localize them, still without the optional packages
        from diffiml.runtime import Localizer
        from diffiml.runtime.image_io import load_image
        with Localizer.open(sys.argv[2], backend="ort-cpu", steps=2, ensemble=1) as localizer:
            result = localizer.localize(load_image(sys.argv[3], localizer.bundle.image_size))
        assert result.mask.shape == (result.height, result.width)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in blocked)
    print("LEAKED" if leaked else "CLEAN", leaked)
""")


def test_the_core_imports_without_the_optional_dependencies():
    done = subprocess.run([sys.executable, "-c", _PROBE, ",".join(OPTIONAL)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("CLEAN"), done.stdout


def test_the_cli_lists_every_command_without_them():
    """``diffiml --help`` registers scan and serve, which must not import Ray or PyTriton to do so."""
    probe = _PROBE.replace('print("LEAKED"', 'import contextlib, io\n'
                           'with contextlib.redirect_stdout(io.StringIO()) as text:\n'
                           '    try:\n'
                           '        diffiml.cli.main(["--help"])\n'
                           '    except SystemExit:\n'
                           '        pass\n'
                           'assert all(c in text.getvalue() for c in ("localize", "scan", "serve", "report")), '
                           'text.getvalue()\n'
                           'leaked = sorted(m for m in sys.modules if m.split(".")[0] in blocked)\n'
                           'print("LEAKED"')
    done = subprocess.run([sys.executable, "-c", probe, ",".join(OPTIONAL)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("CLEAN"), done.stdout


def test_a_bundle_localizes_without_them(tiny_bundle, synthetic_set):
    image = next(p for p in sorted(synthetic_set.rglob("*.png")) if "mask" not in p.name)
    done = subprocess.run([sys.executable, "-c", _PROBE, ",".join(OPTIONAL), str(tiny_bundle), str(image)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("CLEAN"), done.stdout


def pinned_opencv() -> str:
    """The OpenCV version pyproject.toml pins for every environment."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    return re.search(r'"opencv-python-headless==([\d.]+)"', text).group(1)


def test_opencv_is_the_pinned_version():
    """The copy-move cue's keypoints differ between OpenCV versions: every environment runs the pinned one (the
    serving environment checks the same in tests/serving)."""
    import cv2

    assert pinned_opencv().startswith(cv2.__version__ + "."), (cv2.__version__, pinned_opencv())
