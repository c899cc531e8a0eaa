"""The paper's evaluation protocols (sec. 4.1), for users who hold the datasets in IMDLBenCo's layouts.

Protocol-MVSS trains on CASIAv2 and tests on COVERAGE, Columbia, NIST16, CASIAv1, IMD2020 (the paper adds
AutoSplice and CocoGlide); Protocol-CAT trains on CAT-Net's mix and tests on the same families. Each test set is
looked up under ``--root`` as ``NAME.json`` (an IMDLBenCo JSON list) or a ``NAME/`` folder with ``Tp/`` and ``Gt/``.
"""

from __future__ import annotations

from pathlib import Path

PROTOCOLS: dict[str, list[str]] = {
    "mvss": ["Columbia", "COVERAGE", "NIST16", "CASIAv1", "IMD2020", "AutoSplice", "CocoGlide"],
    "catnet": ["Columbia", "COVERAGE", "NIST16", "CASIAv1", "IMD2020", "AutoSplice", "CocoGlide"],
}
ALIASES = {"CASIAv1": ["CASIA1.0", "CASIAv1plus", "CASIA_v1"], "NIST16": ["NIST", "NIST16_cleaned"],
           "COVERAGE": ["Coverage"], "AutoSplice": ["Autosplice"], "CocoGlide": ["cocoglide"]}


def locate(protocol: str, root: str | Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(found test sets as (name, path), names not found under root)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    root = Path(root)
    found, missing = [], []
    for name in PROTOCOLS[protocol]:
        candidates = [name, *ALIASES.get(name, [])]
        hit = next((p for c in candidates for p in (root / f"{c}.json", root / c)
                    if p.is_file() or (p / "Tp").is_dir()), None)
        if hit is None:
            missing.append(name)
        else:
            found.append((name, hit))
    return found, missing
