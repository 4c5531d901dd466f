"""``python -m m2cache.bench`` is ``m2cache bench``."""
from __future__ import annotations

import sys

from m2cache.bench.harness import main

sys.exit(main())
