"""timm backbone + projection head, and loading weights from the hub, a file, or nowhere."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ascension_cli.errors import ConfigError, WeightsError
from ascension_cli.model.stages import frozen
from ascension_cli.paths import not_ours, why_unloadable
from ascension_cli.values import number, whole

WEIGHTS_OPTIONS = ("weights", "no_pretrained")  # what a user can do about missing weights

_HUB_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and its eval transform from a checkpoint."""

    name: str
    embedding_dim: int
    head: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    num_features: int
    flip_average: bool = False  # a checkpoint written before the option searches as trained

    def feature_dim(self, feature_kind: str) -> int:
        """The length of a vector of ``feature_kind`` (``head``: the embedding; ``backbone``:
        the pooled trunk features, which a ``none`` head passes on unchanged)."""
        return self.embedding_dim if feature_kind == "head" else self.num_features

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """A spec a checkpoint or catalogue recorded, each field checked (``ValueError`` names
        the first wrong one): a file may have been edited by hand."""
        values = dict(data)
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        spec = cls(**values)
        numbers = [*spec.mean, *spec.std, spec.crop_pct]
        checks = {"name": isinstance(spec.name, str) and bool(spec.name),
                  "head": spec.head in ("none", "mlp", "linear"),
                  "image_size": whole(spec.image_size, 16, 4096),
                  "embedding_dim": whole(spec.embedding_dim, 2, 65536),
                  "num_features": whole(spec.num_features, 1, 1 << 20),
                  "flip_average": isinstance(spec.flip_average, bool),
                  "mean, std and crop_pct": len(spec.mean) == len(spec.std) == 3 and all(
                      number(n, 0, 1000) for n in numbers)
                  and all(n > 0 for n in spec.std) and 0 < spec.crop_pct <= 1}
        wrong = [name for name, good in checks.items() if not good]
        if wrong:
            raise ValueError(f"the model spec's {wrong[0]} is out of range")
        return spec


class EmbeddingModel(nn.Module):
    """Backbone pooled features -> projection head -> L2-normalised embedding.

    ``head="none"`` trains the pooled features themselves (``forward`` equals ``features``):
    the loss then shapes exactly the vectors that retrieval uses. ``flip_average``: in eval mode
    each vector is the mean of the photo's and its mirror image's (unit length each, then the
    sum made unit length), so every search and export embeds alike; training's forward is
    unchanged, and a training run turns it off on the model it trains and validates.
    """

    def __init__(self, backbone: nn.Module, embedding_dim: int, head: str = "mlp",
                 flip_average: bool = False):
        super().__init__()
        self.backbone = backbone
        self.flip_average = flip_average
        width = backbone.num_features
        if head == "mlp":
            self.head = nn.Sequential(
                nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, embedding_dim)
            )
        elif head == "linear":
            self.head = nn.Linear(width, embedding_dim)
        elif head == "none":
            self.head = nn.Identity()
        else:
            raise ValueError(f"unknown head {head!r}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Projected, L2-normalised embeddings: what SupCon trains."""
        return self._seen(lambda batch: self.head(self.backbone(batch)), images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised pooled backbone features: what retrieval usually uses."""
        return self._seen(self.backbone, images)

    def _seen(self, network, images: torch.Tensor) -> torch.Tensor:
        vectors = F.normalize(network(images), dim=-1)
        if self.flip_average and not self.training:
            mirrored = F.normalize(network(torch.flip(images, dims=(-1,))), dim=-1)
            vectors = F.normalize(vectors + mirrored, dim=-1)
        return vectors


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ConfigError(f"unknown timm model '{name}' (see timm.list_models()){hint}")


def _hub_cached(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    for filename in _HUB_FILES:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str) and os.path.exists(found):
            return True
    return False


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _ensure_downloadable(name: str) -> None:
    """Fail in seconds, not after a minute of retries, when pretrained weights cannot be had."""
    cfg = timm.models.get_pretrained_cfg(name)
    advice = (
        f"pass {{weights}} FILE (a local timm-format .safetensors/.pth for {name}) "
        "or {no_pretrained} to train from scratch"
    )
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"timm has no pretrained weights for '{name}': {advice}",
                           options=WEIGHTS_OPTIONS)
    if cfg.file and Path(cfg.file).is_file():
        return
    if cfg.hf_hub_id:
        if _hub_cached(cfg.hf_hub_id):
            return
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    else:
        host = urlparse(cfg.url).hostname
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline or not host or not _reachable(host):
        why = "HF_HUB_OFFLINE is set" if offline else f"{host} cannot be reached"
        raise WeightsError(
            f"pretrained weights for '{name}' are not cached and {why}: {advice}",
            options=WEIGHTS_OPTIONS)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise WeightsError(str(not_ours(path, "a weights file", "it holds no state dict")))
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def _load_weights_file(backbone: nn.Module, path: Path, name: str) -> None:
    """Load timm-format weights strictly, except the classifier, which a trunk does not have.

    timm's own file loading turns strict checking off once it drops the classifier, so a file
    of another model would load silently; we check every key ourselves.
    """
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        state = _read_state_dict(path)
    except WeightsError:
        raise
    except Exception as exc:  # safetensors, zip and unpickling errors have no common base
        why = (f"safetensors cannot read it ({type(exc).__name__})"
               if path.suffix == ".safetensors" else why_unloadable(exc))
        raise WeightsError(str(not_ours(path, "a weights file", why))) from None
    classifier = (backbone.pretrained_cfg or {}).get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in heads)}
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        raise WeightsError(
            f"cannot load {path} into '{name}': {detail[1].strip() if len(detail) > 1 else exc}"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        expected = len(backbone.state_dict())
        if result.missing_keys:
            problem = (
                f"{len(result.missing_keys)} of {expected} tensors missing "
                f"(e.g. {result.missing_keys[0]})"
            )
        else:
            problem = (
                f"{len(result.unexpected_keys)} unexpected tensors "
                f"(e.g. {result.unexpected_keys[0]})"
            )
        raise WeightsError(f"cannot load {path} into '{name}': {problem}; is it for another model?")


def create_backbone(
    name: str, pretrained: bool = True, weights: str | Path | None = None, **kwargs: Any
) -> nn.Module:
    """A timm trunk with pooled features (``num_classes=0``).

    ``weights`` (a local file) implies pretrained; without it, ``pretrained`` downloads from the
    hub or uses the local cache.
    """
    _check_name(name)
    if weights is not None:
        backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        _load_weights_file(backbone, Path(weights), name)
        return backbone
    if pretrained:
        _ensure_downloadable(name)
        try:
            return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
        except OSError as exc:
            raise WeightsError(
                f"downloading pretrained weights for '{name}' failed ({exc}); "
                "pass {weights} FILE or {no_pretrained}", options=WEIGHTS_OPTIONS,
            ) from None
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def build_model(
    name: str,
    embedding_dim: int = 128,
    head: str = "mlp",
    image_size: int | None = None,
    pretrained: bool = True,
    weights: str | Path | None = None,
    flip_average: bool = False,
) -> tuple[EmbeddingModel, ModelSpec]:
    """Create backbone + head and the spec that rebuilds it (input size, normalisation, how
    it embeds)."""
    backbone = create_backbone(name, pretrained=pretrained, weights=weights)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    input_size = cfg.get("input_size", (3, 224, 224))
    spec = ModelSpec(
        name=name,
        embedding_dim=int(backbone.num_features) if head == "none" else embedding_dim,
        head=head,
        image_size=int(image_size or input_size[-1]),
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        crop_pct=float(cfg.get("crop_pct", 1.0) or 1.0),
        num_features=int(backbone.num_features),
        flip_average=flip_average,
    )
    return EmbeddingModel(backbone, spec.embedding_dim, head, flip_average), spec


def model_from_spec(spec: ModelSpec) -> EmbeddingModel:
    """An uninitialised model of the spec's shape, ready for ``load_state_dict``."""
    _check_name(spec.name)
    backbone = timm.create_model(spec.name, pretrained=False, num_classes=0)
    return EmbeddingModel(backbone, spec.embedding_dim, spec.head, spec.flip_average)


def training_mode(model: nn.Module, freeze_bn: bool = False) -> None:
    """``model.train()``; a BatchNorm layer stays in eval mode, normalising by the running
    statistics it has and no longer updating them, when ``freeze_bn`` (its weight and bias
    still train) or when its weight and bias do not train (``--frozen-stages``)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (freeze_bn or frozen(module)):
            module.eval()
