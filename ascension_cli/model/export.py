"""Export a trained model for deployment: normalised images in, L2-normalised embeddings out."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from ascension_cli.atomic import atomic_write
from ascension_cli.model.backbone import EmbeddingModel
from ascension_cli.model.checkpoint import load_model

EXPORT_FORMATS = ("onnx", "torchscript")


class EmbeddingExport(nn.Module):
    """(B, 3, H, W) normalised images -> (B, D) L2-normalised embeddings."""

    def __init__(self, model: EmbeddingModel, feature_kind: str = "backbone"):
        super().__init__()
        self.model = model
        self.use_head = feature_kind == "head"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images) if self.use_head else self.model.features(images)


def export_model(
    checkpoint: str | Path,
    output: str | Path,
    export_format: str = "onnx",
    feature_kind: str = "backbone",
    image_size: int | None = None,
) -> dict:
    """Write the model as ONNX or TorchScript with a dynamic batch size; returns what it wrote.

    Inputs are images already resized and normalised as the returned ``mean``/``std``/
    ``image_size`` say (the checkpoint's eval transform).
    """
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"unknown format {export_format!r}; choose one of {EXPORT_FORMATS}")
    model, spec, _ = load_model(checkpoint)
    module = EmbeddingExport(model, feature_kind).eval()
    size = image_size or spec.image_size
    example = torch.randn(2, 3, size, size)
    buffer = io.BytesIO()
    # torch marks TorchScript and the TorchScript-based ONNX exporter as deprecated; both still
    # produce the files deployments load today, and the user asked for them by name.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        if export_format == "torchscript":
            torch.jit.save(torch.jit.trace(module, example), buffer)
        else:
            torch.onnx.export(
                module, (example,), buffer, input_names=["images"],
                output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                opset_version=17, dynamo=False,
            )
    atomic_write(output, lambda handle: handle.write(buffer.getvalue()))
    dim = spec.feature_dim(feature_kind)
    return {"path": str(output), "format": export_format, "features": feature_kind,
            "image_size": size, "mean": list(spec.mean), "std": list(spec.std),
            "embedding_dim": dim, "model": spec.name}
