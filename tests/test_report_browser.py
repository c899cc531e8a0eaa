"""The forensic report (``report.html``): its HTML is escaped and links only to files beside it, and in a real
headless Chromium every image of a page loads, the rows are ranked by score, pages turn and failures are listed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from urllib.parse import unquote, urlparse

import cv2
import numpy as np
import pytest

from diffiml.cli import main
from diffiml.runtime.report.writer import PAGE_SIZE, REPORT_NAME, ROWS_DIR, render_report, write_report

BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
DATA_RE = re.compile(r'<script type="application/json" id="report-data">(.*?)</script>', re.S)



def _as_shown(path: str, folder: Path) -> str:
    """How the report shows an input: a local absolute path relative to the report's folder."""
    return path if "://" in path or not os.path.isabs(path) else os.path.relpath(path, folder)

def _page_data(html_text: str) -> dict:
    return json.loads(DATA_RE.search(html_text).group(1))


ROW_FILE_RE = re.compile(r'^diffimlRows\("(\w+)",(\d+),(.*)\);\n$', re.S)


def _series(out: Path, name: str = "ranked") -> list[dict]:
    """The rows of one series as the page's script receives them, from its row files in order."""
    rows = []
    for i, path in enumerate(sorted((out / ROWS_DIR).glob(f"{name}-*.js"))):
        series, k, data = ROW_FILE_RE.match(path.read_text()).groups()
        assert (series, int(k)) == (name, i)
        rows += json.loads(data)
    return rows


def _goto(tab, url: str, series: str = "ranked") -> None:
    """Open the page and wait until its first screen of rows is drawn (rows load from their files)."""
    tab.goto(url)
    tab.wait_for_function(f"document.body.dataset.series === '{series}'")


def _overlay(out: Path, stem: str, value: int, shape: tuple[int, int] = (12, 20)) -> dict[str, str]:
    """A real overlay PNG and 16-bit uncertainty PNG in ``out``: the report's maps, relative to it."""
    cv2.imwrite(str(out / f"{stem}_overlay.png"), np.full((*shape, 3), value % 256, np.uint8))
    cv2.imwrite(str(out / f"{stem}_uncertainty.png"), np.full(shape, value * 97 % 65536, np.uint16))
    return {"overlay": f"{stem}_overlay.png", "uncertainty": f"{stem}_uncertainty.png"}


def _row(path: str, score: float | None, outputs: dict[str, str] | None, error: str | None = None) -> dict:
    """A row in the scan table's shape (outputs as its JSON text); a failed one has no score."""
    return {"path": path, "sha256": "0" * 64, "width": 20, "height": 12, "score": score,
            "manipulated_fraction": None if score is None else score / 2, "members": 5, "backend": "ort-cpu",
            "steps": 8, "ensemble": 5, "seed": 0, "bundle_sha256s": "{}", "timings_ms": "{}",
            "outputs": json.dumps(outputs or {}), "error": error}


# --- the page itself, no browser -------------------------------------------------------------------------------

def test_html_in_paths_errors_and_title_cannot_inject(tmp_path):
    evil_path = "/photos/x</script><script>alert(1)</script>.png"
    evil_error = "<img src=x onerror=alert(1)> is not an image"
    rows = [_row(evil_path, 0.5, _overlay(tmp_path, "a", 1)), _row("/photos/<b>bad.png", 0, None, evil_error)]
    page = render_report(tmp_path, {"bundle": "<i>b</i>"}, rows, title="<u>t</u>").read_text()
    assert page.count("<script") == 2 and page.count("</script>") == 2  # ours: the data and the code
    assert "<img" not in page and "<b>bad" not in page and "<u>t" not in page and "<i>b" not in page
    assert "&lt;img src=x onerror=alert(1)&gt; is not an image" in page and "&lt;b&gt;bad.png" in page
    assert _series(tmp_path)[0]["p"] == _as_shown(evil_path, tmp_path)  # intact once parsed
    assert "</script" not in (tmp_path / ROWS_DIR / "ranked-00000.js").read_text()


def test_links_are_relative_and_never_leave_the_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "outside_mask.png").write_bytes(cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes())
    outputs = {**_overlay(out, "a b#1", 3), "mask": "../outside_mask.png", "prob": str(tmp_path / "outside_mask.png")}
    absolute = {"overlay": str(out / _overlay(out, "c", 9)["overlay"])}
    render_report(out, {}, [_row("/p/a b#1.png", 0.9, outputs), _row("/p/c.png", 0.1, absolute)])
    rows = _series(out)
    links = [href for r in rows for href in (r["t"], r["u"], *(h for _, h in r["l"])) if href]
    assert [kind for kind, _ in rows[0]["l"]] == ["overlay", "uncertainty"]  # mask, prob lie outside: no link
    assert rows[1]["l"] == [["overlay", "c_overlay.png"]] and rows[1]["t"] == "thumbs/c_overlay.jpg"
    assert "a%20b%231_overlay.png" in links  # quoted: '#' would cut the URL
    for href in links:
        assert not href.startswith("/") and ":" not in href and ".." not in href.split("/"), href
        assert (out / unquote(href)).resolve().is_file(), href


def test_thumbnails_are_made_once_and_again_when_their_overlay_changes(tmp_path):
    rows = [_row("/p/a.png", 0.5, _overlay(tmp_path, "a", 5, shape=(300, 400)))]
    render_report(tmp_path, {}, rows)
    thumb = tmp_path / "thumbs" / "a_overlay.jpg"
    assert cv2.imread(str(thumb)).shape == (120, 160, 3)  # longest side 160
    made = thumb.stat().st_mtime_ns
    render_report(tmp_path, {}, rows)
    assert thumb.stat().st_mtime_ns == made
    later = made + 5 * 10**9
    os.utime(tmp_path / "a_overlay.png", ns=(later, later))
    render_report(tmp_path, {}, rows)
    assert thumb.stat().st_mtime_ns != made


def test_rows_are_ranked_by_score_with_settings_and_failures_in_the_header(tmp_path):
    scores = [0.2, 0.9, 0.5, 0.7]
    rows = [_row(f"/p/{i}.png", s, _overlay(tmp_path, str(i), i)) for i, s in enumerate(scores)]
    rows.append(_row("/p/broken.png", None, None, "/p/broken.png: not an image"))
    page = render_report(tmp_path, {"bundle": "engines/x", "backend": "ort-cpu", "seed": 3}, rows).read_text()
    ranked = _series(tmp_path)
    assert [r["p"] for r in ranked] == [_as_shown(p, tmp_path)
                                        for p in ["/p/1.png", "/p/3.png", "/p/2.png", "/p/0.png"]]
    assert [r["r"] for r in ranked] == [1, 2, 3, 4]
    assert '<strong id="n-done">4</strong>' in page and '<strong id="n-failed">1</strong>' in page
    assert "/p/broken.png: not an image" in page
    assert "<th>steps K</th><td>8</td>" in page  # not in the settings: taken from the rows
    assert "<th>seed</th><td>3</td>" in page


def test_report_command_reads_a_scan_folder(tmp_path, monkeypatch, capsys):
    rows = [_row("/p/a.png", 0.3, _overlay(tmp_path, "a", 1)), _row("/p/b.png", 0.8, _overlay(tmp_path, "b", 2))]
    fake = types.ModuleType("diffiml.runtime.scan.table")
    fake.newest_rows = lambda out_dir: rows if Path(out_dir) == tmp_path else []
    monkeypatch.setitem(sys.modules, "diffiml.runtime.scan.table", fake)
    (tmp_path / "scan.json").write_text(json.dumps({"bundle": "engines/scan-bundle", "ensemble": 5}))
    assert main(["report", str(tmp_path), "--title", "scan of today"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / REPORT_NAME)
    page = (tmp_path / REPORT_NAME).read_text()
    assert "<title>scan of today</title>" in page and "engines/scan-bundle" in page
    assert [r["p"] for r in _series(tmp_path)] == [_as_shown(p, tmp_path) for p in ["/p/b.png", "/p/a.png"]]


def test_report_reads_the_scan_table_a_scan_writes(tmp_path):
    scan_table = pytest.importorskip("diffiml.runtime.scan.table", reason="diffiml scan's table module is absent")
    import pyarrow as pa

    rows = [_row("/p/a.png", 0.3, _overlay(tmp_path, "a", 1)), _row("/p/b.png", 0.8, _overlay(tmp_path, "b", 2)),
            _row("/p/c.png", None, None, "/p/c.png: truncated")]
    table = pa.Table.from_pylist([{**r, "error_kind": "input" if r["error"] else None, "run_id": "r1",
                                   "scanned_at": None} for r in rows], schema=scan_table.SCHEMA)
    scan_table.write_part(tmp_path, table, "r1", 0)
    (tmp_path / "scan.json").write_text(json.dumps({"bundle": "engines/x", "steps": 8, "runs": [{"run_id": "r1"}]}))
    page = write_report(tmp_path).read_text()
    assert [r["p"] for r in _series(tmp_path)] == [_as_shown(p, tmp_path) for p in ["/p/b.png", "/p/a.png"]]
    assert '<strong id="n-failed">1</strong>' in page and "/p/c.png: truncated" in page


@pytest.mark.parametrize("where", ["missing", "empty", "a-file"])
def test_report_command_on_a_folder_without_a_run_is_one_line(tmp_path, capsys, where):
    target = tmp_path / where
    if where == "empty":
        target.mkdir()
    elif where == "a-file":
        target.write_text("x")
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"diffiml report: error: {target}")


# --- a real `diffiml localize --report` run -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def localized(tiny_bundle, tmp_path_factory):
    """Three images (one name with a space and '#') and one broken file through the real CLI with --report, into a
    relative --out (localize names its maps relative to the working folder; the report must not)."""
    src = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(11)
    names = ["plain.png", "a b#1.png", "third.jpg"]
    for i, name in enumerate(names):
        cv2.imwrite(str(src / name), rng.integers(0, 256, (48 + 8 * i, 80, 3), dtype=np.uint8))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    out = tmp_path_factory.mktemp("localized")
    done = subprocess.run([sys.executable, "-m", "diffiml.cli", "localize", *(str(src / n) for n in names),
                           str(src / "broken.png"), "--bundle", str(tiny_bundle), "--out", out.name,
                           "--backend", "ort-cpu", "--uncertainty", "--report"],
                          capture_output=True, text=True, timeout=600, cwd=out.parent)
    return src, out, done


def test_localize_report_keeps_the_json_lines_and_records_the_run(localized):
    src, out, done = localized
    assert done.returncode == 1 and "Traceback" not in done.stderr  # one input failed
    assert done.stderr.strip().splitlines()[-1] == "diffiml localize: 1 of 4 inputs failed"
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 3  # the JSON lines are what they were without --report: nothing of the report's in them
    assert all({"path", "score", "manipulated_fraction", "outputs"} <= set(line)
               and not {"width", "height", "sha256", "error"} & set(line) for line in lines)
    run = json.loads((out / "localize.json").read_text())
    assert run["settings"]["backend"] == "ort-cpu" and run["settings"]["uncertainty"] is True
    assert run["settings"]["opencv"] == cv2.__version__  # the cue's keypoints depend on it
    by_path = {r["path"]: r for r in run["rows"]}
    assert by_path[str(src / "broken.png")]["error"].startswith(str(src / "broken.png"))
    row = by_path[str(src / "a b#1.png")]
    assert row["outputs"]["overlay"] == "a b#1_overlay.png" and (row["width"], row["height"]) == (80, 56)
    from diffiml.files import sha256_of

    assert row["sha256"] == sha256_of(src / "a b#1.png")
    first = (out / REPORT_NAME).read_text()
    assert main(["report", str(out)]) == 0
    assert (out / REPORT_NAME).read_text() == first  # the report command redraws the same page


# --- in a real browser ---------------------------------------------------------------------------------------

def _browser_executable() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = _browser_executable()
    if executable is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium): the report's browser tests need a real browser")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=BROWSER_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert not errors, errors  # the page's script ran without an exception


def _broken_images_after_scrolling(tab) -> list[str]:
    """Scroll the page down a screen at a time (the images are lazy), wait for every image to settle, return those
    that did not load."""
    assert tab.evaluate("Array.from(document.images).every(i => i.loading === 'lazy')")
    tab.evaluate("""async () => {
        const frame = () => new Promise(resolve => requestAnimationFrame(resolve));
        for (let y = 0; y < document.documentElement.scrollHeight; y += window.innerHeight) {
            window.scrollTo(0, y);
            await frame();
            await frame();
        }
        window.scrollTo(0, 0);
    }""")
    tab.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=20_000)
    return tab.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                        ".map(i => i.src)")


def _shown_paths(tab) -> list[str]:
    return tab.eval_on_selector_all("#rows tr.row .path", "cells => cells.map(c => c.textContent)")


def test_a_localize_report_opens_with_every_image_and_the_failure(localized, page, tmp_path):
    src, out, done = localized
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    expected = [_as_shown(os.path.abspath(line["path"]), out)
                for line in sorted(lines, key=lambda r: (-r["score"], r["path"]))]
    _goto(page, (out / REPORT_NAME).as_uri())
    assert _shown_paths(page) == expected
    assert page.evaluate("document.images.length") == 2 * len(lines)  # overlay + uncertainty thumbnails
    assert _broken_images_after_scrolling(page) == []
    for href in page.evaluate("Array.from(document.links).map(a => a.href)"):
        target = Path(unquote(urlparse(href).path))
        assert target.is_file() and target.resolve().is_relative_to(out.resolve()), href
    assert page.inner_text("#n-done") == "3" and page.inner_text("#n-failed") == "1"
    assert _as_shown(str(src / "broken.png"), out) in page.inner_text("#failures")
    page.screenshot(path=str(tmp_path / "localize_report.png"), full_page=True)
    assert (tmp_path / "localize_report.png").stat().st_size > 0


def test_pages_turn_in_score_order_and_every_image_of_a_page_loads(tmp_path, page):
    n = PAGE_SIZE * 2 + 30
    scores = np.random.default_rng(5).permutation(n) / n  # distinct, shuffled
    rows = [_row(f"/p/img{i:03d}.png", float(s), _overlay(tmp_path, f"img{i:03d}", i)) for i, s in enumerate(scores)]
    rows += [_row("/p/gone.png", None, None, "/p/gone.png: no such file"),
             _row("/p/junk.txt", None, None, "/p/junk.txt: not an image")]
    expected = [_as_shown(r["path"], tmp_path) for r in sorted(rows[:n], key=lambda r: -r["score"])]
    _goto(page, render_report(tmp_path, {"bundle": "engines/x"}, rows).as_uri())
    assert page.inner_text("#n-failed") == "2" and "not an image" in page.inner_text("#failures")

    for number, first in ((1, 0), (2, PAGE_SIZE), (3, 2 * PAGE_SIZE)):
        assert page.get_attribute("body", "data-page") == str(number)
        assert _shown_paths(page) == expected[first:first + PAGE_SIZE]
        assert _broken_images_after_scrolling(page) == []
        if number == 1:
            page.screenshot(path=str(tmp_path / "page1.png"))
        if number < 3:
            page.locator("button.next").first.click()
            page.wait_for_function(f"document.body.dataset.page === '{number + 1}'")
    assert page.locator("button.next").first.is_disabled()
    page.locator("button.prev").first.click()
    page.wait_for_function("document.body.dataset.page === '2'")
    assert _shown_paths(page) == expected[PAGE_SIZE:2 * PAGE_SIZE]
    assert page.inner_text(".where >> nth=0") == f"rows {PAGE_SIZE + 1}–{2 * PAGE_SIZE} of {n} · page 2 of 3"


def test_the_filter_shows_manipulated_images_only_and_a_click_opens_the_viewer(tmp_path, page):
    """Rows judged manipulated and authentic: the filter keeps the first in score order; a click on a row shows the
    input, its heat map and the overlay side by side, every one loaded; the settings sit collapsed below."""
    rows = []
    for i in range(6):
        stem = f"img{i}"
        cv2.imwrite(str(tmp_path / f"{stem}.png"), np.full((24, 40, 3), 40 * i, np.uint8))  # the input itself
        outputs = _overlay(tmp_path, stem, i)
        cv2.imwrite(str(tmp_path / f"{stem}_prob.png"), np.full((24, 40), 9000 * i, np.uint16))
        outputs["prob"] = f"{stem}_prob.png"
        rows.append({**_row(str(tmp_path / f"{stem}.png"), i / 10, outputs), "decision": i % 2 == 1})
    _goto(page, render_report(tmp_path, {"bundle": "engines/x"}, rows).as_uri())
    assert page.inner_text("#n-manipulated") == "3"
    assert page.evaluate("document.querySelector('details.settings-box').open") is False
    assert page.evaluate("document.querySelector('#ranked').compareDocumentPosition("
                         "document.querySelector('details.settings-box')) & Node.DOCUMENT_POSITION_FOLLOWING")
    everything = _shown_paths(page)
    assert everything == [_as_shown(r["path"], tmp_path) for r in sorted(rows, key=lambda r: -r["score"])]
    page.check("#only-manipulated")
    page.wait_for_function("document.body.dataset.series === 'manipulated'")
    assert _shown_paths(page) == [p for p in everything if int(Path(p).stem[3:]) % 2 == 1]
    assert page.eval_on_selector_all("#rows td.decision", "c => c.map(x => x.textContent)") == ["manipulated"] * 3
    page.locator("#rows tr.row .path").first.click()
    page.wait_for_function("document.getElementById('viewer').open")
    page.wait_for_function("Array.from(document.querySelectorAll('#viewer img')).every(i => i.complete)")
    loaded = page.eval_on_selector_all("#viewer img", "imgs => imgs.map(i => [i.alt.split(' of ')[0], i.naturalWidth])")
    assert [kind for kind, _ in loaded] == ["image", "heat map", "overlay"] and all(w > 0 for _, w in loaded)
    assert "manipulated" in page.inner_text("#viewer .title")
    page.click("#viewer button.close")
    page.uncheck("#only-manipulated")
    page.wait_for_function("document.body.dataset.series === 'ranked'")
    assert _shown_paths(page) == everything


def test_the_page_names_no_absolute_path_of_this_machine(tmp_path):
    """Inputs, failures and the bundle are shown relative to the report's folder (a shared report leaks no folders
    of the machine that made it); URIs stay as given."""
    from diffiml.runtime.report.writer import render_report

    out = tmp_path / "run"
    out.mkdir()
    photo = str(tmp_path / "photos" / "a.png")
    rows = [{"path": photo, "score": 0.9, "error": None, "outputs": {}},
            {"path": str(tmp_path / "photos" / "bad.png"), "error": f"{tmp_path}/photos/bad.png: not an image"},
            {"path": "s3://bucket/c.png", "score": 0.1, "error": None, "outputs": {}}]
    page = render_report(out, {"bundle": str(tmp_path / "engines" / "b")}, rows).read_text()
    page += "".join(f.read_text() for f in sorted((out / ROWS_DIR).glob("*.js")))  # and every row file
    assert str(tmp_path) not in page
    assert "../photos/a.png" in page and "../photos/bad.png: not an image" in page and "../engines/b" in page
    assert "s3://bucket/c.png" in page


def test_failures_are_paged_and_the_first_screen_is_in_the_page(tmp_path, page):
    n = PAGE_SIZE + 20
    rows = [_row("/p/ok.png", 0.5, _overlay(tmp_path, "ok", 1))]
    rows += [_row(f"/p/bad{i:03d}.png", None, None, f"/p/bad{i:03d}.png: not an image") for i in range(n)]
    html_text = render_report(tmp_path, {}, rows).read_text()
    assert "bad000.png" in html_text and f"bad{PAGE_SIZE:03d}.png" not in html_text  # one screen inline
    assert [r["p"] for r in _series(tmp_path, "failed")] == [_as_shown(f"/p/bad{i:03d}.png", tmp_path)
                                                             for i in range(n)]
    _goto(page, (tmp_path / REPORT_NAME).as_uri())
    page.wait_for_function("document.body.dataset.failuresPage === '1'")
    page.click("#failures button.fail-next")
    page.wait_for_function("document.body.dataset.failuresPage === '2'")
    shown = page.eval_on_selector_all("#failed-rows .path", "c => c.map(x => x.textContent)")
    assert shown == [_as_shown(f"/p/bad{i:03d}.png", tmp_path) for i in range(PAGE_SIZE, n)]
    assert page.inner_text("#failures .fail-where") == f"failures {PAGE_SIZE + 1}–{n} of {n}"
    assert page.locator("#failures button.fail-next").is_disabled()


def test_a_hundred_thousand_rows_keep_the_page_small_and_every_screen_reachable(tmp_path, page):
    """The page holds an index, not the rows: its size does not grow with them; the first and the last screen
    both draw from their own row files. (The first screen's load time is `diffiml bench report`'s.)"""
    n = 100_000
    rng = np.random.default_rng(3)
    rows = [{"path": f"/p/{i:06d}.png", "score": float(s), "error": None, "outputs": {}, "decision": bool(s > 0.9)}
            for i, s in enumerate(rng.random(n))]
    path = render_report(tmp_path, {}, rows)
    assert path.stat().st_size < 64_000
    files = sorted((tmp_path / ROWS_DIR).glob("ranked-*.js"))
    assert len(files) == n // (PAGE_SIZE * 10)
    _goto(page, path.as_uri())
    assert page.inner_text(".where >> nth=0") == f"rows 1–{PAGE_SIZE} of {n} · page 1 of {n // PAGE_SIZE}"
    best = max(range(n), key=lambda i: rows[i]["score"])
    assert _shown_paths(page)[0] == _as_shown(f"/p/{best:06d}.png", tmp_path)
    page.evaluate(f"location.hash = 'page={n // PAGE_SIZE}'")
    page.wait_for_function(f"document.body.dataset.page === '{n // PAGE_SIZE}'")
    worst = min(range(n), key=lambda i: rows[i]["score"])
    assert _shown_paths(page)[-1] == _as_shown(f"/p/{worst:06d}.png", tmp_path)
    # a shorter report in the same folder leaves no row file of the longer one behind
    render_report(tmp_path, {}, rows[:10])
    assert {f.name for f in (tmp_path / ROWS_DIR).glob("*.js")} <= {"ranked-00000.js", "manipulated-00000.js"}
