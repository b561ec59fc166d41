"""``python -m corruptions SOURCE OUT [...]``: the same as ``tta-norm corrupt`` (:mod:`corruptions.cli`)."""

import sys

from .cli import main

sys.exit(main())
