"""Catalogues of known items: their layout on disk, building, changing and searching them."""
