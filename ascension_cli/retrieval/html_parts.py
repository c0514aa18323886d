"""The pieces every section of the HTML report is made of: escaped text, photos as data URIs,
and a captioned photo."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import cv2

from ascension_cli.retrieval.report import thumbnail


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


class Thumbnails:
    """Data URIs of small JPEG thumbnails, each image read once."""

    def __init__(self, size: int):
        self.size, self.cache = size, {}

    def __call__(self, path: Path) -> str:
        if path not in self.cache:
            rgb = thumbnail(path, self.size)
            ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                                    [cv2.IMWRITE_JPEG_QUALITY, 75])
            self.cache[path] = "data:image/jpeg;base64," + base64.b64encode(data).decode()
        return self.cache[path]


def figure(uri: str, caption: str, frame: str = "") -> str:
    return (f'<figure class="{frame}"><img src="{uri}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")
