"""The Python API: train_supcon, embed and evaluate, as a script would use them."""

import subprocess
import sys

import pytest

from ascension_cli import embed, evaluate, train_supcon
from ascension_cli.errors import ConfigError


def test_importing_the_api_is_cheap_and_help_documents_the_parameters():
    code = ("import sys; from ascension_cli import train_supcon, embed, evaluate; "
            "print('torch' in sys.modules); help(train_supcon)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.startswith("False")
    for text in ("data_root", "batch_size", "(default 16)", "target_batch", "(default 128)",
                 "epochs", "warmup_epochs", "lr", "save_dir", "**options"):
        assert text in result.stdout, text


def test_train_embed_and_evaluate_through_the_api(dataset, tmp_path):
    run = train_supcon(dataset, batch_size=4, target_batch=8, epochs=2, lr=1e-3,
                       save_dir=tmp_path / "run", model="test_convnext", pretrained=False,
                       image_size=32, samples_per_class=2, workers=0, val_fraction=0.25)
    assert run.epochs_run == 2 and [r.epoch for r in run.history] == [0, 1, 2]
    assert run.last_checkpoint.is_file() and run.best_checkpoint.is_file()
    # best.pt: the best of every candidate, the starting weights (epoch 0) included.
    assert run.best_recall_at_1 == max(r.val_recall_at_1 for r in run.history)
    assert run.best_epoch == max((r for r in run.history), key=lambda r: r.val_recall_at_1).epoch

    vectors = embed(run.last_checkpoint, dataset, tmp_path / "v.npz", workers=0)
    assert len(vectors) == 32 and (tmp_path / "v.npz").is_file()
    measured = evaluate(tmp_path / "v.npz", ks=(1, 5))
    assert set(measured.clean.report.recall_at_k) == {1, 5}
    in_memory = evaluate(vectors, ks=(1, 5))
    assert in_memory.clean.report.recall_at_k == measured.clean.report.recall_at_k


def test_the_api_validates_as_the_command_line_does(dataset, tmp_path):
    with pytest.raises(ConfigError, match="--target-batch"):
        train_supcon(dataset, batch_size=3, target_batch=8, save_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
        train_supcon(dataset, learning_rate=1.0)
