"""``python -m propscope``: the ``propscope`` command line."""

from propscope.cli import app

app(prog_name="propscope")
