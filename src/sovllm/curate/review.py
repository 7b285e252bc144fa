"""The review page of `sovllm curate review`: one self-contained HTML file (inline CSS and JS, no
external resources) listing every curated pair worth a human look - dropped, flagged, or rated B or
C by the judge - with its chunk, and filter controls (labels, dropped/kept, text search) that work
offline from data attributes; an initial filter can come from the URL hash (`#flag=too_short`)."""

from __future__ import annotations

import pathlib
from collections import Counter
from html import escape

from sovllm.artifacts import write_atomic

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:70em;padding:1em;color:#222}
h1{font-size:1.4em;margin:.2em 0}
table.funnel{border-collapse:collapse;margin:.5em 0}
table.funnel td{border-bottom:1px solid #ddd;padding:.1em .8em}
table.funnel td.n{text-align:right;font-variant-numeric:tabular-nums}
#controls{position:sticky;top:0;background:#f6f6f6;border:1px solid #ddd;padding:.5em;margin:.5em 0}
#controls label{margin-right:.8em;white-space:nowrap}
#count{font-weight:bold;margin-left:1em}
.pair{border:1px solid #ccc;border-radius:4px;padding:.5em .8em;margin:.6em 0}
.pair[data-kept="0"]{border-left:4px solid #c33}
[hidden]{display:none!important}
.badge{display:inline-block;border-radius:3px;padding:0 .4em;margin-right:.3em;background:#eee;font-size:.85em}
.badge.drop{background:#fbdada}.badge.kept{background:#d8f3d8}.badge.flag{background:#fff1c2}
.q,.a{white-space:pre-wrap;margin:.3em 0}
.meta,.chunk{color:#555;font-size:.9em;margin:.3em 0}
pre{white-space:pre-wrap;background:#fafafa;padding:.5em;margin:.3em 0}
"""

# The page must work offline and from a file; the policy makes the browser refuse any load from elsewhere.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

# Pairs carry their labels in data attributes, so filtering needs no data embedded in the script.
_JS = """
(function () {
  var pairs = Array.prototype.slice.call(document.querySelectorAll(".pair"));
  var boxes = Array.prototype.slice.call(document.querySelectorAll("input.label"));
  var show = document.getElementById("show"), q = document.getElementById("q");
  var count = document.getElementById("count");
  function apply() {
    var on = {}, mode = show.value, needle = q.value.trim().toLowerCase(), n = 0;
    boxes.forEach(function (b) { if (b.checked) on[b.value] = true; });
    pairs.forEach(function (p) {
      var ok = p.dataset.labels.split(" ").some(function (l) { return on[l]; })
        && (mode === "all" || (mode === "dropped") === (p.dataset.kept === "0"))
        && (!needle || p.dataset.search.indexOf(needle) >= 0);
      p.hidden = !ok;
      if (ok) n++;
    });
    count.textContent = n + " shown";
  }
  function fromHash() {
    var h = new URLSearchParams(location.hash.slice(1)), flags = [];
    h.getAll("flag").forEach(function (v) { flags = flags.concat(v.split(",")); });
    if (flags.length) boxes.forEach(function (b) { b.checked = flags.indexOf(b.value) >= 0; });
    if (h.has("show")) show.value = h.get("show");
    if (h.has("q")) q.value = h.get("q");
    apply();
  }
  document.getElementById("all").addEventListener("click", function () {
    boxes.forEach(function (b) { b.checked = true; });
    apply();
  });
  document.getElementById("controls").addEventListener("input", apply);
  document.getElementById("controls").addEventListener("change", apply);
  window.addEventListener("hashchange", fromHash);
  fromHash();
})();
"""


def _token(value: object) -> str:
    """A label usable in a space-separated data attribute."""
    return "_".join(str(value).split()) or "_"


def _is_shown(record: dict) -> bool:
    judge = record.get("judge") or {}
    return not record.get("kept") or bool(record.get("flags")) or judge.get("rating") in ("B", "C")


def _labels(record: dict) -> list[str]:
    """Filter labels of a pair: its flags, its drop reason and `judge:B` / `judge:C`."""
    labels = [_token(f) for f in record.get("flags") or []]
    if not record.get("kept"):
        labels.append(_token(record.get("drop_reason") or "dropped"))
    rating = (record.get("judge") or {}).get("rating")
    if rating in ("B", "C"):
        labels.append(f"judge:{rating}")
    return list(dict.fromkeys(labels))


def _funnel_rows(funnel: dict, depth: int = 0) -> list[str]:
    rows = []
    for key, value in funnel.items():
        pad = f' style="padding-left:{0.8 + 1.2 * depth:.1f}em"'
        shown = "" if isinstance(value, dict) else escape(str(value))
        rows.append(f'<tr><td{pad}>{escape(str(key))}</td><td class="n">{shown}</td></tr>')
        if isinstance(value, dict):
            rows.extend(_funnel_rows(value, depth + 1))
    return rows


def _chunk_html(chunk_id: str, chunk: dict | None) -> str:
    if chunk is None:
        return f'<p class="chunk">chunk not found: <code>{escape(str(chunk_id))}</code></p>'
    source = chunk.get("source") or {}
    where = escape(str(source.get("path", "")))
    if source.get("page") is not None:
        where += f", page {escape(str(source['page']))}"
    heading = escape(" > ".join(chunk.get("heading_path") or []))
    return (f'<p class="chunk">chunk <code>{escape(str(chunk_id))}</code> &middot; {where}'
            f'{" &middot; " + heading if heading else ""}</p>'
            f'<details><summary>chunk text</summary><pre>{escape(chunk.get("text", ""))}</pre></details>')


def _pair_html(record: dict, chunks: dict[str, dict], anchors: set[str]) -> str:
    rid = str(record.get("id", ""))
    kept = bool(record.get("kept"))
    status = ('<span class="badge kept">kept</span>' if kept else
              f'<span class="badge drop">dropped: {escape(str(record.get("drop_reason") or "unknown"))}</span>')
    flags = "".join(f'<span class="badge flag">{escape(str(f))}</span>' for f in record.get("flags") or [])
    parts = [f'<div class="meta"><code>{escape(rid)}</code> {status}'
             f'<span class="badge">{escape(str(record.get("type", "")))}</span>{flags}</div>',
             f'<p class="q"><b>Q:</b> {escape(str(record.get("question", "")))}</p>',
             f'<p class="a"><b>A:</b> {escape(str(record.get("answer", "")))}</p>']
    judge = record.get("judge")
    if judge:
        hallucination = "yes" if judge.get("hallucination") else "no"
        parts.append(f'<p class="meta judge">judge <b>{escape(str(judge.get("rating", "?")))}</b>'
                     f' &middot; hallucination: {hallucination}'
                     f' &middot; {escape(str(judge.get("reasoning", "")))}</p>')
    dup = record.get("dup_of")
    if dup:
        # The kept twin is often omitted from the page, so link only when it is here.
        target = (f'<a href="#p-{escape(str(dup))}">{escape(str(dup))}</a>' if str(dup) in anchors
                  else f'<code>{escape(str(dup))}</code>')
        parts.append(f'<p class="meta dup">duplicate of {target}</p>')
    parts.append(_chunk_html(record.get("chunk_id", ""), chunks.get(record.get("chunk_id", ""))))
    search = " ".join(str(record.get(k, "")) for k in ("id", "question", "answer")).lower()
    return (f'<article class="pair" id="p-{escape(rid)}" data-labels="{escape(" ".join(_labels(record)))}"'
            f' data-kept="{int(kept)}" data-search="{escape(search)}">\n' + "\n".join(parts) + "\n</article>")


def render_review(records: list[dict], chunks: dict[str, dict], *, title: str,
                  funnel: dict | None = None) -> str:
    """The complete review page for curated records and their chunks."""
    shown = [r for r in records if _is_shown(r)]
    counts = Counter(label for r in shown for label in _labels(r))
    boxes = "".join(
        f'<label><input type="checkbox" class="label" value="{escape(label)}" checked> '
        f'{escape(label.replace(":", " "))} ({n})</label>'
        for label, n in sorted(counts.items(), key=lambda kv: (kv[0].startswith("judge:"), kv[0])))
    anchors = {str(r.get("id", "")) for r in shown}
    funnel_html = (f'<table class="funnel">{"".join(_funnel_rows(funnel))}</table>' if funnel else "")
    pairs = "\n".join(_pair_html(r, chunks, anchors) for r in shown)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{escape(title)}</h1>
<p id="summary">{len(records)} pairs in total, {len(shown)} shown here
(kept pairs without flags and without a judge rating of B or C are left out).</p>
{funnel_html}
<div id="controls">
<div>{boxes} <button type="button" id="all">all labels</button></div>
<div>
<select id="show">
<option value="all">all</option><option value="dropped">dropped</option><option value="kept">kept</option>
</select>
<input type="search" id="q" placeholder="search question, answer, id">
<span id="count">{len(shown)} shown</span>
</div>
</div>
<main>
{pairs}
</main>
<script>{_JS}</script>
</body>
</html>
"""


def write_review(path: pathlib.Path, records: list[dict], chunks: dict[str, dict], *, title: str,
                 funnel: dict | None = None) -> int:
    """Write the review page atomically to `path`; returns the number of pairs shown."""
    page = render_review(records, chunks, title=title, funnel=funnel)
    write_atomic(path, page)
    return sum(1 for r in records if _is_shown(r))
