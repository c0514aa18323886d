"""The checkpoint format, in one place: the trainer's state, the model that inference reads back,
and a catalogue's model file. Writes are atomic; loads never execute pickled code
(``weights_only=True``) and never suggest turning that off.

A training checkpoint is a dict: ``format``/``format_version`` (see ``formats.py``), the model
``spec`` and weights (``model``), ``config`` and ``classes`` (what it was trained on), and the
resumable state (optimizer, scheduler, scaler, RNG, epoch, step, history, mid-epoch progress).
Adding a field is a change to ``training_state`` and to whoever reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ascension_cli import __version__
from ascension_cli.atomic import atomic_write
from ascension_cli.errors import CheckpointError
from ascension_cli.formats import CHECKPOINT_FORMAT as FORMAT
from ascension_cli.formats import CHECKPOINT_VERSION as FORMAT_VERSION
from ascension_cli.formats import MODEL_FILE_FORMAT
from ascension_cli.model.backbone import EmbeddingModel, ModelSpec, model_from_spec
from ascension_cli.paths import checked, checkpoint_file, not_ours, why_unloadable

# What every reader needs: the model (spec and weights) and what it was trained on.
REQUIRED_KEYS = ("model", "spec", "config", "classes")


def atomic_save(payload: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` so that ``path`` is always either the old file or the complete new one."""
    atomic_write(path, lambda handle: torch.save(payload, handle))


def training_state(
    model: EmbeddingModel, spec: ModelSpec, config: dict[str, Any], classes: list[str],
    **state: Any,
) -> dict[str, Any]:
    """A training checkpoint's payload: the format stamp, the model and what it was trained on,
    and ``state`` (optimizer, scheduler, scaler, rng, epoch, step, history, ...) as given."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ascension_version": __version__,
        "model": model.state_dict(),
        "spec": spec.to_dict(),
        "timm_name": spec.name,
        "pretrained_cfg": dict(getattr(model.backbone, "pretrained_cfg", {}) or {}),
        "config": config,
        "classes": classes,
        **state,
    }


def not_a_checkpoint(path: Path, why: str) -> CheckpointError:
    """The one error for a file that is not an Ascension checkpoint or is damaged."""
    return CheckpointError(str(not_ours(path, "an Ascension checkpoint", why)))


def damaged_entry(source: Path, key: str, why: str) -> CheckpointError:
    """The one error for a checkpoint entry a resume cannot use (missing, of the wrong kind,
    shape or range), naming the entry and the file."""
    return CheckpointError(f"{source}: its '{key}' state is missing or damaged ({why}); resume "
                           "from another checkpoint or train afresh")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load an Ascension checkpoint with ``weights_only=True`` and check its format.

    Whatever torch raises, the error is one line naming the file and its size.
    """
    path = checked(checkpoint_file, Path(path), CheckpointError)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError... whatever torch raises
        raise not_a_checkpoint(path, why_unloadable(exc)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise not_a_checkpoint(path, "another program wrote it (timm weights go to --weights)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this Ascension reads "
            f"version {FORMAT_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise not_a_checkpoint(path, f"it lacks {', '.join(missing)}")
    return payload


def finite_weights(state: Any) -> None:
    """A state dict of tensors, every float one finite (NaN weights train nothing)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError("not a state dict of tensors")
    for name, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{name} holds NaN or infinity")


def rebuild_model(path: Path, payload: dict[str, Any]) -> tuple[EmbeddingModel, ModelSpec]:
    """The model a checkpoint or model file describes (its spec, then its weights, which must
    fit the spec and be finite), for inference or a resume; a damaged spec or weights is one
    CheckpointError naming ``path`` and which of the two."""
    try:
        spec = ModelSpec.from_dict(payload["spec"])
        model = model_from_spec(spec)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise not_a_checkpoint(path, "its model spec is damaged") from None
    try:
        finite_weights(payload["model"])
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no weights"
        raise CheckpointError(f"{path}: its model weights do not fit '{spec.name}': {detail}"
                              ) from None
    return model, spec


def load_model(path: str | Path) -> tuple[EmbeddingModel, ModelSpec, dict[str, Any]]:
    """The model a training checkpoint describes, with its weights, for inference."""
    payload = load_checkpoint(path)
    model, spec = rebuild_model(Path(path), payload)
    return model, spec, payload


def save_model_file(path: str | Path, model: EmbeddingModel, spec: ModelSpec) -> None:
    """The model alone (spec and weights), as a catalogue keeps it."""
    atomic_save({"format": MODEL_FILE_FORMAT, "spec": spec.to_dict(),
                 "model": model.state_dict()}, path)


def load_model_file(path: str | Path) -> EmbeddingModel:
    """Read a file ``save_model_file`` wrote, in eval mode (a catalogue's model only embeds);
    a damaged one is a CheckpointError naming it."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise not_a_checkpoint(path, why_unloadable(exc)) from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FILE_FORMAT:
        raise not_a_checkpoint(path, "it is not a catalogue's model file")
    return rebuild_model(path, payload)[0].eval()
