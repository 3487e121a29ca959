"""soulray: train and serve empathetic-support language models on Ray."""

__version__ = "0.1.0"
