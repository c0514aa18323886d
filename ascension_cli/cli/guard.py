"""The one place where an error becomes what a command-line user sees: one line on stderr (its
options spelled as flags) and a non-zero exit code, never a traceback."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import typer
from rich.markup import escape

from ascension_cli.cli.console import err_console, shown
from ascension_cli.config import option_name
from ascension_cli.errors import WRITE_REFUSED_ERRNOS, AscensionError, Interrupted


def say_error(exc: AscensionError) -> None:
    # Escaped: "[mlflow]" or a file name is not rich markup, nor a control character.
    err_console.print(f"[bold red]error:[/] {escape(shown(exc.render(option_name)))}",
                      soft_wrap=True, highlight=False)


@contextmanager
def user_errors():
    """Turn a user-caused error into one line on stderr and a non-zero exit."""
    try:
        yield
    except Interrupted as exc:
        err_console.print(escape(shown(exc.render(option_name))), soft_wrap=True,
                          highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except AscensionError as exc:
        say_error(exc)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted; files written before stay as they were", soft_wrap=True)
        raise typer.Exit(130) from None
    except OSError as exc:
        # The machine's limits, not a bug: say which file and why. Writes are atomic, so the
        # previous checkpoint or vectors file is intact.
        if exc.errno not in WRITE_REFUSED_ERRNOS:
            raise
        where = f" {escape(shown(exc.filename))}" if exc.filename else ""
        err_console.print(
            f"[bold red]error:[/] cannot write{where}: {exc.strerror or exc}; files written "
            "before are intact", soft_wrap=True, highlight=False,
        )
        raise typer.Exit(5) from None
    except RuntimeError as exc:
        torch = sys.modules.get("torch")  # imported by the work, if it got that far
        if torch is None or not isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        err_console.print(
            "[bold red]error:[/] the GPU ran out of memory: lower --batch-size (with gradient "
            "caching --target-batch, the contrastive batch, can stay as it is)",
            soft_wrap=True,
        )
        raise typer.Exit(4) from None
