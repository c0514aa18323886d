from pathlib import Path

import pytest

from ascension_cli.config import TrainConfig, resolve
from ascension_cli.errors import ConfigError


def make(tmp_path: Path, file_text: str | None = None, suffix: str = ".yaml", **cli):
    config_file = None
    if file_text is not None:
        config_file = tmp_path / f"options{suffix}"
        config_file.write_text(file_text)
    return resolve(TrainConfig, {"data_root": tmp_path, **cli}, config_file)


def test_defaults_are_the_documented_ones(tmp_path):
    config = make(tmp_path)
    assert (config.batch_size, config.target_batch, config.epochs) == (16, 128, 50)
    assert (config.warmup_epochs, config.lr, config.temperature) == (None, 6e-4, 0.1)
    assert (config.lr_scaling, config.backbone_lr_scale) == ("linear", 1.0)
    assert config.model == "tf_efficientnetv2_m"
    assert (config.head, config.embedding_dim) == ("none", 128)
    assert (config.views, config.samples_per_class) == (1, 4)
    assert (config.accumulation, config.augment, config.precision) == (
        "cache", "auto", "auto")
    assert (config.channels_last, config.cache_images, config.compile) == (True, False, False)
    assert config.workers is None  # chosen by device when training starts


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": -1.0}, "--lr"),
        ({"batch_size": 0}, "--batch-size"),
        ({"target_batch": 100}, "--target-batch (100) must be a multiple of --batch-size (16)"),
        ({"samples_per_class": 256}, "--samples-per-class"),
        ({"warmup_epochs": 60}, "--warmup-epochs"),
        ({"precision": "fp8"}, "--precision"),
        ({"accumulation": "lazy"}, "--accumulation"),
        ({"augment": "wild"}, "--augment"),
        ({"device": "tpu"}, "--device"),
        ({"val_fraction": 1.5}, "--val-fraction"),
        ({"views": 1, "samples_per_class": 1}, "--samples-per-class must be at least 2"),
        ({"instance_weight": 0.1}, "--instance-weight tells a photo's views"),
        ({"instance_weight": 0.1, "views": 2, "loss": "pml:ProxyAnchorLoss"},
         "needs --views 2 or more and --loss supcon"),
        ({"instance_weight": 1.5, "views": 2}, "--instance-weight"),
        ({"weights": "missing.safetensors"}, "--weights"),
        ({"temperature": 0}, "--temperature"),
        ({"lr_scaling": "cubic"}, "--lr-scaling"),
        ({"backbone_lr_scale": 0}, "--backbone-lr-scale"),
        ({"head": "deep"}, "--head"),
        ({"embedding_dim": 64}, "--embedding-dim applies to a projection head"),
        ({"backbone_lr_scale": 0.1}, "--backbone-lr-scale applies to a projection head"),
    ],
)
def test_invalid_options_name_the_option(tmp_path, options, message):
    with pytest.raises(ConfigError) as caught:
        make(tmp_path, **options)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_val_root_and_val_fraction_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--val-root or --val-fraction"):
        make(tmp_path, val_root=tmp_path, val_fraction=0.2)


def test_yaml_file_gives_defaults_and_cli_wins(tmp_path):
    config = make(tmp_path, "lr: 0.01\nepochs: 3\nbatch-size: 8\n", epochs=7)
    assert config.lr == 0.01
    assert config.batch_size == 8
    assert config.epochs == 7


def test_toml_file(tmp_path):
    config = make(tmp_path, 'model = "test_convnext"\ntarget_batch = 32\n', suffix=".toml")
    assert config.model == "test_convnext"
    assert config.target_batch == 32


def test_unknown_key_in_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown option 'learning_rate' in config file"):
        make(tmp_path, "learning_rate: 0.1\n")


def test_bad_value_in_file_says_where_it_came_from(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid --epochs \(from .*options.yaml\)"):
        make(tmp_path, "epochs: zero\n")


def test_unparseable_or_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot parse"):
        make(tmp_path, "lr: [unclosed\n")
    with pytest.raises(ConfigError, match="config file not found"):
        resolve(TrainConfig, {"data_root": tmp_path}, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        make(tmp_path, "- a\n- b\n")


def test_a_save_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    for save_dir in (tmp_path / "taken", tmp_path / "taken" / "run"):
        with pytest.raises(ConfigError, match="--save-dir.*is a file, not a folder"):
            make(tmp_path, save_dir=save_dir)
