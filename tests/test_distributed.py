"""DDP over gloo on the CPU: two processes equal one process holding the whole batch."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ascension_cli.losses import supcon_loss
from ascension_cli.model.backbone import EmbeddingModel
from ascension_cli.train.distributed import gather_with_grad
from ascension_cli.train.gradcache import cached_backward
from tests.conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def make_model() -> EmbeddingModel:
    torch.manual_seed(0)
    return EmbeddingModel(timm.create_model("test_convnext", num_classes=0), 16, "mlp")


def make_batch():
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(16, 2, 3, 32, 32, generator=generator)
    labels = torch.arange(16) // 4
    return images, labels


def loss_fn(embeddings, labels):
    return supcon_loss(embeddings, labels, 0.1)


def _rank(rank: int, world: int, init_file: str, output: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    images, labels = make_batch()
    share = len(images) // world
    mine = slice(rank * share, (rank + 1) * share)
    micro = [(images[mine][i : i + 4], labels[mine][i : i + 4]) for i in range(0, share, 4)]
    loss = cached_backward(model, micro, loss_fn, no_sync=model.no_sync,
                           gather=gather_with_grad)
    if rank == 0:
        torch.save({"loss": loss, "grads": {n: p.grad for n, p in
                                            model.module.named_parameters()}}, output)
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    output = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(output)), nprocs=2, join=True)
    distributed = torch.load(output, weights_only=True)

    model = make_model()
    images, labels = make_batch()
    reference = copy.deepcopy(model)
    embeddings = reference(images.flatten(0, 1)).view(16, 2, -1)
    full_loss = loss_fn(embeddings, labels)
    full_loss.backward()

    assert float(distributed["loss"]) == pytest.approx(float(full_loss.detach()), rel=1e-5)
    for name, parameter in reference.named_parameters():
        theirs = distributed["grads"][name]
        error = float((theirs - parameter.grad).norm() / parameter.grad.norm().clamp_min(1e-12))
        assert error < 1e-5, name


def _colour_rank(rank: int, world: int, init_file: str, output: str) -> None:
    from types import SimpleNamespace

    from ascension_cli.runtime import DistributedContext
    from ascension_cli.train import colour

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    measured = []  # the colour test embeds every photo: a rank that measures shows here

    def measure(*_):
        measured.append(rank)
        return "color-preserving", "--augment auto: measured on rank 0"

    colour.choose_augmentation = measure
    machine = SimpleNamespace(distributed=DistributedContext(rank=rank, world_size=world))
    said = []
    chosen, why = colour.measure_colour(None, None, None, machine,
                                        SimpleNamespace(message=said.append), {})
    Path(f"{output}.{rank}").write_text(json.dumps([measured, chosen, why, said]))
    dist.barrier()
    dist.destroy_process_group()


def test_only_rank_0_measures_colour_and_every_rank_gets_its_choice(tmp_path):
    output = tmp_path / "colour"
    mp.spawn(_colour_rank, args=(2, str(tmp_path / "init"), str(output)), nprocs=2, join=True)
    first, second = (json.loads(Path(f"{output}.{rank}").read_text()) for rank in (0, 1))
    assert first[0] == [0] and second[0] == []
    why = "--augment auto: measured on rank 0"
    assert first[1:] == second[1:] == ["color-preserving", why, [why]]


def test_train_with_two_processes_then_embed(tmp_path):
    data = make_dataset(tmp_path / "data", classes=4, per_class=10)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The README's single-node command, with gloo in place of NCCL (no GPU here).
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "ascension_cli", "train", str(data),
               "--model", "test_convnext", "--no-pretrained", "--image-size", "32",
               "--batch-size", "4", "--target-batch", "16", "--samples-per-class", "4",
               "--epochs", "2", "--warmup-epochs", "0", "--workers", "0",
               "--val-fraction", "0.2", "--save-dir", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("epoch   2") == 1  # only rank 0 reports
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 4  # 32 images / 16 per step
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "processes: 2" in config

    embedded = subprocess.run(
        [sys.executable, "-m", "ascension_cli", "embed", str(tmp_path / "run" / "last.pt"),
         str(data), "-o", str(tmp_path / "v.npz"), "--workers", "0"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert embedded.returncode == 0, embedded.stderr

    # Resume with another world size: one process continues the two-process run.
    resumed = subprocess.run(
        [sys.executable, "-m", "ascension_cli", "train", str(data), "--model", "test_convnext",
         "--no-pretrained", "--image-size", "32", "--batch-size", "4", "--target-batch", "16",
         "--samples-per-class", "4", "--epochs", "3", "--warmup-epochs", "0", "--workers", "0",
         "--val-fraction", "0.2", "--save-dir", str(tmp_path / "run"), "--resume", "auto"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 3
    metrics = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3]


def test_nproc_option_launches_torchrun(tmp_path):
    data = make_dataset(tmp_path / "data", classes=4, per_class=6)
    result = subprocess.run(
        [sys.executable, "-m", "ascension_cli", "train", str(data), "--nproc", "2",
         "--model", "test_convnext", "--no-pretrained", "--image-size", "32", "--batch-size",
         "4", "--target-batch", "8", "--samples-per-class", "2", "--epochs", "1",
         "--warmup-epochs", "0", "--workers", "0", "--save-dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "launching 2 processes" in result.stdout
    assert "processes: 2" in (tmp_path / "run" / "config.yaml").read_text()
    # Rank 0 searched the validation photos among the training photos (--gallery-check) while
    # the other waited.
    metrics = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["gallery_recall_at_1"] is not None


def test_target_batch_must_split_over_processes(tmp_path, monkeypatch):
    from ascension_cli.config import TrainConfig
    from ascension_cli.errors import ConfigError
    from ascension_cli.runtime import DistributedContext
    from ascension_cli.train import build, loop

    monkeypatch.setattr(build, "init_distributed", lambda device: DistributedContext(0, 3, 0))
    data = make_dataset(tmp_path / "data", classes=2, per_class=4)
    config = TrainConfig(data_root=data, save_dir=tmp_path / "run", model="test_convnext",
                         pretrained=False, image_size=32, batch_size=4, target_batch=8,
                         samples_per_class=2, epochs=1, warmup_epochs=0, workers=0)
    with pytest.raises(ConfigError, match="x 3 processes"):
        loop.train(config)
