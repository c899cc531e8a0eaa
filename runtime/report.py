"""The forensic report: one static ``report.html`` beside a run's maps, opened from the file system (no server, no
external assets), ranking the images by score with overlay thumbnails, the run's settings and its failures.

It reads a ``diffiml scan`` folder (``scan.json`` + the scan table) or a ``diffiml localize --report`` folder
(``localize.json``). Rows travel as one JSON array inside the page and inline JavaScript renders one page of them
at a time, with lazy images, so a run of 10 000 images stays light; thumbnails are made once."""

from __future__ import annotations

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

REPORT_NAME = "report.html"
LOCALIZE_RUN = "localize.json"
SCAN_SETTINGS = "scan.json"
THUMBS = "thumbs"
THUMB_SIDE = 160  # px, longest side of a thumbnail
PAGE_SIZE = 100  # rows per page
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
            scan_table = importlib.import_module("diffiml.runtime.scan_table")
        except ImportError as exc:
            raise DiffimlError(f"{out_dir}: reading a scan's table needs pyarrow ({exc})") from None
        return (settings if isinstance(settings, dict) else {}), list(scan_table.read_scan_table(out_dir))
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
        row = {k: record.get(k) for k in ("path", "score", "manipulated_fraction", "members", "copy_move_fraction",
                                          "backend", "width", "height", "timings_ms")}
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


def render_report(out_dir: str | Path, settings: dict[str, Any], rows: list[dict[str, Any]],
                  title: str | None = None, page_size: int = PAGE_SIZE) -> Path:
    """Write ``out_dir/report.html`` (and missing or stale thumbnails) from a run's settings and rows; pure apart
    from those files. Rows are scan-table dicts: ``outputs`` a dict or its JSON text of paths relative to
    ``out_dir``; ``error`` None for a localized image."""
    out_dir = Path(out_dir)
    rows = [dict(r, outputs=_outputs_of(r)) for r in rows]
    done = sorted((r for r in rows if not r.get("error")), key=_rank_key)
    failed = [r for r in rows if r.get("error")]
    maps = [_maps(out_dir, r["outputs"]) for r in done]
    thumbs = _make_thumbs(out_dir, [(m.get("overlay"), m.get("uncertainty")) for m in maps])
    page_rows = [_page_row(i + 1, r, m, t) for i, (r, m, t) in enumerate(zip(done, maps, thumbs, strict=True))]
    title = title or f"diffiml report: {out_dir.resolve().name}"
    data = json.dumps({"page_size": max(1, page_size), "rows": page_rows}, separators=(",", ":"))
    page = _PAGE.format(title=_esc(title), style=_STYLE, settings=_settings_html(settings, done),
                        done=len(done), failed=len(failed), failures=_failures_html(failed), data=_script_json(data),
                        script=_SCRIPT)
    path = out_dir / REPORT_NAME
    write_text_atomic(path, page)
    return path


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
    import numpy as np

    src = out_dir / rel
    thumb_rel = f"{THUMBS}/{Path(rel).with_suffix('.jpg').as_posix()}"
    dst = out_dir / thumb_rel
    try:
        if dst.is_file() and dst.stat().st_mtime_ns >= src.stat().st_mtime_ns:
            return thumb_rel
        image = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    except (OSError, cv2.error):
        return None
    if image is None or image.size == 0:
        return None
    if image.dtype != np.uint8:  # 16-bit map: to 8 bits, then a colour map so the spread is visible
        image = cv2.applyColorMap((image.astype(np.float32) * (255 / 65535)).astype(np.uint8), cv2.COLORMAP_INFERNO)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    scale = side / max(image.shape[:2])
    if scale < 1:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        if not cv2.imwrite(str(tmp), image, [cv2.IMWRITE_JPEG_QUALITY, 80]):
            return None
    return thumb_rel


def _href(rel: str | None) -> str | None:
    """A relative path as a URL reference (spaces, '#', '?' and non-ASCII quoted)."""
    return quote(rel, safe="/") if rel else None


def _page_row(rank: int, row: dict[str, Any], maps: dict[str, str],
              thumbs: tuple[str | None, str | None]) -> dict[str, Any]:
    """One ranked row as the page's script reads it (short keys: 10 000 of them travel inside the page)."""
    def number(key: str) -> float | None:
        value = row.get(key)
        return round(float(value), 6) if isinstance(value, int | float) and math.isfinite(value) else None

    return {"r": rank, "p": str(row.get("path", "")), "s": number("score"), "f": number("manipulated_fraction"),
            "w": row.get("width"), "h": row.get("height"), "sha": row.get("sha256"), "m": row.get("members"),
            "t": _href(thumbs[0]), "u": _href(thumbs[1]),
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


def _failures_html(failed: list[dict[str, Any]]) -> str:
    if not failed:
        return ""
    items = "\n".join(f'<li><code class="path">{_esc(str(r.get("path", "")))}</code> '
                      f'<span class="why">{_esc(str(r["error"]))}</span></li>' for r in failed)
    return f'<section id="failures"><h2>Failed: {len(failed)}</h2>\n<ul>\n{items}\n</ul></section>'


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .5em}h2{font-size:1.1em}
table.settings th{text-align:left;padding-right:1em;font-weight:600}
table.settings td{font-family:monospace;word-break:break-all}
.counts{font-size:1.1em}
#failures{background:#fff3f3;border:1px solid #e0b4b4;padding:.5em 1em;max-height:20em;overflow:auto}
#failures .why{color:#a00}
.pager{margin:1em 0;display:flex;gap:1em;align-items:center}
#ranked{border-collapse:collapse;width:100%;background:#fff}
#ranked th,#ranked td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:middle}
#ranked td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.thumb{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
.path{font-family:monospace;word-break:break-all}
.sha{font-family:monospace;color:#666;font-size:.85em;word-break:break-all}
.maps a{margin-right:.6em}
"""

_SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var rows = data.rows, size = data.page_size, pages = Math.max(1, Math.ceil(rows.length / size));
  var body = document.getElementById("rows");
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function current() {
    var m = /page=(\\d+)/.exec(location.hash), p = m ? parseInt(m[1], 10) : 1;
    return Math.min(Math.max(p, 1), pages);
  }
  function thumb(src, full, alt) {
    if (!src) return el("span", "none", "\\u2014");
    var a = el("a"), img = el("img", "thumb");
    a.href = full || src;
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = alt;
    img.src = src;
    a.appendChild(img);
    return a;
  }
  function fixed(x, digits) { return x === null || x === undefined ? "\\u2014" : x.toFixed(digits); }
  function render() {
    var p = current(), first = (p - 1) * size, shown = rows.slice(first, first + size);
    var frag = document.createDocumentFragment();
    shown.forEach(function (r) {
      var links = {}, tr = el("tr", "row"), td;
      r.l.forEach(function (kv) { links[kv[0]] = kv[1]; });
      tr.appendChild(el("td", "num rank", r.r));
      td = el("td"); td.appendChild(thumb(r.t, links.overlay, "overlay of " + r.p)); tr.appendChild(td);
      td = el("td"); td.appendChild(thumb(r.u, links.uncertainty, "uncertainty of " + r.p)); tr.appendChild(td);
      tr.appendChild(el("td", "num score", fixed(r.s, 4)));
      tr.appendChild(el("td", "num fraction", r.f === null ? "\\u2014" : (100 * r.f).toFixed(2) + " %"));
      tr.appendChild(el("td", "num size", r.w && r.h ? r.w + " \\u00d7 " + r.h : "\\u2014"));
      tr.appendChild(el("td", "num members", r.m));
      td = el("td");
      td.appendChild(el("div", "path", r.p));
      var sha = el("div", "sha", r.sha ? "sha256 " + r.sha : "");
      td.appendChild(sha);
      tr.appendChild(td);
      td = el("td", "maps");
      r.l.forEach(function (kv) { var a = el("a", null, kv[0]); a.href = kv[1]; td.appendChild(a); });
      tr.appendChild(td);
      frag.appendChild(tr);
    });
    body.replaceChildren(frag);
    var text = rows.length ? "rows " + (first + 1) + "\\u2013" + (first + shown.length) + " of " + rows.length +
      " \\u00b7 page " + p + " of " + pages : "no localized images";
    document.querySelectorAll(".where").forEach(function (e) { e.textContent = text; });
    document.querySelectorAll("button.prev").forEach(function (b) { b.disabled = p <= 1; });
    document.querySelectorAll("button.next").forEach(function (b) { b.disabled = p >= pages; });
    document.body.setAttribute("data-page", String(p));
  }
  function go(delta) { location.hash = "page=" + (current() + delta); }
  document.querySelectorAll("button.prev").forEach(function (b) { b.onclick = function () { go(-1); }; });
  document.querySelectorAll("button.next").forEach(function (b) { b.onclick = function () { go(1); }; });
  window.addEventListener("hashchange", function () { render(); window.scrollTo(0, 0); });
  render();
})();
"""

_PAGER = ('<nav class="pager"><button type="button" class="prev">&larr; previous</button>'
          '<span class="where"></span><button type="button" class="next">next &rarr;</button></nav>')

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<table class="settings">
{settings}
</table>
<p class="counts"><strong id="n-done">{done}</strong> done &middot; <strong id="n-failed">{failed}</strong> failed</p>
</header>
{failures}
""" + _PAGER + """
<table id="ranked">
<thead><tr><th>rank</th><th>overlay</th><th>uncertainty</th><th>score</th><th>manipulated</th><th>size</th>
<th>members</th><th>image</th><th>maps</th></tr></thead>
<tbody id="rows"></tbody>
</table>
""" + _PAGER + """
<noscript>The ranked rows are drawn by the page's own script: allow JavaScript for this file.</noscript>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""
