"""One self-contained HTML page about a learned hierarchy: what a researcher would otherwise build in a notebook.

Statistics per node, the frequency histograms (a PNG inside the page), and per level the most frequent patterns
and a few drawn by frequency, each as the text it stands for. No script, no request for anything outside the
file: it opens offline, from an e-mail or a CI artifact.
"""

from __future__ import annotations

import base64
import datetime
import html
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingestd.kb.knowledge_base import KnowledgeBase

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5rem 0 1rem; width: 100%; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; vertical-align: top; text-align: left; }
th { background: #f4f4f4; } td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; }
code { font-size: 12px; } .meta { color: #666; } img { max-width: 100%; border: 1px solid #eee; }
"""


def build_report(kb: KnowledgeBase, *, top: int = 10, samples: int = 3, seed: int = 0) -> str:
    """The page, as text."""
    from ingestd import __version__
    from ingestd.kb.plots import histogram_png

    stats = kb.stats()
    image = base64.b64encode(histogram_png(kb.histogram())).decode("ascii")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>ingestd report: {_e(str(kb.data_dir))}</title><style>{_STYLE}</style></head><body>",
        f"<h1>What was learned in <code>{_e(str(kb.data_dir))}</code></h1>",
        (f'<p class="meta">{len(kb.nodes)} nodes ({_e(", ".join(node.node_id for node in kb.nodes))}), tokenizer '
         f"{_e(kb.hierarchy.tokenizer)}; made by ingestd {_e(__version__)} at {now}.</p>"),
        "<h2>Nodes</h2>",
        _table(["level", "node", "chunk size", "patterns", "total frequency (learns)", "seen once", "frequency p50 / p90 / p99 / max",
                "length min / mean / max"],
               [[row.level, row.node_id, row.chunk_size, row.patterns, row.total_frequency,
                 f"{row.singletons:,} ({row.singleton_share:.1%})",
                 f"{row.frequency_p50:g} / {row.frequency_p90:g} / {row.frequency_p99:g} / {row.frequency_max:,}",
                 f"{row.length_min} / {row.length_mean:.2f} / {row.length_max}"] for row in stats.itertuples()],
               numeric={3, 4}),
        "<h2>How often patterns recur</h2>",
        '<p class="meta">Patterns per frequency, log-log, one panel per node.</p>',
        f'<img alt="frequency histograms, one panel per node" src="data:image/png;base64,{image}">',
    ]  # fmt: skip
    for node, row in zip(kb.nodes, stats.itertuples(), strict=True):
        parts.append(f"<h2>Level {node.level}: {_e(node.node_id)}</h2>")
        if not row.patterns:
            parts.append('<p class="meta">No patterns.</p>')
            continue
        best = kb.top(node.level, top)
        parts.append(f"<h3>The {len(best)} most frequent</h3>")
        parts.append(_table(["#", "frequency", "length", "name", "text"],
                            [[r.rank, r.frequency, r.length, r.name, r.text] for r in best.itertuples()],
                            numeric={0, 1, 2}, text={4}))  # fmt: skip
        drawn = kb.sample(node.level, samples, seed=seed)
        parts.append(f"<h3>{len(drawn)} drawn by frequency (seed {seed})</h3>")
        parts.append(_table(["draw", "frequency", "name", "text"],
                            [[r.draw, r.frequency, r.name, r.text] for r in drawn.itertuples()],
                            numeric={0, 1}, text={3}))  # fmt: skip
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(kb: KnowledgeBase, path: str | Path, **options: Any) -> Path:
    """:func:`build_report` written to ``path`` (whole: written beside, then renamed into place)."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial")
    try:
        partial.write_text(build_report(kb, **options), encoding="utf-8")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _table(header: list[str], rows: list[list[Any]], *, numeric: set[int] = frozenset(),  # type: ignore[assignment]
           text: set[int] = frozenset()) -> str:  # type: ignore[assignment]  # fmt: skip
    head = "".join(f"<th>{_e(name)}</th>" for name in header)
    body = []
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            shown = f"{cell:,}" if isinstance(cell, numbers.Integral) and not isinstance(cell, bool) else "" if cell is None else str(cell)
            kind = ' class="n"' if index in numeric else ' class="text"' if index in text else ""
            cells.append(f"<td{kind}>{_e(shown)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
