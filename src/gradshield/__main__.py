"""``python -m gradshield`` is the ``gradshield`` command."""

import sys

from gradshield.cli import main

sys.exit(main())
