"""The front end: the `fastformer` command (main.py), `fastformer bench` and `fastformer plot`."""

from fastformer.cli.commands import main, stream_text

__all__ = ["main", "stream_text"]
