"""tooltune: teach language models to call tools, end to end, on Ray."""

__version__ = "0.1.0"
