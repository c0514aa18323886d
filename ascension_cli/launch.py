"""Training with several processes on this machine: the run handed to torchrun (``--nproc``).

The workers are told only the options that were set (by the caller or a config file), so that a
default stays a default there too (see ``data/sampler.py::fit_batches``).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ascension_cli.config import TrainConfig


def torchrun_config(settings: TrainConfig) -> dict[str, Any]:
    """What the torchrun workers are told: the options that were set."""
    return settings.model_dump(mode="json", exclude_unset=True)


def torchrun_command(nproc: int, settings: TrainConfig, config_file: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "ascension_cli", "train",
            str(settings.data_root), "--config", str(config_file)]


def launch_torchrun(nproc: int, settings: TrainConfig) -> int:
    """Run this training under torchrun with ``nproc`` processes; its exit code."""
    with tempfile.TemporaryDirectory(prefix="ascension-torchrun-") as folder:
        config = Path(folder) / "options.yaml"
        config.write_text(yaml.safe_dump(torchrun_config(settings)), encoding="utf-8")
        return subprocess.run(torchrun_command(nproc, settings, config)).returncode
