"""``m2cache trace TRACE``: a recorded trace's summary line, and its Chrome JSON, PNG or HTML.

    m2cache trace TRACE [--json OUT] [--png OUT] [--html OUT] [--step N] [--screenshot OUT]

The JSON opens in https://ui.perfetto.dev or chrome://tracing. ``--step N`` zooms the PNG to step N
(the HTML page does so at ``OUT.html#step=N``). ``--screenshot OUT.png`` (with ``--html``) renders the page
in headless Chromium, at ``--step`` if given, and exits 1 if the page reports an error. The conversion
lives in ``m2cache.trace.export``; this command only parses arguments and reports errors.
"""
from __future__ import annotations

import argparse
import json
import sys

from m2cache.errors import M2CacheError
from m2cache.trace.browser import check_page
from m2cache.trace.export import summary_line, to_chrome, to_html, to_png
from m2cache.trace.recorder import TraceRecorder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="a trace file (generate --trace FILE, EngineConfig(trace=FILE))")
    parser.add_argument("--json", metavar="OUT", help="write Chrome trace-event JSON (Perfetto)")
    parser.add_argument("--png", metavar="OUT", help="write a timeline picture")
    parser.add_argument("--html", metavar="OUT", help="write a self-contained zoomable page")
    parser.add_argument("--step", type=int, help="zoom the PNG and the screenshot to this step")
    parser.add_argument("--screenshot", metavar="OUT", help="render the --html page headless to this PNG")


def run(args, prog: str = "m2cache trace") -> int:
    if args.screenshot and not args.html:
        print(f"{prog}: --screenshot renders the --html page: give --html too", file=sys.stderr)
        return 2
    try:
        recorder = TraceRecorder.load(args.trace)
    except FileNotFoundError:
        print(f"{prog}: no such file: {args.trace}", file=sys.stderr)
        return 2
    except (M2CacheError, OSError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    spans, metadata = recorder.spans(), recorder.metadata
    print(summary_line(spans, metadata, recorder.dropped))
    try:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as file:
                json.dump(to_chrome(spans, metadata), file, separators=(",", ":"))
        if args.png:
            to_png(spans, metadata, args.png, recorder.dropped, step=args.step)
        if args.html:
            to_html(spans, metadata, args.html, recorder.dropped)
            print(f"page: {args.html} (open it in a browser; {args.html}#step=N zooms to step N)")
        if args.screenshot:
            fragment = f"step={args.step}" if args.step is not None else ""
            page = check_page(args.html, fragment, screenshot=args.screenshot)
            print(f"page: {page.state}: {page.text}")
            if page.state != "ok":
                return 1
    except OSError as error:
        print(f"{prog}: cannot write output: {error}", file=sys.stderr)
        return 2
    except M2CacheError as error:  # no such step, no Chromium
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="a recorded trace's summary, and its timeline as Chrome JSON, PNG or HTML")
    add_arguments(p)
    p.set_defaults(func=run)
