"""The report page's template: its CSS, its script (which draws one screen of rows at a time, loading the row file
that holds it) and the HTML around them. Static text, kept apart from the code that fills it (writer.py)."""

STYLE = """
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
.decision.yes{color:#a00;font-weight:600}.decision.no{color:#276}
#ranked tr.row{cursor:pointer}#ranked tr.row:hover{background:#f3f6ff}
.filter{margin-left:1em}
details.settings-box{margin-top:1.5em}details.settings-box summary{cursor:pointer;font-weight:600}
#viewer{border:1px solid #888;border-radius:6px;padding:1em;max-width:96vw;width:96vw}
#viewer .panes{display:flex;gap:1em}#viewer figure{margin:0;flex:1;text-align:center}
#viewer img{max-width:100%;max-height:70vh;object-fit:contain;background:#eee}
#viewer figcaption{font-size:.9em;color:#555}
"""

SCRIPT = """
(function () {
  "use strict";
  var index = JSON.parse(document.getElementById("report-data").textContent);
  var size = index.page_size, chunk = index.chunk, cache = {}, waiting = {}, drawing = 0, failPage = 1;
  var body = document.getElementById("rows"), only = document.getElementById("only-manipulated");
  var viewer = document.getElementById("viewer");
  // Row files call this when they load (a page opened from disk may load scripts beside it, not fetch JSON).
  window.diffimlRows = function (series, k, rows) {
    var key = series + "/" + k, callbacks = waiting[key] || [];
    cache[key] = rows;
    delete waiting[key];
    callbacks.forEach(function (f) { f(rows); });
  };
  function load(series, k, done) {
    var key = series + "/" + k, tag;
    if (cache[key]) { done(cache[key]); return; }
    if (waiting[key]) { waiting[key].push(done); return; }
    waiting[key] = [done];
    tag = document.createElement("script");
    tag.src = index.dir + "/" + series + "-" + ("0000" + k).slice(-5) + ".js?v=" + index.version;
    tag.onerror = function () {
      delete waiting[key];
      document.querySelectorAll(".where").forEach(function (e) {
        e.textContent = "rows missing (" + tag.src.split("?")[0] + "): run diffiml report on this folder again";
      });
    };
    document.head.appendChild(tag);
  }
  function rowsAt(series, first, count, done) {  // a screen lies within one file: chunk is a multiple of size
    if (first >= index.counts[series]) { done([]); return; }
    var k = Math.floor(first / chunk), offset = first - k * chunk;
    load(series, k, function (rows) { done(rows.slice(offset, offset + count)); });
  }
  function series() { return only.checked ? "manipulated" : "ranked"; }
  function pages() { return Math.max(1, Math.ceil(index.counts[series()] / size)); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function current() {
    var m = /page=(\\d+)/.exec(location.hash), p = m ? parseInt(m[1], 10) : 1;
    return Math.min(Math.max(p, 1), pages());
  }
  function show(r, links) {
    var panes = viewer.querySelector(".panes");
    var items = [["image", r.v], ["heat map", r.hm], ["overlay", links.overlay]];
    panes.replaceChildren.apply(panes, items.map(function (item) {
      var fig = el("figure"), img;
      if (item[1]) { img = el("img"); img.alt = item[0] + " of " + r.p; img.src = item[1]; fig.appendChild(img); }
      else fig.appendChild(el("div", "none", "not available"));
      fig.appendChild(el("figcaption", null, item[0]));
      return fig;
    }));
    viewer.querySelector(".title").textContent = r.p + " \\u00b7 score " + fixed(r.s, 4) + " \\u00b7 " +
      (r.d === true ? "manipulated" : r.d === false ? "authentic" : "no decision");
    if (!viewer.open) viewer.showModal();
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
  function rowOf(r) {
    var links = {}, tr = el("tr", "row"), td;
    r.l.forEach(function (kv) { links[kv[0]] = kv[1]; });
    tr.appendChild(el("td", "num rank", r.r));
    td = el("td"); td.appendChild(thumb(r.t, links.overlay, "overlay of " + r.p)); tr.appendChild(td);
    td = el("td"); td.appendChild(thumb(r.u, links.uncertainty, "uncertainty of " + r.p)); tr.appendChild(td);
    tr.appendChild(el("td", "num score", fixed(r.s, 4)));
    tr.appendChild(el("td", "decision " + (r.d === true ? "yes" : r.d === false ? "no" : ""),
                      r.d === true ? "manipulated" : r.d === false ? "authentic" : "\\u2014"));
    tr.appendChild(el("td", "num fraction", r.f === null ? "\\u2014" : (100 * r.f).toFixed(2) + " %"));
    tr.appendChild(el("td", "num size", r.w && r.h ? r.w + " \\u00d7 " + r.h : "\\u2014"));
    tr.appendChild(el("td", "num members", r.m));
    td = el("td");
    td.appendChild(el("div", "path", r.p));
    td.appendChild(el("div", "sha", r.sha ? "sha256 " + r.sha : ""));
    tr.appendChild(td);
    td = el("td", "maps");
    r.l.forEach(function (kv) { var a = el("a", null, kv[0]); a.href = kv[1]; td.appendChild(a); });
    tr.appendChild(td);
    tr.addEventListener("click", function (event) {
      if (event.target.closest("a")) return;  // a link opens its file
      show(r, links);
    });
    return tr;
  }
  function render() {
    var p = current(), first = (p - 1) * size, which = series(), total = index.counts[which], ticket = ++drawing;
    rowsAt(which, first, size, function (shown) {
      if (ticket !== drawing) return;  // a later turn of the page won
      var frag = document.createDocumentFragment();
      shown.forEach(function (r) { frag.appendChild(rowOf(r)); });
      body.replaceChildren(frag);
      var none = only.checked ? "no image judged manipulated" : "no localized images";
      var text = total ? "rows " + (first + 1) + "\\u2013" + (first + shown.length) + " of " + total +
        " \\u00b7 page " + p + " of " + pages() : none;
      document.querySelectorAll(".where").forEach(function (e) { e.textContent = text; });
      document.querySelectorAll("button.prev").forEach(function (b) { b.disabled = p <= 1; });
      document.querySelectorAll("button.next").forEach(function (b) { b.disabled = p >= pages(); });
      document.body.setAttribute("data-series", which);
      document.body.setAttribute("data-page", String(p));
    });
  }
  function renderFailures(p) {
    var list = document.getElementById("failed-rows"), total = index.counts.failed;
    var last = Math.max(1, Math.ceil(total / size));
    failPage = Math.min(Math.max(p, 1), last);
    rowsAt("failed", (failPage - 1) * size, size, function (shown) {
      var frag = document.createDocumentFragment();
      shown.forEach(function (r) {
        var li = el("li");
        li.appendChild(el("code", "path", r.p));
        li.appendChild(document.createTextNode(" "));
        li.appendChild(el("span", "why", r.e));
        frag.appendChild(li);
      });
      list.replaceChildren(frag);
      var where = document.querySelector("#failures .fail-where");
      var from = (failPage - 1) * size;
      where.textContent = "failures " + (from + 1) + "\\u2013" + (from + shown.length) + " of " + total;
      document.querySelector("#failures button.fail-prev").disabled = failPage <= 1;
      document.querySelector("#failures button.fail-next").disabled = failPage >= last;
      document.body.setAttribute("data-failures-page", String(failPage));
    });
  }
  function go(delta) { location.hash = "page=" + (current() + delta); }
  only.addEventListener("change", function () { location.hash = "page=1"; render(); });
  viewer.querySelector("button.close").onclick = function () { viewer.close(); };
  viewer.addEventListener("click", function (event) { if (event.target === viewer) viewer.close(); });
  document.querySelectorAll("button.prev").forEach(function (b) { b.onclick = function () { go(-1); }; });
  document.querySelectorAll("button.next").forEach(function (b) { b.onclick = function () { go(1); }; });
  if (document.querySelector("#failures button.fail-next")) {
    document.querySelector("#failures button.fail-prev").onclick = function () { renderFailures(failPage - 1); };
    document.querySelector("#failures button.fail-next").onclick = function () { renderFailures(failPage + 1); };
    renderFailures(1);
  }
  window.addEventListener("hashchange", function () { render(); window.scrollTo(0, 0); });
  render();
})();
"""

PAGER = ('<nav class="pager"><button type="button" class="prev">&larr; previous</button>'
          '<span class="where"></span><button type="button" class="next">next &rarr;</button></nav>')

FAIL_PAGER = ('<nav class="pager"><button type="button" class="fail-prev">&larr; previous</button>'
              '<span class="fail-where"></span><button type="button" class="fail-next">next &rarr;</button></nav>')

PAGE = """<!doctype html>
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
<p class="counts"><strong id="n-done">{done}</strong> done &middot; <strong id="n-manipulated">{manipulated}</strong>
judged manipulated &middot; <strong id="n-failed">{failed}</strong> failed
<label class="filter"><input type="checkbox" id="only-manipulated"> manipulated only</label></p>
<p class="hint">Ranked by score: the calibrated probability that the image was manipulated. Click a row to see the
image, its heat map and the overlay side by side.</p>
</header>
""" + PAGER + """
<table id="ranked">
<thead><tr><th>rank</th><th>overlay</th><th>uncertainty</th><th>score</th><th>decision</th><th>marked</th>
<th>size</th><th>members</th><th>image</th><th>maps</th></tr></thead>
<tbody id="rows"></tbody>
</table>
""" + PAGER + """
<dialog id="viewer"><p><button type="button" class="close">close</button> <span class="title"></span></p>
<div class="panes"></div></dialog>
{failures}
<details class="settings-box"><summary>Settings</summary>
<table class="settings">
{settings}
</table>
</details>
<noscript>The ranked rows are drawn by the page's own script: allow JavaScript for this file.</noscript>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""
