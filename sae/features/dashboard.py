"""A static HTML dashboard of feature records: a sortable index and one page per feature, no server, no CDN.

``index.html`` lists every feature of every method; ``<method>/<feature>.html`` shows its highlighted contexts,
its activation histogram stacked by token (inline SVG), and its logit tables (direct path and causal ablation).
"""

from __future__ import annotations

import html

STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:70em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}th{cursor:pointer;background:#eee}
.ctx{font-family:monospace;white-space:pre-wrap;margin:2px 0}.ctx span{border-radius:2px}
.focus{outline:2px solid #000;font-weight:bold;text-decoration:underline}.tables{display:flex;gap:2em;flex-wrap:wrap}"""

SORT_JS = """function sortBy(col){const t=document.getElementById('features'),b=t.tBodies[0],
rows=[...b.rows],dir=t.dataset.col==col&&t.dataset.dir=='desc'?1:-1;t.dataset.col=col;t.dataset.dir=dir<0?'desc':'asc';
rows.sort((x,y)=>{const a=x.cells[col].dataset.v,c=y.cells[col].dataset.v,n=parseFloat(a),m=parseFloat(c);
return (isNaN(n)||isNaN(m)?a.localeCompare(c):(n-m))*dir});rows.forEach(r=>b.appendChild(r))}"""

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#aaaaaa"]


def _page(title: str, body: str, script: str = "") -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><script>{script}</script></head><body>{body}</body></html>")


def _tok(names: dict[int, str], token: int | None) -> str:
    return "other" if token is None else html.escape(repr(names.get(token, str(token)))[1:-1])


VISIBLE = {"\r\n": "↵", "\n": "↵", "\r": "↵", "\t": "⇥"}  # a context stays one line: its breaks are shown


def visible(text: str) -> str:
    """A token's text with line breaks and tabs as symbols (↵, ⇥), escaped for HTML."""
    for raw, symbol in VISIBLE.items():
        text = text.replace(raw, symbol)
    return html.escape(text)


def context_html(example: dict, names: dict[int, str], high: float) -> str:
    """One context on one line, each token's background red in proportion to the feature's activation on it; the
    token the example is about (its ``focus``) is outlined, bold and underlined."""
    spans = []
    for i, (token, act) in enumerate(zip(example["tokens"], example["acts"])):
        alpha = min(1.0, act / high) if high > 0 else 0.0
        focus = i == example["focus"]
        cls = " class='focus'" if focus else ""
        title = f"{act:.3g} (the activating token)" if focus else f"{act:.3g}"
        spans.append(f"<span{cls} title='{title}' style='background:rgba(255,0,0,{alpha:.2f})'>"
                     f"{visible(names.get(token, str(token)))}</span>")
    return f"<div class='ctx'>{example['activation']:.3g}: {''.join(spans)}</div>"


def histogram_svg(hist: dict, names: dict[int, str], width: int = 480, height: int = 160) -> str:
    """The activation histogram as stacked bars, one colour per token, with a legend."""
    stacks, edges = hist["stacks"], hist["edges"]
    totals = [sum(s["counts"][i] for s in stacks) for i in range(len(edges) - 1)]
    bar, top = width / len(totals), max(max(totals), 1)
    rects = []
    for i in range(len(totals)):
        y = height
        for colour, stack in zip(COLOURS, stacks):
            h = stack["counts"][i] / top * (height - 10)
            y -= h
            rects.append(
                f"<rect x='{i * bar:.1f}' y='{y:.1f}' width='{bar - 1:.1f}' height='{h:.1f}' fill='{colour}'/>"
            )
    legend = " ".join(
        f"<span style='color:{c}'>&#9632; {_tok(names, s['token'])}</span>" for c, s in zip(COLOURS, stacks)
    )
    return (
        f"<svg width='{width}' height='{height + 15}'>{''.join(rects)}"
        f"<text x='0' y='{height + 12}' font-size='10'>0</text>"
        f"<text x='{width - 40}' y='{height + 12}' font-size='10'>{edges[-1]:.3g}</text></svg><div>{legend}</div>"
    )


def logit_table(title: str, table: dict, names: dict[int, str]) -> str:
    rows = "".join(f"<tr><td>{_tok(names, u)}</td><td>{uv:+.3f}</td><td>{_tok(names, d)}</td><td>{dv:+.3f}</td></tr>"
                   for (u, uv), (d, dv) in zip(table["up"], table["down"]))
    return f"<div><h3>{title}</h3><table><tr><th>up</th><th></th><th>down</th><th></th></tr>{rows}</table></div>"


def explanation_html(explanation: tuple[str, str] | None) -> str:
    """An automatic explanation (text, who wrote it) for the top of a feature page; nothing when there is none."""
    if explanation is None:
        return ""
    text, by = explanation
    return f"<p><b>Automatic explanation</b> ({html.escape(by)}): {html.escape(text)}</p>"


def feature_page(method: str, hook: str, rec: dict, names: dict[int, str],
                 explanation: tuple[str, str] | None = None) -> str:
    high = rec["max"]
    top = "".join(context_html(e, names, high) for e in rec["top"])
    quant = "".join(f"<h4>activations {q['range'][0]:.3g} to {q['range'][1]:.3g}</h4>"
                    + "".join(context_html(e, names, high) for e in q["examples"]) for q in rec["quantiles"])
    tokens = ", ".join(f"{_tok(names, t)} ({s:.0%})" for t, s in rec["top_tokens"][:5])
    causal = rec.get("causal")  # measured on a sample of the features (analysis.settings.causal_features)
    causal_table = "" if causal is None else logit_table(
        f"Causal: next-token logit change when ablated ({causal['contexts']} top contexts)", causal, names)
    body = (
        f"<p><a href='../index.html'>index</a></p><h1>{html.escape(method)} feature {rec['index']}</h1>"
        f"<p>{html.escape(hook)}; density {rec['density']:.3g} ({rec['count']} tokens); top-token share "
        f"{rec['top_token_share']:.2f}; token entropy {rec['token_entropy']:.2f} nats; activation mass on: {tokens}</p>"
        f"{explanation_html(explanation)}"
        f"<h2>Activations by token</h2>{histogram_svg(rec['histogram'], names)}"
        "<div class='tables'>"
        f"{logit_table('Direct path (atom through the final norm weight and unembedding)', rec['direct'], names)}"
        f"{causal_table}</div>"
        f"<h2>Top activating contexts</h2>{top}<h2>Samples across activation quantiles</h2>{quant}"
    )
    return _page(f"{method} feature {rec['index']}", body)


def _cell(value, text: str | None = None) -> str:
    return f"<td data-v='{html.escape(str(value))}'>{text if text is not None else html.escape(str(value))}</td>"


def index_page(methods: dict, names: dict[int, str], rows: list[dict]) -> str:
    """All features in one table, sortable by clicking a column header; the per-method summary above it."""
    head = ["method", "feature", "density", "top_token_share", "token_entropy", "top tokens"]
    lines = []
    for method, data in methods.items():
        for rec in data["features"]:
            link = f"<a href='{method}/{rec['index']}.html'>{rec['index']}</a>" if "top" in rec else str(rec["index"])
            tokens = ", ".join(_tok(names, t) for t, _ in rec.get("top_tokens", [])[:3])
            lines.append(
                "<tr>"
                + _cell(method)
                + _cell(rec["index"], link)
                + _cell(f"{rec['density']:.4g}")
                + _cell(f"{rec['top_token_share']:.3f}")
                + _cell(f"{rec['token_entropy']:.3f}")
                + _cell(tokens, tokens)
                + "</tr>"
            )
    summary = "".join(
        "<tr>" + "".join(f"<td>{v:.3f}</td>" if isinstance(v, float) else f"<td>{v}</td>" for v in r.values()) + "</tr>"
        for r in rows
    )
    body = (
        "<h1>Features</h1><h2>Monosemanticity by method</h2>"
        f"<table><tr>{''.join(f'<th>{k}</th>' for k in rows[0])}</tr>{summary}</table>"
        f"<h2>All features (click a header to sort)</h2><table id='features'><thead><tr>"
        + "".join(f"<th onclick='sortBy({i})'>{h}</th>" for i, h in enumerate(head))
        + f"</tr></thead><tbody>{''.join(lines)}</tbody></table>"
    )
    return _page("Features", body, SORT_JS)
