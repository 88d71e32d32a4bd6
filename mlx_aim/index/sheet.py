"""A self-contained HTML contact sheet of search results: thumbnails (JPEG data URIs) and scores."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path

from ..data.images import ImageError, open_image
from ..io import write_text

THUMBNAIL = 192  # longest side in pixels

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; background: #fafafa; }}
h1 {{ font-size: 1.2em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: {size}px; background: #fff; padding: 6px; border: 1px solid #ddd; }}
figure img {{ display: block; max-width: {size}px; max-height: {size}px; margin: auto; }}
figcaption {{ word-break: break-all; font-size: 12px; margin-top: 4px; }}
.score {{ font-weight: bold; }}
.missing {{ height: {size}px; display: flex; align-items: center; justify-content: center;
  color: #999; }}
</style></head>
<body><h1>{title}</h1><div class="grid">
{figures}
</div></body></html>
"""


def thumbnail_uri(path: str | os.PathLike, size: int = THUMBNAIL) -> str | None:
    """A JPEG data URI of the image at ``path``, at most ``size`` pixels a side (None: unreadable)."""
    try:
        image = open_image(path)
    except ImageError:
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _shown(path: str) -> str:
    """``path`` as text (undecodable file-name bytes shown as replacement characters)."""
    return os.fsencode(path).decode("utf-8", "replace")


def write_contact_sheet(
    output: str | os.PathLike,
    title: str,
    items: Sequence[tuple[str, str]],
    size: int = THUMBNAIL,
) -> Path:
    """Write (atomically) an HTML page with one thumbnail per ``(path, caption)``."""
    figures = []
    for path, caption in items:
        uri = thumbnail_uri(path, size)
        link = html.escape(Path(os.path.abspath(path)).as_uri(), quote=True)
        picture = f'<img src="{uri}" alt="">' if uri else '<div class="missing">(unreadable)</div>'
        figures.append(
            f'<figure><a href="{link}">{picture}</a><figcaption><span class="score">'
            f"{html.escape(caption)}</span> {html.escape(_shown(path))}</figcaption></figure>"
        )
    page = _PAGE.format(title=html.escape(title), size=size, figures="\n".join(figures))
    write_text(output, page)
    return Path(output)
