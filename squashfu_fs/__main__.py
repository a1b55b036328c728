"""``python -m squashfu_fs``: the same command line as ``squashfu``."""

from squashfu_fs.cli import run

run()
