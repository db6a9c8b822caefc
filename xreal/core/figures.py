"""Figures for self-contained HTML pages: matplotlib PNGs embedded as data URIs, and the page around them.

The evaluation report (``xreal evaluate``) and the drawn manifest audit
(``xreal manifest audit --html``) use it; a page written here loads nothing
from anywhere else, so it can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PAGE_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}td{white-space:nowrap}
td.text{white-space:normal;text-align:left}
figure{margin:1rem 0}figcaption{font-size:.9rem;color:#555;max-width:900px}img{max-width:100%}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.5rem 1rem}
.note{background:#eef5ff;border-left:4px solid #4a80d0;padding:.5rem 1rem}
code{background:#f4f4f4;padding:0 .2rem}
"""


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_uri(fig: Any, dpi: int = 100) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_uri(image: np.ndarray) -> str:
    """A grayscale ``[H, W]`` image in [0, 1] (or an RGB ``[H, W, 3]`` one) as an 8-bit PNG data URI."""
    from PIL import Image

    pixels = (np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32)), 0.0, 1.0) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_html(uri: str, caption: str, alt: str | None = None) -> str:
    """An embedded figure with its caption."""
    return (
        f'<figure><img src="{uri}" alt="{html.escape(alt or caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def table_html(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table; floats are shown with three decimals, None as a dash."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            return "–"
        if isinstance(value, float):
            return f"{value:.3f}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)

    def td(value: Any) -> str:  # prose wraps and reads left to right; figures stay on one line
        prose = isinstance(value, str) and len(value) > 20 and value[:1].isalpha()
        return f'<td class="text">{cell(value)}</td>' if prose else f"<td>{cell(value)}</td>"

    body = "".join("<tr>" + "".join(td(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page_html(title: str, sections: Iterable[str]) -> str:
    """A whole self-contained HTML page."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n"
    )
