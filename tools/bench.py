#!/usr/bin/env python3
"""``m2cache bench`` as a script: ``python tools/bench.py [--store DIR] [--tokens N] ...`` (see --help)."""
import sys

from m2cache.bench.harness import main

if __name__ == "__main__":
    sys.exit(main())
