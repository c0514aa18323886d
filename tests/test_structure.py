"""The code's shape, as docs/ARCHITECTURE.md describes it: small functions, classes and modules,
a command line that only parses and prints, imports that match the drawn diagram (and never go
round in a circle), one base for every user-facing error, and notes that list every module."""

import ast
import re
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ascension_cli"
NOTES = PACKAGE.parent / "docs" / "ARCHITECTURE.md"
# Units of the diagram: each package and each top-level module (the package's __init__ and
# __main__ stand outside it: they re-export the API and start the command line).
OUTSIDE = {"__init__", "__main__"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def unit(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def runtime_imports(path: Path) -> set[str]:
    """Modules ``path`` imports when it runs: every import at any depth, but not those under
    ``if TYPE_CHECKING:`` (type hints only). ``from ascension_cli import x`` names ``x``."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "ascension_cli":
                names.update(f"ascension_cli.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree(path))
    return names


def code_arrows() -> dict[str, set[str]]:
    """unit -> the units it imports, from the code."""
    arrows: dict[str, set[str]] = defaultdict(set)
    units = {unit(path) for path in modules()} - OUTSIDE
    for path in modules():
        source = unit(path)
        if source in OUTSIDE:
            continue
        for name in runtime_imports(path):
            parts = name.split(".")
            if (parts[0] == "ascension_cli" and len(parts) > 1 and parts[1] in units
                    and parts[1] != source):
                arrows[source].add(parts[1])
    return arrows


def drawn_arrows() -> dict[str, set[str]]:
    """unit -> units, from the ```imports block of the notes (``a -> b, c`` per line)."""
    block = re.search(r"```imports\n(.*?)```", NOTES.read_text(), re.S)
    assert block, "docs/ARCHITECTURE.md has no ```imports block"
    arrows: dict[str, set[str]] = defaultdict(set)
    for line in block.group(1).splitlines():
        if "->" in line:
            left, right = line.split("->")
            arrows[left.strip()].update(name.strip() for name in right.split(",") if name.strip())
    return arrows


def test_no_function_is_longer_than_60_lines_and_no_class_than_250():
    long = [f"{path.relative_to(PACKAGE)}::{node.name} ({node.end_lineno - node.lineno + 1})"
            for path in modules() for node in ast.walk(tree(path))
            if (isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and node.end_lineno - node.lineno + 1 > 60)
            or (isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 250)]
    assert long == []


def test_no_module_is_longer_than_400_lines():
    long = [f"{path.relative_to(PACKAGE)} ({len(path.read_text().splitlines())})"
            for path in modules() if len(path.read_text().splitlines()) > 400]
    assert long == []


def test_the_command_line_only_parses_calls_the_api_and_prints():
    app = PACKAGE / "cli" / "app.py"
    assert len(app.read_text().splitlines()) < 300
    allowed = ("ascension_cli.api", "ascension_cli.cli", "ascension_cli.config",
               "ascension_cli.errors", "ascension_cli.progress")
    used = {name for name in runtime_imports(app)
            if name.startswith("ascension_cli.") and name != "ascension_cli.__version__"}
    assert {name for name in used if not name.startswith(allowed)} == set()


def test_the_import_diagram_is_the_code():
    code, drawn = code_arrows(), drawn_arrows()
    missing = sorted(f"{a} -> {b}" for a in code for b in code[a] - drawn.get(a, set()))
    extra = sorted(f"{a} -> {b}" for a in drawn for b in drawn[a] - code.get(a, set()))
    assert (missing, extra) == ([], [])


def test_imports_go_one_way():
    arrows = code_arrows()
    order: list[str] = []

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, " -> ".join((*path, node))
        if node in order:
            return
        for target in sorted(arrows.get(node, ())):
            visit(target, (*path, node))
        order.append(node)

    for node in sorted(arrows):
        visit(node, ())


def test_embedding_never_imports_training_and_training_only_its_forward_pass():
    for path in (PACKAGE / "embedding").glob("*.py"):
        assert not any(n.startswith("ascension_cli.train") for n in runtime_imports(path)), path
    for path in (PACKAGE / "train").glob("*.py"):
        embed = {n for n in runtime_imports(path) if n.startswith("ascension_cli.embedding")}
        assert embed <= {"ascension_cli.embedding.inference"}, path.name


def test_lower_layers_never_import_the_command_line():
    for path in modules():
        if unit(path) not in ("cli", "__main__"):
            names = runtime_imports(path)
            assert not any(n.startswith("ascension_cli.cli") for n in names), path
            assert "typer" not in names, path


def test_every_user_facing_error_derives_from_one_base_in_errors():
    from ascension_cli import errors

    defined = [(path.relative_to(PACKAGE), node.name) for path in modules()
               for node in ast.walk(tree(path))
               if isinstance(node, ast.ClassDef) and node.name.endswith("Error")]
    assert all(str(where) == "errors.py" for where, _ in defined), defined
    for _, name in defined:
        assert issubclass(getattr(errors, name), errors.AscensionError), name


def test_the_architecture_notes_list_every_module():
    notes = NOTES.read_text()
    missing = [str(path.relative_to(PACKAGE)) for path in modules()
               if path.name != "__init__.py" and str(path.relative_to(PACKAGE)) not in notes]
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
