"""Evaluation results as stable JSON and as a picture of queries with their top results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ascension_cli.atomic import atomic_write_json
from ascension_cli.data.folder import ImageDecodeError, load_image
from ascension_cli.retrieval.evaluate import Evaluation

JSON_VERSION = 1


def evaluation_json(
    evaluation: Evaluation,
    class_names: list[str] | None = None,
    recolored: dict[str, Evaluation] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stable keys: version, index, metrics..., recolor (name -> recall_at_k), then ``extra``."""
    data: dict[str, Any] = {"version": JSON_VERSION, "index": evaluation.index_kind}
    data.update(evaluation.report.to_dict(class_names))
    data["approximate_recall_vs_exact"] = evaluation.approximate_recall
    data["recolor"] = {
        name: {str(k): v for k, v in sorted(result.report.recall_at_k.items())}
        for name, result in (recolored or {}).items()
    }
    data.update(extra or {})
    return data


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Strict JSON (``atomic.strict_json``): a figure that cannot be measured is null, with
    the reason under ``null_reasons``."""
    atomic_write_json(path, data)


def thumbnail(path: Path, size: int) -> np.ndarray:
    """The image letterboxed into a white square of ``size`` (grey if unreadable)."""
    try:
        image = load_image(path)
    except ImageDecodeError:
        return np.full((size, size, 3), 127, np.uint8)
    scale = size / max(image.shape[:2])
    resized = cv2.resize(image, (max(1, round(image.shape[1] * scale)),
                                 max(1, round(image.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    tile = np.full((size, size, 3), 255, np.uint8)
    top, left = (size - resized.shape[0]) // 2, (size - resized.shape[1]) // 2
    tile[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return tile


def _captioned(tile: np.ndarray, caption: str, frame: tuple[int, int, int] | None) -> np.ndarray:
    size = tile.shape[0]
    cell = np.full((size + 22, size + 8, 3), 255, np.uint8)
    if frame is not None:
        cell[: size + 8] = frame
    cell[4 : 4 + size, 4 : 4 + size] = tile
    text = caption if len(caption) <= 14 else caption[:13] + "…"
    cv2.putText(cell, text.encode("ascii", "replace").decode(), (4, size + 19),
                cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return cell


def retrieval_grid(
    output: str | Path,
    evaluation: Evaluation,
    query_paths: list[Path],
    query_labels: np.ndarray,
    gallery_paths: list[Path],
    gallery_labels: np.ndarray,
    class_names: list[str],
    queries: int = 8,
    k: int = 5,
    tile: int = 96,
    seed: int = 0,
) -> Path:
    """Draw ``queries`` random queries, each followed by its top-``k`` results.

    Results of another class are framed in red, of the same class in green; each image has its
    class name underneath.
    """
    def name(label: int) -> str:
        return class_names[label] if 0 <= label < len(class_names) else str(label)

    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(query_paths), min(queries, len(query_paths)), replace=False))
    rows = []
    for q in chosen:
        cells = [_captioned(thumbnail(query_paths[q], tile), "Q: " + name(int(query_labels[q])),
                            (90, 90, 90))]
        for g in evaluation.neighbour_ids[q, :k]:
            if g < 0:
                continue
            right = gallery_labels[g] == query_labels[q]
            cells.append(_captioned(thumbnail(gallery_paths[g], tile), name(int(gallery_labels[g])),
                                    (40, 170, 40) if right else (220, 30, 30)))
        width = (k + 1) * cells[0].shape[1]
        row = np.full((cells[0].shape[0], width, 3), 255, np.uint8)
        for position, cell in enumerate(cells):
            row[:, position * cell.shape[1] : (position + 1) * cell.shape[1]] = cell
        rows.append(row)
    picture = np.concatenate(rows, axis=0)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(output), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {output}")
    return output
