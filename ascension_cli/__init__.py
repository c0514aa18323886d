"""Ascension: SupCon training, embedding export and retrieval evaluation for image collections.

Importing this package is cheap on purpose (no torch), so ``ascension --help`` answers at once.
"""

__version__ = "0.1.0"
