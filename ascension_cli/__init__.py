"""Ascension: SupCon training, embedding export and retrieval evaluation for image collections.

The Python API is ``train_supcon``, ``embed`` and ``evaluate`` (see ``ascension_cli.api``).
Importing this package is cheap on purpose (no torch), so ``ascension --help`` answers at once.
"""

__version__ = "0.1.0"

from ascension_cli.api import embed, evaluate, train_supcon  # noqa: E402

__all__ = ["__version__", "embed", "evaluate", "train_supcon"]
