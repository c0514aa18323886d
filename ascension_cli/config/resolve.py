"""Options from the command line and a config file, merged and validated once; a validation
error as one line naming the option (and the file it came from)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ascension_cli import paths
from ascension_cli.config.fields import ConfigT, option_name
from ascension_cli.errors import ConfigError


def _describe(error: dict[str, Any], file_keys: set[str], config_file: Path | None) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    field = loc[0] if loc else ""
    if error.get("type") == "extra_forbidden":
        where = f" in config file {config_file}" if config_file else ""
        return f"unknown option '{field}'{where}"
    message = error.get("msg", "invalid value")
    message = message.removeprefix("Value error, ")
    if not field:
        return message
    source = f" (from {config_file})" if config_file and field in file_keys else ""
    given = error.get("input")
    given = str(given) if isinstance(given, Path) else given
    shown = (f" (got {given!r})" if given is not None and not isinstance(given, (dict, list))
             and str(given) not in message else "")
    return f"invalid {option_name(field)}{source}: {message}{shown}"


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or TOML file of options; keys may use dashes or underscores."""
    try:
        paths.existing_file(path)
    except ValueError as exc:
        raise ConfigError(f"config {exc}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror
        raise ConfigError(f"cannot parse config file {path}: {why}") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise ConfigError(f"cannot parse config file {path}: {first_line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def resolve(
    model: type[ConfigT], cli_values: dict[str, Any], config_file: Path | None = None
) -> ConfigT:
    """Merge a config file (defaults) with command-line values (which win) and validate once.

    ``cli_values`` holds only options the user gave: ``None`` means "not given".
    """
    file_values = read_config_file(config_file) if config_file else {}
    merged = dict(file_values)
    merged.update({key: value for key, value in cli_values.items() if value is not None})
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], set(file_values), config_file)) from None


def to_plain(config: BaseModel) -> dict[str, Any]:
    """The config as JSON/YAML-friendly values (paths as strings)."""
    return config.model_dump(mode="json")
