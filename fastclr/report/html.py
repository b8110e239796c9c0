"""The report page: one self-contained HTML file.

A Content-Security-Policy allows nothing but inline styles, inline script and data: images, so
the page provably loads nothing from disk or network. A small inline script checks, once the
page has loaded, that every section rendered (each image decoded, each chart laid out) and
records any script error or blocked request; it writes the outcome into #render-check, where a
headless browser (tests/test_report_browser.py) reads it.
"""

from __future__ import annotations

from html import escape

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
"""Only what the file holds itself: its styles, its scripts, data: images (no font, no fetch)."""

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0; background: #fafafa; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0 2px; }
h2 { font-size: 17px; margin: 0 0 8px; }
section { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; padding: 14px 18px; margin: 14px 0; }
.charts { display: flex; flex-wrap: wrap; gap: 8px 18px; }
.note { color: #666; }
.caption { color: #444; max-width: 900px; }
pre { background: #f4f4f4; padding: 10px; overflow-x: auto; font-size: 12.5px; }
img { image-rendering: pixelated; max-width: 100%; }
#render-check { color: #999; font-size: 11px; }
.controls { display: flex; flex-wrap: wrap; gap: 8px 24px; margin: 6px 0 10px; }
.controls input[type=range] { width: 260px; vertical-align: middle; }
.playground { display: flex; flex-wrap: wrap; gap: 18px; }
.playground > div:first-child { max-width: 450px; }
#pg-matrix { cursor: pointer; border: 1px solid #ddd; }
table.stats th { text-align: left; font-weight: normal; color: #555; padding-right: 14px; }
table.stats td { font-variant-numeric: tabular-nums; }
.thumbs { display: flex; flex-wrap: wrap; gap: 6px; }
figure { margin: 0; text-align: center; font-size: 11px; color: #555; }
.aug-row { display: flex; gap: 6px; margin: 4px 0; align-items: center; }
.aug-row img.original { margin-right: 14px; outline: 2px solid #999; }
.panel { border: 1px solid #e3e3e3; border-radius: 4px; padding: 8px; margin-top: 8px; min-height: 40px; }
.map-panels { display: flex; flex-wrap: wrap; gap: 12px; }
.map-panels .panel { flex: 1 1 300px; }
g.legend { cursor: pointer; }
#map svg circle[data-i] { cursor: pointer; }
"""

# Collects errors from the moment the page starts parsing: script errors, failed or blocked loads
# (capture phase sees resource errors), CSP violations, and console.error calls.
EARLY_SCRIPT = """
window.__reportErrors = [];
window.addEventListener('error', function (e) {
  window.__reportErrors.push('error: ' + (e.message || (e.target && (e.target.src || e.target.tagName)) || 'unknown'));
}, true);
document.addEventListener('securitypolicyviolation', function (e) {
  window.__reportErrors.push('blocked: ' + e.blockedURI);
});
(function () {
  var orig = console.error;
  console.error = function () {
    window.__reportErrors.push('console: ' + Array.prototype.join.call(arguments, ' '));
    return orig.apply(console, arguments);
  };
})();
"""

CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var problems = [];
  var sections = document.querySelectorAll('section[data-check]');
  sections.forEach(function (s) {
    var kinds = s.getAttribute('data-check').split(' ');
    kinds.forEach(function (kind) {
      var found = s.querySelectorAll(kind);
      if (!found.length) problems.push(s.id + ': no ' + kind);
      found.forEach(function (el) {
        if (kind === 'img' && !(el.complete && el.naturalWidth > 0)) problems.push(s.id + ': image not decoded');
        var drawn = el.getBoundingClientRect().width > 0 && el.childElementCount > 0;
        if (kind === 'svg' && !drawn) problems.push(s.id + ': empty chart');
      });
    });
  });
  problems = problems.concat(window.__reportErrors);
  var out = document.getElementById('render-check');
  out.setAttribute('data-status', problems.length ? 'fail' : 'ok');
  out.setAttribute('data-sections', String(sections.length));
  out.textContent = problems.length ? 'render check failed: ' + problems.join('; ')
                                    : 'render check: ok, ' + sections.length + ' sections';
});
"""


def section(sid: str, title: str, body: str, check: str = "", caption: str = "", hidden: bool = False) -> str:
    """A titled section; `check` lists the element kinds ("svg img pre") it must render; `hidden`
    ones need the page's script, which shows them."""
    attr = (f' data-check="{check}"' if check else "") + (" hidden" if hidden else "")
    cap = f'<p class="caption">{caption}</p>' if caption else ""
    return f'<section id="{sid}"{attr}>\n<h2>{escape(title)}</h2>\n{cap}\n{body}\n</section>'


def note(text: str) -> str:
    """A grey explanatory paragraph (e.g. what to run to fill a section)."""
    return f'<p class="note">{text}</p>'


def page(title: str, subtitle: str, sections: list[str], data: str = "{}", script: str = "") -> str:
    """The whole document; `data` (JSON) is embedded for `script`, which runs before the check."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{STYLE}</style>
<script>{EARLY_SCRIPT}</script>
</head>
<body>
<main>
<h1>{escape(title)}</h1>
<p class="note">{subtitle}</p>
{chr(10).join(sections)}
<p id="render-check" data-status="pending">render check: pending</p>
</main>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
<script>{CHECK_SCRIPT}</script>
</body>
</html>
"""
