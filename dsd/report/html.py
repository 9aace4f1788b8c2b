"""report.html: a sweep at a glance, opened from disk with no server.

Top: the metrics table of dsd-eval (click a header to sort; mean rows stay below). Then one section
per prompt: one row per seed, one column per method; each cell shows the seed's evaluation views
(seeds in a column share the cameras) and its looping turntable. Images are PNG files under
`report_files/` beside the page (or data: URIs with inline=True) and turntables are referenced by
their path relative to the page (or inlined), so the page works wherever the sweep dir is opened.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import time
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from dsd.outputs import atomic_write_bytes, to_uint8

if TYPE_CHECKING:
    from dsd.evaluate import RunRecord

FILES_DIR = "report_files"
VIEW_PX = 96  # displayed size of one evaluation view: 4 views + a turntable per method fit a laptop

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.15em; margin: 1.4em 0 .4em; }
.meta { color: #666; font-size: .9em; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; }
table.metrics th, table.metrics td { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
table.metrics th { cursor: pointer; user-select: none; background: #f4f4f4; position: sticky; top: 0; }
table.metrics th[data-dir=asc]::after { content: " \\25B2"; } table.metrics th[data-dir=desc]::after { content: " \\25BC"; }
table.metrics td:nth-child(-n+2), table.metrics th:nth-child(-n+2) { text-align: left; }
table.metrics tbody.means td { font-weight: 600; background: #fafafa; }
table.gallery th, table.gallery td { padding: 4px; border: 1px solid #e4e4e4; vertical-align: top; }
table.gallery th.seed, table.gallery td.seed { position: sticky; left: 0; background: #fff; z-index: 1; }
.cell { display: flex; gap: 2px; align-items: flex-start; }
.cell img, .cell video { width: VIEW_PXpx; height: VIEW_PXpx; object-fit: contain; background: #eee; }
img.pixelated { image-rendering: pixelated; }
.caption { font-size: .8em; color: #555; }
""".replace("VIEW_PX", str(VIEW_PX))

# Sort the clicked column of its table's first tbody: numbers numerically, text alphabetically,
# empty cells last; a second click reverses.
SCRIPT = """
document.querySelectorAll("table.metrics").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.dataset.dir !== "asc";
      table.querySelectorAll("thead th").forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = asc ? "asc" : "desc";
      var body = table.tBodies[0];
      var key = function (row) {
        var cell = row.cells[col], v = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent;
        if (v === "") return null;
        var n = Number(v);
        return isNaN(n) ? v : n;
      };
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) return (x === null) - (y === null);
        var d = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
        return asc ? d : -d;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class Assets:
    """Where the page's images and videos live: files beside the page, or inline data: URIs."""

    def __init__(self, out: Path, inline: bool) -> None:
        self.out, self.inline = out, inline

    def image(self, image: np.ndarray, name: str) -> str:
        data = png_bytes(image)
        if self.inline:
            return data_uri(data, "image/png")
        path = self.out / FILES_DIR / name
        atomic_write_bytes(path, data)
        return Path(os.path.relpath(path, self.out)).as_posix()

    def video(self, path: Path) -> str:
        if self.inline:
            return data_uri(path.read_bytes(), "video/mp4")
        return Path(os.path.relpath(path.resolve(), self.out.resolve())).as_posix()


def metrics_table(columns: list[str], rows: list[dict]) -> str:
    from dsd.evaluate import format_value, header

    def row_html(row: dict) -> str:
        cells = []
        for c in columns:
            value = row.get(c)
            raw = "" if value is None else (repr(value) if isinstance(value, float) else str(value))
            cells.append(f'<td data-v="{escape(raw)}">{escape(format_value(value))}</td>')
        return "<tr>" + "".join(cells) + "</tr>"

    head = "".join(f'<th title="click to sort">{escape(header(c))}</th>' for c in columns)
    body = "\n".join(row_html(r) for r in rows if not r.get("mean_row"))
    means = "\n".join(row_html(r) for r in rows if r.get("mean_row"))
    return (f'<div class="scroll"><table class="metrics"><thead><tr>{head}</tr></thead>\n'
            f"<tbody>{body}</tbody>\n<tbody class=\"means\">{means}</tbody></table></div>")


def seed_caption(record: RunRecord, seed: int) -> str:
    entry = next(e for e in record.per_seed if e["seed"] == seed)
    parts = []
    if "nearest_reference" in entry:
        parts.append(f"ref {entry['nearest_reference']} at {entry['psnr_to_reference']:.1f} dB"
                     + (" (reached)" if entry.get("reached") else ""))
    if "ddim_nearest_reference" in entry:
        parts.append(f"DDIM ref {entry['ddim_nearest_reference']}")
    if "clip_sim" in entry:
        parts.append(f"CLIP {entry['clip_sim']:.3g}")
    return "; ".join(parts)


def run_cell(record: RunRecord, seed: int, assets: Assets) -> str:
    index = record.seeds.index(seed)
    tag = hashlib.sha1(str(record.run_dir.resolve()).encode()).hexdigest()[:10]
    views = record.views[index]
    small = views.shape[1] < VIEW_PX
    images = []
    for v, view in enumerate(views):
        src = assets.image(view, f"{tag}/seed_{seed}_view_{v}.png")
        alt = f"{record.method}, {record.prompt}, seed {seed}, view {v + 1}"
        images.append(f'<img src="{escape(src)}" alt="{escape(alt)}" title="view {v + 1}"'
                      f'{" class=pixelated" if small else ""}>')
    if seed in record.turntables:
        src = assets.video(record.turntables[seed])
        images.append(f'<video src="{escape(src)}" autoplay loop muted playsinline preload="auto" '
                      f'title="turntable"></video>')
    caption = seed_caption(record, seed)
    return (f'<td><div class="cell">{"".join(images)}</div>'
            + (f'<div class="caption">{escape(caption)}</div>' if caption else "") + "</td>")


def gallery(prompt: str, records: list[RunRecord], assets: Assets) -> str:
    methods = sorted(records, key=lambda r: r.method)
    seeds = sorted({s for r in methods for s in r.seeds})
    head = '<th class="seed">seed</th>' + "".join(
        f'<th>{escape(r.method)}<div class="caption">{r.views.shape[1]} view{"s" * (r.views.shape[1] != 1)}'
        f'{" + turntable" if r.turntables else ""}</div></th>' for r in methods)
    rows = []
    for seed in seeds:
        cells = "".join(run_cell(r, seed, assets) if seed in r.seeds else "<td></td>" for r in methods)
        rows.append(f'<tr><td class="seed">{seed}</td>{cells}</tr>')
    return (f"<h2>{escape(prompt)}</h2>\n<div class=\"scroll\"><table class=\"gallery\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def write_report(out: Path, records: list[RunRecord], columns: list[str], rows: list[dict],
                 inline: bool = False) -> Path:
    """Write `<out>/report.html` (and its images under report_files/ unless `inline`)."""
    out = Path(out)
    assets = Assets(out, inline)
    prompts = sorted({r.prompt for r in records})
    sections = "\n".join(gallery(p, [r for r in records if r.prompt == p], assets) for p in prompts)
    methods = sorted({r.method for r in records})
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dsd-eval: {escape(out.name)}</title>
<style>{STYLE}</style></head>
<body>
<h1>{escape(out.name)}</h1>
<p class="meta">{len(records)} runs: {len(methods)} method{"s" * (len(methods) != 1)} x {len(prompts)}
prompt{"s" * (len(prompts) != 1)}; written by dsd-eval {escape(time.strftime("%Y-%m-%d %H:%M"))}.
Click a column header to sort. Each row below is one seed; seeds in a column are rendered from the same cameras.</p>
{metrics_table(columns, rows)}
{sections}
<script>{SCRIPT}</script>
</body></html>
"""
    path = out / "report.html"
    atomic_write_bytes(path, page.encode())
    return path
