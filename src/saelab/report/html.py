"""Self-contained HTML (inline CSS and JS, no network) for the dashboard and the run report.

Both pages work from ``file://``: the data sit in a ``<script type="application/json">``
element and a small script renders them; nothing is fetched.
"""

from __future__ import annotations

import html
import json
from typing import Any

CSS = """
:root { --fg:#1d1d1f; --muted:#6b6b70; --line:#e2e2e6; --acc:#2f5fa7; --bg2:#f6f6f8; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, Segoe UI, Roboto, sans-serif; color: var(--fg);
       margin: 0; }
header { padding: 10px 18px; border-bottom: 1px solid var(--line); background: var(--bg2); }
header h1 { font-size: 17px; margin: 0 0 2px 0; }
header .meta { color: var(--muted); font-size: 12px; }
main { display: flex; height: calc(100vh - 58px); }
#left { width: 430px; min-width: 330px; border-right: 1px solid var(--line); display: flex;
        flex-direction: column; }
#left .tools { padding: 8px 10px; border-bottom: 1px solid var(--line); }
#search { width: 100%; padding: 6px 8px; font-size: 14px; border: 1px solid #c8c8cc;
          border-radius: 5px; }
#count { color: var(--muted); font-size: 12px; margin-top: 4px; }
#index-wrap { overflow-y: auto; flex: 1; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 3px 7px; text-align: left; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { position: sticky; top: 0; background: #fff; cursor: pointer; user-select: none;
     font-size: 12px; color: var(--muted); }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
#index tbody tr { cursor: pointer; }
#index tbody tr:hover { background: #eef3fb; } #index tbody tr.sel { background: #dde8f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.toks { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
#card { flex: 1; overflow-y: auto; padding: 12px 20px; }
#card h2 { margin: 0 0 4px 0; font-size: 18px; }
.stats { color: var(--muted); margin-bottom: 8px; }
.row2 { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
.logits td { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
.logits td.v { text-align: right; }
h3 { font-size: 14px; margin: 16px 0 6px 0; }
.ex { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px;
      white-space: pre-wrap; padding: 2px 0; border-bottom: 1px dotted var(--line); }
.ex .act { display: inline-block; width: 58px; color: var(--muted); text-align: right;
           margin-right: 8px; }
.tok { border-radius: 2px; }
.tok.center { outline: 1.5px solid #222; }
details { margin: 4px 0; } summary { cursor: pointer; color: var(--acc); }
.empty { color: var(--muted); font-style: italic; }
.note { color: var(--muted); font-size: 12px; }
svg text { font: 10px system-ui, sans-serif; fill: #555; }
"""

DASHBOARD_JS = r"""
(function () {
  const D = JSON.parse(document.getElementById('data').textContent);
  const V = D.vocab, L = D.latents;
  const esc = s => s.replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
  const show = t => esc(t.replace(/\n/g, '\u21b5').replace(/\t/g, '\u21e5'));
  const fmt = (x, n) => (x === 0 ? '0' : Math.abs(x) >= 1000 || Math.abs(x) < 0.01
      ? x.toExponential(n - 1) : x.toPrecision(n));
  L.forEach(l => { l.text = l.top_tokens.map(i => V[i]).join(' ').toLowerCase(); });
  const body = document.querySelector('#index tbody');
  let sortKey = 'index', sortDir = 1, selected = null;
  function renderIndex() {
    const q = document.getElementById('search').value.trim().toLowerCase();
    const rows = L.filter(l => !q || l.text.includes(q) || String(l.index) === q);
    rows.sort((a, b) => sortDir * (a[sortKey] - b[sortKey]) || a.index - b.index);
    body.innerHTML = rows.map(l => '<tr data-i="' + l.index + '"' +
      (l.index === selected ? ' class="sel"' : '') + '><td class="num">' + l.index +
      '</td><td class="num">' + fmt(l.density, 3) + '</td><td class="num">' + fmt(l.max, 3) +
      '</td><td class="toks">' + l.top_tokens.slice(0, 6).map(i => show(V[i])).join(' \u00b7 ') +
      '</td></tr>').join('');
    document.getElementById('count').textContent = rows.length + ' of ' + L.length + ' latents';
    document.querySelectorAll('#index th').forEach(th => {
      th.classList.remove('sorted-asc', 'sorted-desc');
      if (th.dataset.key === sortKey) th.classList.add(sortDir > 0 ? 'sorted-asc' : 'sorted-desc');
    });
  }
  document.querySelectorAll('#index th[data-key]').forEach(th => th.addEventListener('click', () => {
    const k = th.dataset.key;
    if (sortKey === k) sortDir = -sortDir; else { sortKey = k; sortDir = k === 'index' ? 1 : -1; }
    renderIndex();
  }));
  document.getElementById('search').addEventListener('input', renderIndex);
  body.addEventListener('click', e => {
    const tr = e.target.closest('tr'); if (tr) location.hash = 'latent-' + tr.dataset.i;
  });
  function color(v, scale) {
    if (!v || !scale) return '';
    const a = Math.min(1, Math.abs(v) / scale) * 0.85;
    return v > 0 ? 'rgba(255,128,0,' + a.toFixed(3) + ')' : 'rgba(40,110,255,' + a.toFixed(3) + ')';
  }
  function example(ex, scale) {
    // ex = [center, value, [token ids], [i, v, i, v, ...] nonzero values]
    const vals = new Array(ex[2].length).fill(0);
    for (let j = 0; j < ex[3].length; j += 2) vals[ex[3][j]] = ex[3][j + 1];
    const toks = ex[2].map((t, j) => '<span class="tok' + (j === ex[0] ? ' center' : '') +
      '" title="' + fmt(vals[j], 3) + '" style="background:' + color(vals[j], scale) + '">' +
      show(V[t]) + '</span>').join('');
    return '<div class="ex"><span class="act">' + fmt(ex[1], 3) + '</span>' + toks + '</div>';
  }
  function hist(h, w, hgt, neg) {
    const m = Math.max(1, ...h.counts), n = h.counts.length, bw = w / n;
    let s = '<svg width="' + w + '" height="' + (hgt + 16) + '">';
    h.counts.forEach((c, j) => {
      const bh = c ? Math.max(1, c / m * hgt) : 0;
      s += '<rect x="' + (j * bw).toFixed(1) + '" y="' + (hgt - bh).toFixed(1) + '" width="' +
        Math.max(1, bw - 1).toFixed(1) + '" height="' + bh.toFixed(1) + '" fill="' +
        (neg ? '#3f7fe0' : '#f08a24') + '"><title>' + fmt(h.centers[j], 3) + ': ' + c +
        '</title></rect>';
    });
    s += '<text x="0" y="' + (hgt + 12) + '">' + fmt(h.centers[0], 2) + '</text>';
    s += '<text x="' + (w - 40) + '" y="' + (hgt + 12) + '">' + fmt(h.centers[n - 1], 2) +
      '</text></svg>';
    return s;
  }
  function logitTable(rows, title) {
    return '<table class="logits"><thead><tr><th>' + title + '</th><th></th></tr></thead><tbody>' +
      rows.map(r => '<tr><td>' + show(V[r[0]]) + '</td><td class="v">' + fmt(r[1], 3) +
      '</td></tr>').join('') + '</tbody></table>';
  }
  function renderCard(i) {
    const l = L.find(x => x.index === i), card = document.getElementById('card');
    if (!l) { card.innerHTML = '<p class="empty">latent ' + i + ' is not in this dashboard</p>'; return; }
    selected = i;
    let s = '<div id="latent-card" data-latent="' + i + '"><h2>Latent ' + i + '</h2>' +
      '<div class="stats">density ' + fmt(l.density, 3) + ' (log10 ' +
      (l.density > 0 ? Math.log10(l.density).toFixed(2) : '-inf') + ') \u00b7 max ' +
      fmt(l.max, 4) + (D.signed ? ' \u00b7 min ' + fmt(l.min, 4) : '') + '</div>';
    s += '<div class="row2"><div><h3>Activation histogram</h3>' +
      l.sides.map(sd => hist(sd.hist, 300, 70, sd.sign < 0)).join('') + '</div>';
    if (l.logits) s += '<div><h3>Logit lens</h3><div class="row2">' +
      logitTable(l.logits.pos, 'top (promoted)') + logitTable(l.logits.neg, 'bottom (suppressed)') +
      '</div><div class="note">' + esc(D.meta.logit_lens) + '</div></div>';
    s += '</div>';
    if (l.atom) {
      s += '<h3>Dictionary atom source</h3>';
      s += l.atom.tokens ? '<div class="ex">' + l.atom.tokens.map((t, j) =>
        '<span class="tok' + (j === l.atom.center ? ' center' : '') + '">' + show(V[t]) +
        '</span>').join('') + '</div>' : '';
      s += '<div class="note">training window ' + l.atom.window + ', position ' + l.atom.pos + '</div>';
    }
    l.sides.forEach(sd => {
      const scale = Math.abs(sd.extreme);
      const pole = sd.sign > 0 ? '' : ' (negative pole)';
      s += '<h3>Top activations' + pole + '</h3><div class="examples">' +
        (sd.top.length ? sd.top.map(ex => example(ex, scale)).join('') :
         '<p class="empty">never fires on the scanned rows</p>') + '</div>';
      s += '<h3>Activation bins' + pole + '</h3>';
      sd.bins.slice().reverse().forEach(b => {
        s += '<details><summary>' + fmt(b.lo, 3) + ' \u2013 ' + fmt(b.hi, 3) + ' \u00b7 ' +
          b.count + ' tokens (' + (100 * b.frac).toFixed(1) + '%)</summary>' +
          (b.examples.length ? b.examples.map(ex => example(ex, scale)).join('') :
           '<p class="empty">no tokens</p>') + '</details>';
      });
    });
    card.innerHTML = s + '</div>';
    renderIndex();
  }
  function fromHash() {
    const m = location.hash.match(/^#latent-(\d+)$/);
    if (m) renderCard(parseInt(m[1], 10));
  }
  window.addEventListener('hashchange', fromHash);
  renderIndex();
  if (location.hash) fromHash();
})();
"""


def _json_script(obj: Any, el_id: str = "data") -> str:
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    # nothing inside may close the script element
    text = text.replace("</", "<\\/").replace("<!--", "<\\!--")
    return f'<script type="application/json" id="{el_id}">{text}</script>'


def page(title: str, body: str, script: str = "", data: Any = None) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>{body}"
            + (_json_script(data) if data is not None else "")
            + (f"<script>{script}</script>" if script else "") + "</body></html>\n")


class _Vocab:
    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.strs: list[str] = []

    def __call__(self, s: str) -> int:
        if s not in self.ids:
            self.ids[s] = len(self.strs)
            self.strs.append(s)
        return self.ids[s]


def _compact_example(x: dict, vocab: _Vocab) -> list:
    nz: list[float] = []
    for j, v in enumerate(x["values"]):
        if v != 0:
            nz += [j, v]
    return [x["center"], x["values"][x["center"]], [vocab(t) for t in x["tokens"]], nz]


def compact_records(recs: list[dict]) -> tuple[list[dict], list[str]]:
    """Records with token strings replaced by ids into one table and context values kept
    sparse (most are zero), so thousands of latents fit in one page."""
    vocab = _Vocab()
    out = []
    for r in recs:
        c: dict[str, Any] = {"index": r["index"], "density": r["density"], "max": r["max"],
                             "min": r["min"], "sides": []}
        for s in r["sides"]:
            c["sides"].append({
                "sign": s["sign"], "extreme": s["extreme"], "hist": s["hist"],
                "top": [_compact_example(x, vocab) for x in s["top"]],
                "bins": [{"lo": b["lo"], "hi": b["hi"], "count": b["count"], "frac": b["frac"],
                          "examples": [_compact_example(x, vocab) for x in b["examples"]]}
                         for b in s["bins"]]})
        if "logits" in r:
            c["logits"] = {k: [[vocab(t), v] for t, v in r["logits"][k]] for k in ("pos", "neg")}
        c["top_tokens"] = [vocab(t) for t in r["top_tokens"]]
        if "atom" in r:
            a = dict(r["atom"])
            if "tokens" in a:
                a["tokens"] = [vocab(t) for t in a["tokens"]]
            c["atom"] = a
        out.append(c)
    return out, vocab.strs


def dashboard_html(recs: list[dict], meta, data) -> str:
    """The dashboard page: an index of latents (sortable by density and max activation,
    searchable by their top tokens) and a card per latent."""
    latents, vocab = compact_records(recs)
    m = meta
    sub = (f"{html.escape(m.architecture)} SAE · d_sae {m.d_sae} · {html.escape(m.model)} · "
           f"{html.escape(m.hook)} · {data.n_rows:,} held-out tokens scanned "
           f"({html.escape(m.dataset)}) · {len(recs)} latents shown")
    body = (
        f"<header><h1>Feature dashboard</h1><div class=\"meta\">{sub}</div></header>"
        "<main><div id=\"left\"><div class=\"tools\">"
        "<input id=\"search\" type=\"search\" placeholder=\"search top tokens or a latent id\" "
        "autocomplete=\"off\"><div id=\"count\"></div></div>"
        "<div id=\"index-wrap\"><table id=\"index\"><thead><tr>"
        "<th data-key=\"index\">latent</th><th data-key=\"density\">density</th>"
        "<th data-key=\"max\">max act</th><th>top tokens</th></tr></thead><tbody></tbody>"
        "</table></div></div><div id=\"card\"><p class=\"empty\">Pick a latent on the left."
        "</p></div></main>")
    payload = {"meta": {"logit_lens": m.logit_lens, "model": m.model, "hook": m.hook},
               "signed": bool(data.signed), "latents": latents, "vocab": vocab}
    return page(f"saelab dashboard · {m.architecture} · {m.hook}", body, DASHBOARD_JS, payload)
