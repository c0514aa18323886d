"""The command line: help, one-line errors with non-zero exits, and a real run."""

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from ascension_cli.cli.app import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_commands_and_train_help_teaches():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "train" in result.output and "demo" in result.output
    train_help = invoke("train", "--help")
    assert train_help.exit_code == 0
    for text in ("--target-batch", "--accumulation", "gradient caching", "(default: 128)",
                 "--no-pretrained", "--resume"):
        assert text in train_help.output, text


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and "ascension 0.1.0" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-batch", "100"], "must be a multiple of --batch-size"),
        (["--lr", "-1"], "invalid --lr"),
        (["--precision", "fp8"], "invalid --precision"),
    ],
)
def test_bad_options_end_in_one_line_and_exit_2(dataset, args, message):
    result = invoke("train", dataset, *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_folder_is_one_line(tmp_path):
    result = invoke("train", tmp_path / "nowhere", "--no-pretrained", "--model", "test_convnext")
    assert result.exit_code == 2
    missing = tmp_path / "nowhere"
    assert result.output.strip() == f"error: invalid DATA_ROOT: folder not found: {missing}"


def test_offline_pretrained_is_one_line_naming_the_ways_out(dataset, tmp_path):
    result = invoke("train", dataset, "--model", "test_convnext", "--save-dir", tmp_path / "run",
                    "--target-batch", "16", "--batch-size", "16")  # fits the 24 training images
    assert result.exit_code == 2
    assert "--weights" in result.output and "--no-pretrained" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_config_file_unknown_key(dataset, tmp_path):
    options = tmp_path / "options.yaml"
    options.write_text("epochs: 2\nlearnig_rate: 0.1\n")
    result = invoke("train", dataset, "--config", options)
    assert result.exit_code == 2
    assert "unknown option 'learnig_rate'" in result.output


def test_train_end_to_end_through_the_cli(dataset, tmp_path):
    options = tmp_path / "options.toml"
    options.write_text('model = "test_convnext"\npretrained = false\nimage-size = 32\n')
    result = invoke(
        "train", dataset, "--config", options, "--batch-size", "4", "--target-batch", "8",
        "--samples-per-class", "2", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0",
        "--val-fraction", "0.25", "--save-dir", tmp_path / "run", "--cache-images",
        "--no-channels-last",
    )
    assert result.exit_code == 0, result.output
    assert "--cache-images: 32 images decoded once" in result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["cache_images"] is True and saved["channels_last"] is False
    assert "epoch   1" in result.output and "val recall@1" in result.output
    assert "done: 1 epoch(s)" in result.output
    assert (tmp_path / "run" / "best.pt").is_file()


def train_two_epochs(dataset, save_dir):
    """A two-epoch run of the tiny model: what the tests of validation figures made up need."""
    return invoke(
        "train", dataset, "--model", "test_convnext", "--no-pretrained", "--image-size", "32",
        "--batch-size", "4", "--target-batch", "8", "--samples-per-class", "2", "--epochs", "2",
        "--warmup-epochs", "0", "--workers", "0", "--val-fraction", "0.25", "--save-dir",
        save_dir)


def test_the_starting_weights_stay_best_when_no_epoch_beats_them(dataset, tmp_path,
                                                                 monkeypatch):
    """Do no harm: the starting weights are a candidate like any epoch (validation figures
    made up here, so that both epochs retrieve worse than the start)."""
    import torch

    from ascension_cli.train import loop

    figures = iter([0.9, 0.5, 0.6])
    monkeypatch.setattr(loop, "validation_figures",
                        lambda run, stop: {"val_recall_at_1": next(figures)})
    result = train_two_epochs(dataset, tmp_path / "run")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # as the console wrapped it, unwrapped
    assert "training did not beat the starting model (validation recall@1 0.9000 before " \
           "training, 0.6000 at best after); best.pt holds the starting weights" in said
    best = torch.load(tmp_path / "run" / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 0 and last["epoch"] == 2 and best["best_recall_at_1"] == 0.9
    assert any(not torch.equal(best["model"][name], last["model"][name])
               for name in best["model"])  # trained weights differ: best.pt is the start
    assert "(best" not in said.split("before training")[1]  # no epoch marked best


def test_a_run_says_where_best_pt_validates_below_the_starting_model(dataset, tmp_path,
                                                                    monkeypatch):
    """best.pt is chosen by recall@1; where it finds fewer classes among its first five, or
    ranks them lower, than the starting weights, the run says so (figures made up here: the
    second epoch gains recall@1 and loses recall@5, as on TrashNet's validation split)."""
    from ascension_cli.train import loop

    figures = iter([(0.70, 0.94, 0.30), (0.72, 0.95, 0.40), (0.75, 0.88, 0.45)])

    def measured(run, stop):
        return dict(zip(("val_recall_at_1", "val_recall_at_5", "val_map_at_r"), next(figures),
                        strict=True))

    monkeypatch.setattr(loop, "validation_figures", measured)
    result = train_two_epochs(dataset, tmp_path / "run")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "before training: validation recall@1 0.7000, recall@5 0.9400, MAP@R 0.3000" in said
    assert "val recall@1 0.7500, recall@5 0.8800, MAP@R 0.4500 (best)" in said
    assert ("note: best.pt (epoch 2, chosen by validation recall@1) validates below the "
            "starting model in recall@5 (0.9400 before training, 0.8800 at best.pt)") in said
    assert "MAP@R (" not in said  # MAP@R rose: not named
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["val_recall_at_5"] for r in records] == [0.94, 0.95, 0.88]
    assert [r["val_map_at_r"] for r in records] == [0.30, 0.40, 0.45]


def test_no_note_where_best_pt_validates_at_or_above_the_start_in_every_figure():
    from ascension_cli.train.logbook import EpochRecord, lost_to_start

    def record(epoch, best, r1, r5, mapr):
        return EpochRecord(epoch, epoch, None if epoch == 0 else 1.0, 1e-3, r1, None, 1.0,
                           best=best, val_recall_at_5=r5, val_map_at_r=mapr)

    start = record(0, True, 0.7, 0.9, 0.3)
    assert lost_to_start([start, record(1, True, 0.8, 0.9, 0.5)]) == []
    # the last epoch marked best is best.pt: a later epoch below the start does not count
    assert lost_to_start([start, record(1, True, 0.8, 0.95, 0.5),
                          record(2, False, 0.75, 0.5, 0.1)]) == []
    assert lost_to_start([start, record(1, True, 0.8, 0.95, 0.2)]) == [("MAP@R", 0.3, 0.2)]
    assert lost_to_start([start, record(1, False, 0.6, 0.5, 0.1)]) == []  # best.pt: the start
    older = EpochRecord(0, 0, None, 1e-3, 0.7, None, 1.0, best=True)  # before recall@5 was kept
    assert lost_to_start([older, record(1, True, 0.8, 0.5, 0.1)]) == []


def test_module_entry_point_and_console_script_help():
    result = subprocess.run(
        [sys.executable, "-m", "ascension_cli", "train", "--help"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0 and "--target-batch" in result.stdout


def test_help_does_not_import_torch():
    code = "import sys; from ascension_cli.cli import app; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "False"


def test_the_demo_learns_from_its_first_epoch(tmp_path):
    result = invoke("demo", "--workdir", tmp_path)
    assert result.exit_code == 0, result.output
    assert "validation recall@1: before training" in result.output and "demo took" in result.output
    assert "below the untrained model" not in result.output
    lines = (tmp_path / "checkpoints" / "metrics.jsonl").read_text().splitlines()
    recall = [json.loads(line)["val_recall_at_1"] for line in lines]
    assert recall[1] > recall[0] + 0.05  # above the untrained model after epoch 1
    assert all(b >= a - 0.01 for a, b in zip(recall[1:-1], recall[2:], strict=True))
    assert recall[-1] > recall[1]
    assert len(list((tmp_path / "digits").iterdir())) == 10


def test_epoch_line_says_when_training_is_below_the_untrained_model():
    from io import StringIO

    from rich.console import Console

    from ascension_cli.cli.app import RichReporter
    from ascension_cli.train.loop import EpochRecord

    out = StringIO()
    reporter = RichReporter(Console(file=out, width=200))
    reporter.epoch_end(EpochRecord(1, 10, 2.5, 1e-3, 0.55, 100.0, 3.0, best=True,
                                   below_untrained=True))
    reporter.epoch_end(EpochRecord(2, 20, 2.0, 1e-3, 0.70, 100.0, 3.0, best=True))
    first, second = [line for line in out.getvalue().splitlines() if line]
    assert "val recall@1 0.5500 (best, below the untrained model)" in first
    assert "val recall@1 0.7000 (best)" in second and "untrained" not in second
