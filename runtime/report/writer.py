"""The forensic report: one static ``report.html`` beside a run's maps, opened from the file system (no server, no
external assets). It opens on the images ranked by score (the detector's calibrated probability) with their
decision and overlay thumbnails, a "manipulated only" filter and a viewer (image, heat map, overlay side by side);
the failures and the run's settings (collapsed) follow.

It reads a ``diffiml scan`` folder (``scan.json`` + the scan table) or a ``diffiml localize --report`` folder
(``localize.json``). The page holds an index only; the rows, ranked, lie in script files of 1000 beside it
(``report-rows/``) that its script loads one at a time as pages turn, so the first screen of a million-row scan
costs what a small one does. Images are lazy; thumbnails are made once."""

from __future__ import annotations

import hashlib
import html
import importlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from diffiml.files import atomic_path, sha256_of, write_text_atomic
from diffiml.runtime.errors import DiffimlError
from diffiml.runtime.report.page import FAIL_PAGER, PAGE, SCRIPT, STYLE

REPORT_NAME = "report.html"
LOCALIZE_RUN = "localize.json"
SCAN_SETTINGS = "scan.json"
THUMBS = "thumbs"
THUMB_SIDE = 160  # px, longest side of a thumbnail
VIEW_SIDE = 768  # px, longest side of the viewer's image and heat map
PAGE_SIZE = 100  # rows per screen
PAGES_PER_CHUNK = 10  # screens per row file: a million rows are 1000 files of about 400 kB
ROWS_DIR = "report-rows"
MAP_KINDS = ("mask", "prob", "overlay", "uncertainty")
# The header's settings, in this order, before any other the run recorded.
NAMED_SETTINGS = (("bundle", "bundle"), ("backend", "backend"), ("ensemble", "ensemble N"), ("steps", "steps K"),
                  ("seed", "seed"))


def write_report(out_dir: str | Path, title: str | None = None) -> Path:
    """``report.html`` for a scan folder or a ``localize --report`` folder, whichever ``out_dir`` is."""
    out_dir = Path(out_dir)
    settings, rows = load_run(out_dir)
    return render_report(out_dir, settings, rows, title)


def load_run(out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(settings, rows) of the run in ``out_dir``: a scan (``scan.json`` and its table) wins over a localize run."""
    if not out_dir.is_dir():
        raise DiffimlError(f"{out_dir}: not a folder (give the --out folder of a scan or a localize --report run)")
    if (out_dir / SCAN_SETTINGS).is_file():
        settings = _read_json(out_dir / SCAN_SETTINGS)
        try:  # lazily: pyarrow is needed for scans only
            scan_table = importlib.import_module("diffiml.runtime.scan.table")
        except ImportError as exc:
            raise DiffimlError(f"{out_dir}: reading a scan's table needs pyarrow ({exc})") from None
        return (settings if isinstance(settings, dict) else {}), scan_table.newest_rows(out_dir)
    if (out_dir / LOCALIZE_RUN).is_file():
        run = _read_json(out_dir / LOCALIZE_RUN)
        if not isinstance(run, dict) or not isinstance(run.get("rows"), list):
            raise DiffimlError(f"{out_dir / LOCALIZE_RUN}: not a localize run (no rows)")
        return dict(run.get("settings") or {}), run["rows"]
    raise DiffimlError(f"{out_dir}: no {SCAN_SETTINGS} or {LOCALIZE_RUN} here: not the output of `diffiml scan` "
                       "or `diffiml localize --report`")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DiffimlError(f"{path}: not valid JSON ({exc})") from None


def write_localize_run(out_dir: Path, settings: dict[str, Any], records: list[dict[str, Any]],
                       title: str | None = None) -> Path:
    """``localize.json`` (settings + one row per input, in the scan table's shape) and ``report.html`` for a
    ``localize --report`` run. ``records`` are localize's JSON records (+ width, height) or {path, error}."""
    rows = []
    for record in records:
        row = {k: record.get(k) for k in ("path", "score", "decision", "manipulated_fraction", "members",
                                          "copy_move_fraction", "backend", "width", "height", "timings_ms")}
        row["error"] = record.get("error")
        # localize's paths are relative to the working folder (or absolute), not to out_dir
        row["outputs"] = {kind: _relative(out_dir, os.path.abspath(p)) or str(p)
                          for kind, p in (record.get("outputs") or {}).items()}
        try:
            row["sha256"] = None if row["error"] else sha256_of(record["path"])
        except OSError:
            row["sha256"] = None
        rows.append(row)
    write_text_atomic(out_dir / LOCALIZE_RUN, json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    return render_report(out_dir, settings, rows, title)


def render_report(out_dir: str | Path, settings: dict[str, Any], rows: Any, title: str | None = None,
                  page_size: int = PAGE_SIZE) -> Path:
    """Write ``out_dir/report.html``, its row pages (``report-rows/``) and missing or stale thumbnails from a run's
    settings and rows; pure apart from those files. ``rows``: scan-table dicts (``outputs`` a dict or its JSON text
    of paths relative to ``out_dir``; ``error`` None for a localized image), or the scan table itself (pyarrow),
    which is ranked and read a chunk at a time so a million rows never become Python objects at once."""
    out_dir = Path(out_dir)
    page_size = max(1, page_size)
    chunk = page_size * PAGES_PER_CHUNK  # a screen never spans two chunk files
    ranked, failed = _ranked_and_failed(rows)
    shown = _relative_paths(out_dir)
    pages = _RowPages(out_dir / ROWS_DIR, chunk)
    first_rows: list[dict[str, Any]] = []
    manipulated: list[dict[str, Any]] = []
    for start in range(0, len(ranked), chunk):
        block = [dict(r, outputs=_outputs_of(r)) for r in ranked[start:start + chunk]]
        first_rows = first_rows or block
        maps = [_maps(out_dir, r["outputs"]) for r in block]
        thumbs = _make_thumbs(out_dir, [(m.get("overlay"), m.get("uncertainty")) for m in maps])
        views = _make_views(out_dir, block, maps)
        page_rows = [_page_row(start + i + 1, dict(r, path=shown(r.get("path"))), m, th, v)
                     for i, (r, m, th, v) in enumerate(zip(block, maps, thumbs, views, strict=True))]
        pages.write("ranked", start // chunk, page_rows)
        manipulated += [r for r in page_rows if r["d"] is True]
        while len(manipulated) >= chunk:
            pages.write("manipulated", pages.count("manipulated") // chunk, manipulated[:chunk])
            manipulated = manipulated[chunk:]
    if manipulated:
        pages.write("manipulated", pages.count("manipulated") // chunk, manipulated)
    first_failures: list[dict[str, Any]] = []
    for start in range(0, len(failed), chunk):
        block = [{"p": shown(r.get("path")),
                  "e": str(r["error"]).replace(str(r.get("path")), str(shown(r.get("path"))))}
                 for r in failed[start:start + chunk]]
        first_failures = first_failures or block
        pages.write("failed", start // chunk, block)
    pages.remove_stale()
    settings = {k: shown(v) if k == "bundle" else v for k, v in settings.items()}
    title = title or f"diffiml report: {out_dir.resolve().name}"
    # settings a run did not record are read off its rows: all of a localize run's, a scan's first file (a scan
    # records them all)
    from_rows = ranked if isinstance(ranked, list) else first_rows
    index = {"page_size": page_size, "chunk": chunk, "dir": ROWS_DIR, "version": pages.version,
             "counts": {s: pages.count(s) for s in SERIES}}
    page = PAGE.format(title=_esc(title), style=STYLE, settings=_settings_html(settings, from_rows),
                       done=len(ranked), failed=len(failed),
                       failures=_failures_html(first_failures[:page_size], len(failed)),
                       data=_script_json(json.dumps(index, separators=(",", ":"))),
                       manipulated=pages.count("manipulated"), script=SCRIPT)
    path = out_dir / REPORT_NAME
    write_text_atomic(path, page)  # last: the page names only row files that are already in place
    return path


SERIES = ("ranked", "manipulated", "failed")


class _RowPages:
    """The report's rows as script files, ``<series>-NNNNN.js``, each a call ``diffimlRows(series, k, rows)``: a
    page opened from the file system may load scripts beside it but not fetch JSON, so this is how rows are paged
    in. Files of an earlier, longer report are removed once the new ones are written."""

    def __init__(self, folder: Path, chunk: int) -> None:
        self.folder, self.chunk = folder, chunk
        self.rows: dict[str, int] = dict.fromkeys(SERIES, 0)
        self.written: set[str] = set()
        self.digest = hashlib.sha256()

    def write(self, series: str, k: int, rows: list[dict[str, Any]]) -> None:
        name = f"{series}-{k:05d}.js"
        text = f"diffimlRows({json.dumps(series)},{k},{_script_json(json.dumps(rows, separators=(',', ':')))});\n"
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.folder / name, text)
        self.digest.update(text.encode())
        self.written.add(name)
        self.rows[series] += len(rows)

    def count(self, series: str) -> int:
        return self.rows[series]

    @property
    def version(self) -> str:
        """Changes whenever a row does: the page asks for ``file.js?v=version``, so no browser shows cached rows."""
        return self.digest.hexdigest()[:12]

    def remove_stale(self) -> None:
        if self.folder.is_dir():
            for old in self.folder.glob("*.js"):
                if old.name not in self.written:
                    old.unlink(missing_ok=True)


def _ranked_and_failed(rows: Any) -> tuple[Any, Any]:
    """(localized rows ranked by score, failed rows in the order written), each sliceable into lists of dicts."""
    if hasattr(rows, "column_names"):  # the scan table (pyarrow): ranked as columns
        import pyarrow.compute as pc

        failed_mask = pc.is_valid(rows.column("error"))
        done = rows.filter(pc.invert(failed_mask))
        # nulls (no score) sort last by default, as _rank_key puts them
        order = pc.sort_indices(done, sort_keys=[("score", "descending"), ("path", "ascending")])
        return _TableRows(done, order), _TableRows(rows.filter(failed_mask), None)
    rows = list(rows)
    return sorted((r for r in rows if not r.get("error")), key=_rank_key), [r for r in rows if r.get("error")]


class _TableRows:
    """A pyarrow table in a given order, as ``len()`` and slices of row dicts."""

    def __init__(self, table: Any, order: Any) -> None:
        self.table, self.order = table, order

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, window: slice) -> list[dict[str, Any]]:
        if self.order is None:
            return self.table.slice(window.start, window.stop - window.start).to_pylist()
        return self.table.take(self.order[window]).to_pylist()


def _relative_paths(out_dir: Path):  # noqa: ANN202 - (str | None) -> str
    """Local absolute paths as seen from the report's folder (``../photos/a.png``): a shared report names no
    machine's folders, and the links still work where the folders keep their places. URIs stay as they are."""
    base = os.path.abspath(out_dir)

    def shown(path: Any) -> Any:
        if not isinstance(path, str) or "://" in path or not os.path.isabs(path):
            return path
        return os.path.relpath(path, base)
    return shown


def _rank_key(row: dict[str, Any]) -> tuple[float, str]:
    """Highest score first, then by path (ties in a stable order); a row without a score last."""
    score = row.get("score")
    known = isinstance(score, int | float) and math.isfinite(score)
    return (-float(score) if known else math.inf, str(row.get("path", "")))


def _outputs_of(row: dict[str, Any]) -> dict[str, str]:
    outputs = row.get("outputs") or {}
    if isinstance(outputs, str):
        try:
            outputs = json.loads(outputs)
        except ValueError:
            return {}
    return {str(k): str(v) for k, v in outputs.items()} if isinstance(outputs, dict) else {}


def _relative(out_dir: Path, path: str | Path) -> str | None:
    """``path`` (relative to ``out_dir``, or absolute) as a POSIX path relative to ``out_dir``; None when it lies
    outside: the page links only to files beside it, so the folder can be moved or shared whole."""
    root = os.path.abspath(out_dir)
    full = os.path.normpath(os.path.join(root, path))  # join keeps an absolute path as it is
    if not full.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return Path(full[len(root.rstrip(os.sep)) + 1:]).as_posix()


def _maps(out_dir: Path, outputs: dict[str, str]) -> dict[str, str]:
    """The row's existing map files by kind, relative to ``out_dir``."""
    found = {}
    for kind in MAP_KINDS:
        rel = _relative(out_dir, outputs[kind]) if kind in outputs else None
        if rel and (out_dir / rel).is_file():
            found[kind] = rel
    return found


def _make_thumbs(out_dir: Path, sources: list[tuple[str | None, str | None]]) -> list[tuple[str | None, str | None]]:
    """Thumbnails (relative paths) of each row's overlay and uncertainty maps, made in threads (OpenCV releases the
    GIL) and only where missing or older than their map."""
    jobs = sorted({rel for pair in sources for rel in pair if rel})
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        made = dict(zip(jobs, pool.map(lambda rel: thumbnail(out_dir, rel), jobs), strict=True))
    return [(made.get(o) if o else None, made.get(u) if u else None) for o, u in sources]


def thumbnail(out_dir: Path, rel: str, side: int = THUMB_SIDE) -> str | None:
    """``thumbs/<rel>.jpg`` (longest side ``side`` px) of the map ``out_dir/rel``; 16-bit maps (uncertainty) are
    colour-mapped. Kept when newer than its map. None when the map cannot be read."""
    import cv2

    return _derived_jpeg(out_dir, rel, f"{THUMBS}/{Path(rel).with_suffix('.jpg').as_posix()}", side,
                         cv2.COLORMAP_INFERNO, quality=80)


def _derived_jpeg(out_dir: Path, rel: str, dst_rel: str, side: int, colormap: int, quality: int) -> str | None:
    """``dst_rel``: the map ``out_dir/rel`` as a JPEG at most ``side`` px long, 16-bit maps through ``colormap``;
    kept when newer than its map, None when the map cannot be read or the JPEG written. Thumbnails and heat views."""
    import cv2
    import numpy as np

    src, dst = out_dir / rel, out_dir / dst_rel
    try:
        if dst.is_file() and dst.stat().st_mtime_ns >= src.stat().st_mtime_ns:
            return dst_rel
        image = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    except (OSError, cv2.error):
        return None
    if image is None or image.size == 0:
        return None
    if image.dtype != np.uint8:  # 16-bit map: to 8 bits, then a colour map so the values are visible
        image = cv2.applyColorMap((image.astype(np.float32) * (255 / 65535)).astype(np.uint8), colormap)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return dst_rel if _write_jpeg(dst, image, side, quality) else None


def _make_views(out_dir: Path, rows: list[dict[str, Any]], maps: list[dict[str, str]]
                ) -> list[tuple[str | None, str | None]]:
    """Per row, the viewer's image (a JPEG of the input, when it can still be read) and its heat map (the
    probability map colour-mapped), both beside the thumbnails and made once."""
    jobs = [(row.get("path"), m.get("overlay"), m.get("prob")) for row, m in zip(rows, maps, strict=True)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda job: (image_view(out_dir, *job[:2]), heat_view(out_dir, job[2])), jobs))


def _view_path(rel: str, suffix: str) -> str:
    return f"{THUMBS}/{Path(rel).with_suffix('').as_posix()}{suffix}.jpg"


def image_view(out_dir: Path, source: str | None, overlay_rel: str | None, side: int = VIEW_SIDE) -> str | None:
    """``thumbs/<overlay>_image.jpg``: the input at most ``side`` px long, for the viewer; kept once made (the input
    may since have moved). None when the input cannot be read."""
    import cv2

    if not source or not overlay_rel:
        return None
    view_rel = _view_path(overlay_rel, "_image")
    dst = out_dir / view_rel
    if dst.is_file():
        return view_rel
    try:
        flags = cv2.IMREAD_REDUCED_COLOR_2 if os.path.getsize(source) > 4 << 20 else cv2.IMREAD_COLOR
        image = cv2.imread(str(source), flags)
    except (OSError, cv2.error):
        return None
    return view_rel if image is not None and _write_jpeg(dst, image, side) else None


def heat_view(out_dir: Path, prob_rel: str | None, side: int = VIEW_SIDE) -> str | None:
    """``thumbs/<prob>_heat.jpg``: the 16-bit probability map in a colour map, made again when the map is newer."""
    import cv2

    if not prob_rel:
        return None
    return _derived_jpeg(out_dir, prob_rel, _view_path(prob_rel, "_heat"), side, cv2.COLORMAP_JET, quality=85)


def _write_jpeg(dst: Path, image: Any, side: int, quality: int = 85) -> bool:
    import cv2

    scale = side / max(image.shape[:2])
    if scale < 1:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:  # a failed write must raise inside, or the empty temporary is renamed
            if not cv2.imwrite(str(tmp), image, [cv2.IMWRITE_JPEG_QUALITY, quality]):
                raise OSError(f"{dst}: could not be written")
    except (OSError, cv2.error):
        return False
    return True


def _href(rel: str | None) -> str | None:
    """A relative path as a URL reference (spaces, '#', '?' and non-ASCII quoted)."""
    return quote(rel, safe="/") if rel else None


def _page_row(rank: int, row: dict[str, Any], maps: dict[str, str], thumbs: tuple[str | None, str | None],
              views: tuple[str | None, str | None] = (None, None)) -> dict[str, Any]:
    """One ranked row as the page's script reads it (short keys: a row file holds 1000 of them)."""
    def number(key: str) -> float | None:
        value = row.get(key)
        return round(float(value), 6) if isinstance(value, int | float) and math.isfinite(value) else None

    return {"r": rank, "p": str(row.get("path", "")), "s": number("score"), "f": number("manipulated_fraction"),
            "w": row.get("width"), "h": row.get("height"), "sha": row.get("sha256"), "m": row.get("members"),
            "d": row.get("decision") if isinstance(row.get("decision"), bool) else None,
            "t": _href(thumbs[0]), "u": _href(thumbs[1]), "v": _href(views[0]), "hm": _href(views[1]),
            "l": [[kind, _href(maps[kind])] for kind in MAP_KINDS if kind in maps]}


def _esc(value: Any) -> str:
    return html.escape(value if isinstance(value, str) else json.dumps(value, default=str), quote=True)


def _script_json(text: str) -> str:
    """JSON safe inside <script>: '<', '>' and '&' as \\u escapes, so no '</script>' or '<!--' can end it."""
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _settings_html(settings: dict[str, Any], done: list[dict[str, Any]]) -> str:
    """The run's settings as table rows: the named ones first (from the rows when the settings lack them)."""
    items = []
    for key, label in NAMED_SETTINGS:
        value = settings.get(key)
        if value is None:
            seen = sorted({str(r[key]) for r in done if r.get(key) is not None})
            value = ", ".join(seen) if seen else "—"
        items.append((label, value))
    items += [(k, v) for k, v in settings.items() if k not in dict(NAMED_SETTINGS)]
    return "\n".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in items)


def _failures_html(first: list[dict[str, Any]], total: int) -> str:
    """The failures' first screen, in the page itself (readable without its script); the rest are paged in."""
    if not total:
        return ""
    items = "\n".join(f'<li><code class="path">{_esc(str(r["p"]))}</code> <span class="why">{_esc(r["e"])}</span></li>'
                      for r in first)
    pager = FAIL_PAGER if total > len(first) else ""
    return (f'<section id="failures"><h2>Failed: {total}</h2>\n{pager}<ul id="failed-rows">\n{items}\n</ul>'
            "</section>")
