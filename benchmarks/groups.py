"""Which group an evaluated image belongs to, so ``diffiml eval`` reports F1 per manipulation type and per set.

A model can be strong on splices and blind to copy-moves while the overall mean hides it. The type of an image is,
in this order: the type field of its data-list row; the CASIA naming convention (``Tp_D_``/``Sp_D_``: two images,
a splice; ``Tp_S_``/``Sp_S_``: the same image, a copy-move); a manipulation named in its folders (``copymove``,
``copy_move``, ``copy-move``, ``splic…``, ``inpaint``, ``removal``); else unknown. Its set is the first folder
below what all images of the list share (``casia2_samples``, ``noso_copymove``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CASIA = re.compile(r"^(Tp|Sp)_([DS])_")
FOLDER_TYPES = (("copymove", "copymove"), ("copy_move", "copymove"), ("copy-move", "copymove"),
                ("splic", "splice"), ("inpaint", "removal"), ("removal", "removal"))


def manipulation_type(image: Path, listed: str | None) -> str | None:
    if listed:
        return listed
    match = CASIA.match(image.name)
    if match:
        return "splice" if match.group(2) == "D" else "copymove"
    for part in (p.lower() for p in image.parent.parts[::-1]):
        for key, kind in FOLDER_TYPES:
            if key in part:
                return kind
    return None


def set_names(images: list[Path]) -> list[str | None]:
    """Each image's first folder below the folder all of them share (None for an image directly in it)."""
    if not images:
        return []
    common = Path(os.path.commonpath([str(p.parent) for p in images]))
    rel = [p.relative_to(common).parts for p in images]
    return [r[0] if len(r) > 1 else None for r in rel]


def group_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """rows with ``set`` and ``type`` -> {group name: rows}: ``type=T`` across sets, and ``SET/T`` (or ``SET``, or
    ``T``) per set, when there is more than one of either."""
    groups: dict[str, list[dict]] = {}
    types = {r["type"] for r in rows} - {None}
    sets = {r["set"] for r in rows}
    for r in rows:
        if r["type"] is not None and len(types) > 1:
            groups.setdefault(f"type={r['type']}", []).append(r)
    if len(sets) > 1:
        for r in rows:
            key = "/".join(x for x in (r["set"], r["type"]) if x) or "(other)"
            groups.setdefault(key, []).append(r)
    return dict(sorted(groups.items()))
