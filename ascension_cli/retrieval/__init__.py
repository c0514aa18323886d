"""Nearest-neighbour search and retrieval metrics."""
