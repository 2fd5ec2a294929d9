"""``python -m benchmarks.reliability``: run the reliability scenarios (see the package doc)."""

from __future__ import annotations

import sys

from benchmarks.reliability._cli import main

sys.exit(main())
