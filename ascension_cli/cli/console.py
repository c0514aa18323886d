"""What the command line draws: progress bars, the trainer's tables and epoch lines, and the
result tables of eval and search. The commands in ``cli/app.py`` call these; nothing here
computes. Notes that name options (``errors.Wording``) are spelled with their flags here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ascension_cli.config.fields import option_name
from ascension_cli.errors import Wording
from ascension_cli.progress import Progress

if TYPE_CHECKING:
    from ascension_cli.api.embedding import EmbedResult
    from ascension_cli.api.training import TrainSummary
    from ascension_cli.retrieval.evaluate import EvaluationRun
    from ascension_cli.train.logbook import EpochRecord

# Text from the data (classes, item ids, file names) reaches stdout: nothing printed there is
# read as markup ("[/x]"), emoji codes (":shirt:") or highlighted. stderr keeps markup for the
# red "error:" label; guard.py escapes what it prints after it.
console = Console(markup=False, emoji=False, highlight=False)
err_console = Console(stderr=True, emoji=False)

# Characters that would act on the terminal rather than show: C0 and C1 controls, DEL, and the
# bidirectional overrides that reorder what a line seems to say.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: object, lines: bool = False) -> str:
    """Text as the console shows it: each control character as an escape (``\\x1b``), so a
    class or file name can neither move the cursor, colour the terminal nor hide part of
    itself; ``lines`` keeps line breaks (a message of several lines)."""
    if not lines:
        return _CONTROL.sub(_escaped, str(text))
    return "\n".join(_CONTROL.sub(_escaped, line) for line in str(text).split("\n"))


def cell(text: object) -> Text:
    """A table cell from the data: shown as it is (``shown``), never read as markup."""
    return Text(shown(text))


def say(text: str) -> None:
    """One plain line on stdout (no markup, no highlighting, long lines unwrapped): a file
    name in brackets is printed as it is, control characters as escapes."""
    console.print(shown(text, lines=True), soft_wrap=True)


def spelled(text: str) -> str:
    """A note as the command line says it: the options it names spelled as flags."""
    return text.render(option_name) if isinstance(text, Wording) else text


def progress_bar(out: Console, fields: str):
    """A transient bar: description, bar, done/total, the given task fields, elapsed and ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(fields, markup=False),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=out,
        transient=True,
    )


class RichReporter:
    """Draws the trainer's progress: tables at start, a bar per epoch, a line per epoch."""

    def __init__(self, out: Console):
        self.console = out
        self.progress = progress_bar(
            out, "loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]}"
        )
        self.task = None

    def message(self, text: str) -> None:
        self.console.print(shown(spelled(text), lines=True), soft_wrap=True)

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        table = Table(title=cell(title), show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(cell(key), cell(value))
        self.console.print(table)

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(
            f"epoch {epoch}/{epochs}", total=steps, loss="-", lr="-", speed=""
        )

    def step(self, loss: float, lr: float, images_per_second: float) -> None:
        self.progress.update(
            self.task, advance=1, loss=f"{loss:.4f}", lr=f"{lr:.2e}",
            speed=f"{images_per_second:.1f} img/s",
        )

    def work_start(self, description: str, total: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(shown(description), total=total, loss="-", lr="-",
                                           speed="")

    def work_advance(self, count: int) -> None:
        self.progress.update(self.task, advance=count)

    def work_end(self) -> None:
        self.progress.stop()
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def epoch_end(self, record: EpochRecord) -> None:
        from ascension_cli.api.training import validation_text

        self.work_end()
        recall = validation_text(record)
        loss = "-" if record.loss is None else f"{record.loss:.4f}"
        speed = "-" if record.images_per_second is None else f"{record.images_per_second:.1f}"
        wait = (
            "" if record.data_wait_fraction is None
            else f"  data wait {record.data_wait_fraction:.0%}"
        )
        marks = [word for word, shown in (("best", record.best),
                                          ("below the untrained model", record.below_untrained))
                 if shown]
        mark = f" ({', '.join(marks)})" if marks else ""
        self.console.print(
            f"epoch {record.epoch:>3}  step {record.step:>6}  loss {loss}  lr {record.lr:.2e}  "
            f"val {recall}{mark}  {speed} img/s  "
            f"{record.seconds:.1f}s{wait}",
            soft_wrap=True,
        )


class ImageProgress(Progress):
    """Progress bars with images/s (``ascension_cli.progress.Progress``): one per stage, all in
    one live display that the outermost one (a context manager) stops."""

    def __init__(self, description: str, bar=None):
        self.description = description
        self.owner = bar is None
        self.progress = bar or progress_bar(console, "{task.fields[rate]}")
        self.task = None

    def stage(self, description: str) -> ImageProgress:
        return ImageProgress(description, self.progress)

    def start(self, total: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(shown(self.description), total=total, rate="")

    def advance(self, count: int) -> None:
        self.progress.advance(self.task, count)
        speed = next(task for task in self.progress.tasks if task.id == self.task).speed
        if speed:
            self.progress.update(self.task, rate=f"{speed:.1f} img/s")

    def failed(self, failure) -> None:
        self.progress.console.print(shown(f"skipped unreadable image: {failure.reason}"),
                                    soft_wrap=True)

    def note(self, text: str) -> None:
        self.progress.console.print(shown(spelled(text), lines=True), soft_wrap=True)

    def __enter__(self) -> ImageProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.owner:
            self.progress.stop()


def print_evaluation(run: EvaluationRun) -> None:
    """The metrics table (clean and recoloured columns), per-class Recall@1, and a note."""
    evaluation, recolored = run.clean, run.recoloured
    class_names = run.searched.class_names
    report = evaluation.report
    table = Table(title="retrieval", title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("clean", justify="right")
    for name in recolored:
        table.add_column(name, justify="right")
    for k, value in sorted(report.recall_at_k.items()):
        row = [f"Recall@{k}", f"{value:.4f}"]
        row += [f"{result.report.recall_at_k[k]:.4f}" for result in recolored.values()]
        table.add_row(*row)
    for label, value in (("Precision@1", report.precision_at_1),
                         ("R-Precision", report.r_precision), ("MAP@R", report.map_at_r)):
        table.add_row(label, f"{value:.4f}", *["" for _ in recolored])
    console.print(table)
    per_class = Table(title="per-class Recall@1", title_justify="left")
    per_class.add_column("class")
    per_class.add_column("Recall@1", justify="right")
    for label, value in sorted(report.per_class_recall_at_1.items(), key=lambda item: item[1]):
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        per_class.add_row(cell(name), f"{value:.4f}")
    console.print(per_class)
    note = f"{report.queries} queries"
    if report.excluded_queries:
        note += f"; {report.excluded_queries} left out (no other item of their class)"
    if evaluation.approximate_recall is not None:
        note += (f"; {evaluation.index_kind} index finds {evaluation.approximate_recall:.1%} "
                 "of the exact top-k (sampled)")
    console.print(note)


def _match_name(match) -> str:
    """A match as the table shows it: its item, and its class when the item is not the class."""
    name = match.class_name or Path(match.path).name
    return name if match.item in (None, name) else f"{match.item} [{name}]"


def print_open_set(report) -> None:
    """The open-set figures: what the threshold for the target FMR lets through."""
    say(f"open set: {len(report.unknown_classes)} class(es) held out "
        f"({', '.join(report.unknown_classes)}), {report.unknown_queries} unknown and "
        f"{report.known_queries} known queries; ROC AUC {report.curve.auc:.3f}")
    say(f"at threshold {report.threshold:.4f} (for FMR {report.target_fmr:.1%}): unknowns "
        f"accepted {report.fmr:.1%}, known refused {report.fnmr:.1%}, Recall@1 of the accepted "
        f"{report.recall_at_1_accepted:.4f}")


def print_indexed(settings, result) -> None:
    """What ``index`` built (or found, checking a catalogue as it is), warned of and wrote."""
    catalog = result.catalog
    say(f"catalogue {settings.output}: {len(catalog)} items in {len(catalog.class_names)} "
        "classes" + (f" ({result.added} added)" if settings.builds else ""))
    if result.index_description() is not None and settings.builds:
        say(result.index_description())
    print_onboarding(result.confusable, _limit(result.confusable_limit, result.catalog))
    if result.check is not None:
        print_check(result.check)
    if settings.json_file is not None:
        say(f"results written to {settings.json_file}")


def print_check(check, shown: int = 10) -> None:
    """What ``index --check`` found, the most serious of each kind first."""
    def photo(row: int) -> str:
        catalog = check.catalog
        return f"{catalog.paths[row]} [{catalog.class_name(int(catalog.labels[row]))}]"

    def listed(entries: list, heading: str, line) -> None:
        say(f"{heading}: {len(entries)}" + (":" if entries else ""))
        for entry in entries[:shown]:
            say("  " + line(entry))
        if len(entries) > shown:
            say(f"  ... and {len(entries) - shown} more (all of them with --json)")

    listed(check.confusable, "item pairs of different classes as similar as "
           + _limit(check.threshold, check.catalog),
           lambda pair: f"{pair.first} ~ {pair.second}: {pair.similarity:.3f}")
    listed(check.duplicates, "near-duplicate photos filed under different classes",
           lambda pair: f"{photo(pair.first)} = {photo(pair.second)}: {pair.similarity:.3f}")
    listed(check.suspected, "photos whose nearest neighbours all agree on another class "
           "(suspected label errors)",
           lambda entry: f"{photo(entry.row)}: looks like "
           f"{check.catalog.class_name(entry.suggested)} (margin {entry.margin:.3f})")


def _limit(similarity: float, catalog) -> str:
    """The confusable limit as the warnings name it."""
    return ("the calibrated threshold" if catalog.threshold is not None
            else f"{similarity:g} (uncalibrated)")


def print_onboarding(confusable: list[dict], limit: str, shown: int = 10) -> None:
    """The new items a search may take for another class's (``confusable``, most similar
    first), and the ``limit`` they reach."""
    if not confusable:
        return
    say(f"warning: {len(confusable)} new item(s) as similar to an item of another class as "
        f"{limit}:")
    for entry in confusable[:shown]:
        say(f"  {entry['item']} [{entry['class']}] ~ {entry['nearest_item']} "
            f"[{entry['nearest_class']}]: {entry['similarity']:.3f}")
    if len(confusable) > shown:
        say(f"  ... and {len(confusable) - shown} more")


def print_calibration(calibration: dict) -> None:
    say(f"threshold {calibration['threshold']:.4f} for FMR {calibration['target_fmr']:.1%}: "
        f"unknowns accepted {calibration['fmr']:.1%} ({calibration['unknown_queries']} photos "
        f"of {len(calibration['unknown_classes'])} class(es) the catalogue lacks), known refused "
        f"{calibration['fnmr']:.1%}, Recall@1 of the accepted "
        f"{calibration['recall_at_1_accepted']:.4f}, ROC AUC {calibration['auc']:.3f}; "
        "written into the catalogue")
    for warning in calibration.get("warnings", []):
        say(f"warning: {warning}")


def print_search(catalog: Path, results: list) -> None:
    table = Table(title=cell(f"search in {catalog}"), title_justify="left")
    for column in ("query", "prediction", "score", "best matches (similarity)"):
        table.add_column(column)
    for result in results:
        prediction = "unknown" if result.unknown else (result.predicted or "-")
        best = ", ".join(f"{_match_name(m)} ({m.similarity:.3f})" for m in result.matches[:3])
        table.add_row(cell(result.query), cell(prediction), f"{result.score:.2f}", cell(best))
    console.print(table)


def print_embedded(result: EmbedResult) -> None:
    """What ``embed`` wrote (nothing on a torchrun rank other than 0)."""
    vectors = result.vectors
    if vectors is None or result.output is None:
        return
    labelled = "labelled" if vectors.labelled else "unlabelled"
    say(f"wrote {len(vectors)} {labelled} vectors of dimension {vectors.vectors.shape[1]} "
        f"({vectors.feature_kind}) to {result.output}"
        + (f", index to {result.index}" if result.index else "")
        + (f"; {len(vectors.failed)} unreadable image(s) skipped" if vectors.failed else ""))


def print_training_summary(result: TrainSummary) -> None:
    trained = [r for r in result.history if r.loss is not None]
    if not trained:
        return
    best, untrained = result.best_recall_at_1, result.untrained_recall_at_1
    best_text = "-" if best is None else f"{best:.4f}"
    console.print(
        shown(f"done: {len(trained)} epoch(s) this run, best validation recall@1 "
              f"{best_text}; checkpoints in {result.save_dir}"),
    )
    if result.best_epoch == 0 and untrained is not None:
        reached = max((r.val_recall_at_1 for r in trained if r.val_recall_at_1 is not None),
                      default=None)
        after = "" if reached is None else f", {reached:.4f} at best after"
        console.print(
            f"note: training did not beat the starting model (validation recall@1 "
            f"{untrained:.4f} before training{after}); best.pt holds the starting weights. "
            "Train longer, or lower --lr.",
        )
    print_losses_to_start(result)
    print_gallery_check(result)


def print_losses_to_start(result: TrainSummary) -> None:
    """Say where best.pt, chosen by recall@1, validates below the starting weights."""
    lost = result.lost_to_start
    if lost:
        figures = " and ".join(f"{name} ({before:.4f} before training, {after:.4f} at best.pt)"
                               for name, before, after in lost)
        console.print(shown(
            f"note: best.pt (epoch {result.best_epoch}, chosen by validation recall@1) "
            f"validates below the starting model in {figures}; each epoch's figures are in "
            f"{result.metrics_file}."), soft_wrap=True)


def print_gallery_check(result: TrainSummary) -> None:
    """The starting weights against best.pt with the validation photos searched among the
    training photos (``--gallery-check``), and plainly where training did not help there."""
    check = result.gallery_check
    if check is None:
        return
    start, best = check
    measured = [name for name in start if start[name] is not None and best[name] is not None]
    figures = ", ".join(f"{name} {start[name]:.4f} -> {best[name]:.4f}" for name in measured)
    console.print(shown(f"the validation photos searched among the training photos, as a "
                        f"catalogue of them is searched: {figures} (starting weights -> "
                        f"best.pt)"), soft_wrap=True)
    lost = [name for name, _, _ in result.gallery_lost_to_start]
    if lost:
        console.print(shown(
            f"note: in that search best.pt is below the starting weights in "
            f"{' and '.join(lost)}: for a catalogue of these photos, training did not help "
            f"there (docs/training.md, \"When training does not help\")."), soft_wrap=True)
