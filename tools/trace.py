"""``python tools/trace.py TRACE [...]`` from a checkout: the same as ``m2cache trace TRACE [...]``
(``m2cache.cli.trace``), kept for the scripts and notes that call it so."""
from __future__ import annotations

import argparse
import sys

from m2cache.cli.trace import __doc__ as DOC, add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(DOC or "").splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv), prog="trace.py")


if __name__ == "__main__":
    sys.exit(main())
