"""Copy the .pyi files of tensorrt-stubs into a stub folder for MYPYPATH.

tensorrt-stubs installs ``tensorrt/__init__.pyi`` without a ``py.typed`` marker, so mypy ignores it as an
"installed package without types". Staged as a plain stub folder, mypy checks our TensorRT code against it.
Two generator slips in the stubs are mended here: plugin signatures that name a parameter ``in`` (a Python keyword,
renamed ``in_``), and a required parameter after defaulted ones (given ``= ...``).
"""

import re
import shutil
import sys
import sysconfig
from pathlib import Path


def mend_defaults(line: str) -> str:
    """In a one-line ``def``, give every parameter after the first defaulted one a default."""
    m = re.match(r"(\s*def \w+\()(.*)(\) ->.*)", line)
    if not m or "=" not in m.group(2):
        return line
    params, seen = [], False
    for param in m.group(2).split(", "):
        seen = seen or "=" in param
        params.append(param + " = ..." if seen and "=" not in param and not param.startswith("*") else param)
    return m.group(1) + ", ".join(params) + m.group(3)


site = Path(sysconfig.get_paths()["purelib"])
out = Path(sys.argv[1])
for package in ("tensorrt", "tensorrt_bindings"):
    target = out / package
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for stub in (site / package).glob("*.pyi"):
        text = re.sub(r"([(,]\s*)in:", r"\1in_:", stub.read_text())
        (target / stub.name).write_text("\n".join(mend_defaults(line) for line in text.split("\n")))
print(f"staged TensorRT stubs in {out}")
