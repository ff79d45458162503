"""Pictures of a knowledge base (matplotlib, the ``analysis`` extra: ``pip install 'ingestd[analysis]'``)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingestd.errors import IngestError

if TYPE_CHECKING:
    import pandas as pd


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed, none used
        import matplotlib.pyplot as plt
    except ImportError:
        raise IngestError("plots need matplotlib: pip install 'ingestd[analysis]'") from None
    return plt


def histogram_png(histogram: pd.DataFrame) -> bytes:
    """The frequency distribution, log-log, one panel per node: how many patterns have each frequency."""
    plt = _pyplot()
    nodes = list(dict.fromkeys(zip(histogram["level"], histogram["node_id"], strict=True))) or [(0, "no patterns")]
    columns = min(3, math.ceil(math.sqrt(len(nodes))))
    rows = -(-len(nodes) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for axis, (level, node_id) in zip(axes.flat, nodes, strict=False):
        part = histogram[histogram["node_id"] == node_id]
        if len(part):
            axis.loglog(part["frequency"], part["patterns"], marker="o", markersize=3, linestyle="none")
        axis.set_title(f"{node_id} (level {level})", fontsize=10)
        axis.set_xlabel("frequency")
        axis.set_ylabel("patterns")
        axis.grid(True, which="major", alpha=0.3)
    for axis in list(axes.flat)[len(nodes) :]:
        axis.set_visible(False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def plot_histogram(histogram: pd.DataFrame, path: str | Path) -> Path:
    """:func:`histogram_png` written to ``path``."""
    target = Path(path)
    target.write_bytes(histogram_png(histogram))
    return target
