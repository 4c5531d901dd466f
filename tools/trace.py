"""Look at a recorded m2cache trace: print its summary line, and write Chrome JSON, PNG or HTML.

    python tools/trace.py TRACE [--json OUT] [--png OUT] [--html OUT]

The JSON opens in https://ui.perfetto.dev or chrome://tracing. The conversion lives in
`m2cache.trace.export`; this script only parses arguments and reports errors.
"""
from __future__ import annotations

import argparse
import json
import sys

from m2cache.errors import M2CacheError
from m2cache.trace.recorder import TraceRecorder
from m2cache.trace.export import summary_line, to_chrome, to_html, to_png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="a trace file written by TraceRecorder.save")
    parser.add_argument("--json", metavar="OUT", help="write Chrome trace-event JSON (Perfetto)")
    parser.add_argument("--png", metavar="OUT", help="write a timeline picture")
    parser.add_argument("--html", metavar="OUT", help="write a self-contained zoomable page")
    args = parser.parse_args(argv)
    try:
        recorder = TraceRecorder.load(args.trace)
    except FileNotFoundError:
        print(f"trace.py: no such file: {args.trace}", file=sys.stderr)
        return 2
    except (M2CacheError, OSError) as error:
        print(f"trace.py: {error}", file=sys.stderr)
        return 2
    spans, metadata = recorder.spans(), recorder.metadata
    print(summary_line(spans, metadata, recorder.dropped))
    try:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as file:
                json.dump(to_chrome(spans, metadata), file, separators=(",", ":"))
        if args.png:
            to_png(spans, metadata, args.png, recorder.dropped)
        if args.html:
            to_html(spans, metadata, args.html, recorder.dropped)
    except OSError as error:
        print(f"trace.py: cannot write output: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
