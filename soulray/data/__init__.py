"""Corpus preparation: formats, cleaning, rendering, packing and the Ray Data job."""
