"""The code's shape, as docs/ARCHITECTURE.md describes it: small functions, a short CLI, one-way
imports, and notes that list every module."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ascension_cli"
NOTES = PACKAGE.parent / "docs" / "ARCHITECTURE.md"


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_function_is_longer_than_80_lines():
    long = [f"{path.relative_to(PACKAGE)}::{node.name} ({node.end_lineno - node.lineno + 1})"
            for path in modules() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > 80]
    assert long == []


def test_the_command_line_module_stays_short():
    assert len((PACKAGE / "cli" / "app.py").read_text().splitlines()) < 500


def test_train_and_embedding_do_not_import_each_other():
    assert not any(name.startswith("ascension_cli.train") for name in imported(
        PACKAGE / "embed" / "images.py"))
    for path in (PACKAGE / "train").glob("*.py"):
        assert "ascension_cli.embed.images" not in imported(path), path.name


def test_lower_layers_never_import_the_command_line():
    for path in modules():
        if path.parent.name != "cli" and path.name != "__main__.py":
            names = imported(path)
            assert "ascension_cli.cli.app" not in names and "typer" not in names, path.name


def test_the_architecture_notes_list_every_module():
    notes = NOTES.read_text()
    missing = [str(path.relative_to(PACKAGE)) for path in modules()
               if path.name not in notes and path.name != "__init__.py"]
    assert missing == []


def test_every_option_of_every_model_is_on_its_command_line():
    import typer.main

    from ascension_cli import config
    from ascension_cli.cli.app import app

    command = typer.main.get_command(app)
    models = {"train": config.TrainConfig, "embed": config.EmbedConfig, "eval": config.EvalConfig,
              "index": config.IndexConfig, "search": config.SearchConfig,
              "export": config.ExportConfig, "demo": config.DemoConfig,
              "report": config.ReportConfig, "serve": config.ServeConfig}
    for name, model in models.items():
        params = {param.name for param in command.commands[name].params}
        assert set(model.model_fields) <= params, name
        assert params - set(model.model_fields) <= {"config", "nproc", "help"}, name
