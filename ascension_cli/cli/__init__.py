"""The ``ascension`` command line: Typer commands (``app``), their options, the console."""
