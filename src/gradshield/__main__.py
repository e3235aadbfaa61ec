"""``python -m gradshield`` is the ``gradshield`` command."""

from gradshield.cli import run

run()
