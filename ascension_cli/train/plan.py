"""A run's plan: every training setting that the options leave to the data, resolved once, each
with the reason it took its value. The batch sizes fitted to the training set, the defaults
that follow the many-class rule (``config/fields.py::DATA_DEFAULTS``), the temperature, the step's
LR, the run's length and warmup, ``--augment auto``'s choice and the stages ``--frozen-stages``
keeps by default (the model's count settles it) are decided here and nowhere else; the image
size and the loader processes, which the model and the machine settle, are recorded with them
(``Setup``). The run is built from the plan, ``config.yaml`` and every checkpoint record it,
and a resume compares the checkpoint's plan with the new one field by field. A checkpoint
written before the plan is planned again from its options, as it trained
(``TRAINED_AS_BEFORE``); one written before the plan held the setup takes the new run's, but
for the stages it kept (``recorded_frozen_stages``: none before the option existed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, get_args

import numpy as np

from ascension_cli.config import TrainConfig
from ascension_cli.config.fields import (
    AUTO_FROZEN_OF,
    AUTO_FROZEN_STAGES,
    DATA_DEFAULTS,
    TEMPERATURE,
    Augment,
    classes_per_batch,
)
from ascension_cli.data.sampler import fit_batches, steps_per_epoch
from ascension_cli.data.splits import TrainData
from ascension_cli.errors import CheckpointError, DataError
from ascension_cli.train.schedule import scaled_lr, warmup_steps
from ascension_cli.values import number

# Options whose default came to mean something else: a checkpoint written before they existed
# (and before the plan) trained as this value (SupCon alone, the LR decaying on a cosine, no
# weight average).
TRAINED_AS_BEFORE = {"proxy_weight": 0.0, "lr_schedule": "cosine", "ema_decay": 0.0}
# A checkpoint written while --temperature followed the data (and before the plan) records None:
# it trained at this value where a target batch could not hold every class, else at the default.
FORMER_MANY_CLASS_TEMPERATURE = 0.07

# What ``--augment auto`` may choose.
CHOSEN_AUGMENTATIONS = tuple(choice for choice in get_args(Augment) if choice != "auto")


@dataclass(frozen=True)
class Setup:
    """What the model, the machine and the photos settled before the plan, each (value, why):
    the image size, the loader processes, the augmentation (``planned_augmentation``) and the
    stages kept at their starting weights (``planned_frozen_stages``)."""

    image_size: tuple[int, str]
    workers: tuple[int, str]
    augmentation: tuple[str, str]
    frozen_stages: tuple[int, str]


@dataclass(frozen=True)
class RunPlan:
    """The settings a run trains with, none left open."""

    classes: int  # the dataset's classes, which the many-class rule reads
    target_batch: int
    batch_size: int
    samples_per_class: int
    temperature: float
    proxy_weight: float
    lr_schedule: str
    ema_decay: float
    step_lr: float
    augmentation: str  # --augment, or the one --augment auto chose when the run started
    frozen_stages: int  # --frozen-stages, or its default for the model
    # The image size is the model's (a resume rebuilds the checkpoint's); --workers may change
    # on a resume.
    image_size: int = field(compare=False)
    workers: int = field(compare=False)
    # The run's length may change on a resume (--epochs, --max-steps and --warmup-epochs are
    # resumable, and a resume has always been allowed on a folder that gained or lost photos
    # of the same classes): recorded, not compared.
    steps_per_epoch: int = field(compare=False)
    total_steps: int = field(compare=False)
    warmup_steps: int = field(compare=False)
    reasons: dict[str, str] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def setup(self) -> Setup:
        return Setup(**{name: (getattr(self, name), self.reasons.get(name, "recorded"))
                        for name in SETUP_FIELDS})

    @classmethod
    def from_dict(cls, saved: Any, current: RunPlan) -> RunPlan:
        """A plan a checkpoint recorded (one from before the plan held the setup takes
        ``current``'s); ``ValueError`` names what is wrong with it."""
        names = [item.name for item in fields(cls)]
        if isinstance(saved, dict):
            saved = {**{name: getattr(current, name) for name in SETUP_FIELDS}, **saved}
        if not isinstance(saved, dict) or sorted(saved) != sorted(names):
            raise ValueError(f"a plan holds {', '.join(names)}")
        plan = cls(**saved)
        words = ("lr_schedule", "augmentation", "reasons")
        numbers = [getattr(plan, name) for name in names if name not in words]
        if (not all(number(n, 0) for n in numbers) or not isinstance(plan.frozen_stages, int)
                or not isinstance(plan.lr_schedule, str) or not isinstance(plan.reasons, dict)):
            raise ValueError("a plan's settings are numbers from 0 and a schedule's name")
        if plan.augmentation not in CHOSEN_AUGMENTATIONS:
            raise ValueError(f"its augmentation must be one of {', '.join(CHOSEN_AUGMENTATIONS)}")
        return plan

    def rows(self) -> list[tuple[str, str]]:
        """The plan as the trainer prints it: each setting, its value and why."""
        return [(name, f"{getattr(self, name)}  ({self.reasons[name]})")
                for name in self.reasons]


SETUP_FIELDS = tuple(item.name for item in fields(Setup))


def settled(config: TrainConfig, image_size: int, workers: int, device: str, resumed: bool,
            augmentation: tuple[str, str], frozen_stages: tuple[int, str]) -> Setup:
    """The setup of a run whose model takes ``image_size`` and whose machine (a ``device``)
    loads with ``workers`` processes, with why each is so."""
    size_why = ("the resumed checkpoint's model" if resumed
                else "given" if config.image_size is not None else f"{config.model}'s default")
    workers_why = ("given" if config.workers is not None
                   else f"default: chosen for the {device} and its cores")
    return Setup((image_size, size_why), (workers, workers_why), augmentation, frozen_stages)


def recorded_augmentation(checkpoint: dict[str, Any] | None) -> str | None:
    """The augmentation ``--augment auto`` chose for the run a checkpoint continues: its plan's,
    or (before the plan held it) its ``augmentation`` entry's; ``ValueError`` for a choice
    that is not one."""
    if checkpoint is None:
        return None
    plan, record = checkpoint.get("plan"), checkpoint.get("augmentation")
    if isinstance(plan, dict) and "augmentation" in plan:
        chosen = plan["augmentation"]
    elif "augmentation" in checkpoint:
        chosen = record.get("chosen") if isinstance(record, dict) else None
    else:
        return None
    if chosen not in CHOSEN_AUGMENTATIONS:
        raise ValueError(f"the choice must be one of {', '.join(CHOSEN_AUGMENTATIONS)}, not "
                         f"{str(chosen)[:40]!r}")
    return chosen


def planned_augmentation(config: TrainConfig, checkpoint: dict[str, Any] | None,
                         choose: Callable[[], tuple[str, str]]) -> tuple[str, str]:
    """(the augmentation, why): ``--augment`` as given; for ``auto`` the choice the run made
    when it started (a resume), or ``choose()``'s measurement (``train/colour.py``)."""
    if config.augment != "auto":
        return config.augment, "given"
    recorded = recorded_augmentation(checkpoint)
    if recorded is not None:
        return recorded, "--augment auto: chosen when the run started"
    return choose()


def recorded_frozen_stages(checkpoint: dict[str, Any]) -> int:
    """The stages a checkpoint's run kept at their starting weights: its plan's, or (before the
    plan held them) its options', or none (before --frozen-stages); ``ValueError`` for a count
    that is not one."""
    plan, options = checkpoint.get("plan"), checkpoint.get("config")
    if isinstance(plan, dict) and "frozen_stages" in plan:
        count = plan["frozen_stages"]
    else:
        count = (options.get("frozen_stages") if isinstance(options, dict) else None) or 0
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"the stages kept must be a count, not {str(count)[:40]!r}")
    return count


def planned_frozen_stages(config: TrainConfig, stages: int | None,
                          checkpoint: dict[str, Any] | None) -> tuple[int, str]:
    """(--frozen-stages, why) for a backbone with ``stages`` stages after its stem (None: it
    does not say): as given; a resumed run's as it trained; else ``AUTO_FROZEN_STAGES`` where
    the backbone starts from weights and has an EfficientNet's stages, where it was measured."""
    if config.frozen_stages is not None:
        return config.frozen_stages, "given"
    if checkpoint is not None:
        return recorded_frozen_stages(checkpoint), "the resumed run's"
    if not config.pretrained and config.weights is None:
        return 0, "default: a run from scratch has no starting weights to keep"
    if stages != AUTO_FROZEN_OF:
        has = "does not name its stages" if stages is None else f"has {stages}"
        return 0, (f"default: kept only on a backbone with {AUTO_FROZEN_OF} stages after its "
                   f"stem (an EfficientNet's); {config.model} {has}")
    return AUTO_FROZEN_STAGES, (f"default: the stem and the first {AUTO_FROZEN_STAGES} of the "
                                f"{stages} stages keep their starting weights")


def many_classes(config: TrainConfig, classes: int) -> bool:
    """Whether SupCon trains on more classes than a target batch holds."""
    return config.loss == "supcon" and classes > classes_per_batch(
        classes, config.target_batch, config.samples_per_class)


def data_defaults(config: TrainConfig, classes: int) -> dict[str, tuple[Any, str]]:
    """Each option whose default depends on the data (``DATA_DEFAULTS``): its value for a run
    on ``classes`` classes, and why."""
    many = many_classes(config, classes)
    held = classes_per_batch(classes, config.target_batch, config.samples_per_class)
    rule = (f"default: a target batch holds {held} of the {classes} classes" if many
            else f"default: a target batch can hold every one of the {classes} classes")
    chosen = {}
    for name, (many_class_value, other_value) in DATA_DEFAULTS.items():
        given = getattr(config, name)
        chosen[name] = ((given, "given") if given is not None
                        else (many_class_value if many else other_value, rule))
    return chosen


def fitted(config: TrainConfig, data: TrainData, world_size: int
           ) -> tuple[TrainConfig, list[str]]:
    """The batch options fitted to the training set before anything is allocated: options the
    user gave that cannot fit are refused, defaults are reduced (``fit_batches``), with the
    notes saying why."""
    labels = data.train_labels
    classes = len(np.unique(labels))
    if classes < 2:
        raise DataError(f"training needs at least two classes (found {classes} in "
                        f"{config.data_root}): SupCon learns by contrasting classes")
    if config.views == 1 and np.bincount(labels).max() < 2:
        raise DataError("with {views} 1 some class needs two training images; use {views} 2",
                        options=("views",))
    fit = fit_batches(
        np.unique(labels, return_counts=True)[1], config.target_batch, config.batch_size,
        config.samples_per_class, world_size,
        min_samples_per_class=2 if config.views == 1 else 1,
        given=frozenset(config.model_fields_set),
    )
    return config.model_copy(update={
        "target_batch": fit.target_batch, "batch_size": fit.micro_batch,
        "samples_per_class": fit.samples_per_class}), list(fit.notes)


def run_length(config: TrainConfig, images: int) -> dict[str, tuple[int, str]]:
    """Steps an epoch, steps in all and warmup steps of a run over ``images`` training images,
    each with why."""
    per_epoch = steps_per_epoch(images, config.target_batch)
    total = config.epochs * per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = warmup_steps(config.warmup_epochs, per_epoch, total)
    return {
        "steps_per_epoch": (per_epoch, f"{images} training images, {config.target_batch} a step"),
        "total_steps": (total, f"--epochs {config.epochs}" + (
            f", --max-steps {config.max_steps}" if config.max_steps is not None else "")),
        "warmup_steps": (warmup, "default: 5 % of the run's steps"
                         if config.warmup_epochs is None
                         else f"given: --warmup-epochs {config.warmup_epochs:g}")}


def plan_run(config: TrainConfig, classes: int, images: int, setup: Setup,
             notes: list[str] = (), given: frozenset[str] | None = None) -> RunPlan:
    """The plan of a run with ``config`` (its batch options fitted) on ``classes`` classes and
    ``images`` training images, with what ``setup`` settled; ``notes``: why the batch options
    were fitted as they were; ``given``: the options the user gave (default: ``config``'s)."""
    given = config.model_fields_set if given is None else given
    length = run_length(config, images)
    batches = ("target_batch", "batch_size", "samples_per_class")
    defaults = data_defaults(config, classes)
    step_lr = scaled_lr(config.lr, config.target_batch, config.lr_scaling)
    reasons = {**{name: "; ".join(notes) or ("given" if name in given else "default")
                  for name in batches},
               **{name: why for name, (_, why) in defaults.items()},
               "temperature": "given" if "temperature" in given else "default",
               "step_lr": f"--lr {config.lr:g} for 32 images, {config.lr_scaling} to the target "
                          f"batch of {config.target_batch}",
               **{name: why for name, (_, why) in length.items()},
               **{name: getattr(setup, name)[1] for name in SETUP_FIELDS}}
    return RunPlan(classes=classes, target_batch=config.target_batch,
                   batch_size=config.batch_size, samples_per_class=config.samples_per_class,
                   step_lr=step_lr, temperature=config.temperature, reasons=reasons,
                   **{name: value for name, (value, _) in defaults.items()},
                   **{name: value for name, (value, _) in length.items()},
                   **{name: getattr(setup, name)[0] for name in SETUP_FIELDS})


def planned_before(checkpoint: dict[str, Any], current: RunPlan, images: int) -> RunPlan:
    """The plan a checkpoint trained with: its own, or for one written before the plan, its
    options planned again as they trained (on ``images`` training images, and the classes and
    setup of ``current``, the resumed run's plan)."""
    kept = recorded_frozen_stages(checkpoint)
    if "plan" in checkpoint:
        saved = checkpoint["plan"]
        return RunPlan.from_dict({"frozen_stages": kept, **saved} if isinstance(saved, dict)
                                 else saved, current)
    options = {**TRAINED_AS_BEFORE, **checkpoint["config"]}
    if options.get("temperature") is None:
        many = many_classes(TrainConfig.model_construct(**options), current.classes)
        options["temperature"] = FORMER_MANY_CLASS_TEMPERATURE if many else TEMPERATURE
    return plan_run(TrainConfig.model_construct(**options), current.classes, images,
                    replace(current.setup(), frozen_stages=(kept, "recorded")))


def check_plan(saved: RunPlan, plan: RunPlan) -> None:
    """Refuse a resume whose plan differs from the checkpoint's, naming each setting."""
    differences = [f"{item.name}: {getattr(saved, item.name)!r} -> {getattr(plan, item.name)!r}"
                   for item in fields(RunPlan)
                   if item.compare and getattr(saved, item.name) != getattr(plan, item.name)]
    if differences:
        raise CheckpointError(
            "cannot resume: the plan differs from the checkpoint's (" + "; ".join(differences)
            + "); resume with the original options or start a new --save-dir")
