"""``m2cache serve STORE``: the OpenAI-compatible server (see ``m2cache.serve``)."""
from __future__ import annotations

import argparse
import sys

from m2cache.errors import require_extra

READY = "m2cache serve: listening on http://{host}:{port}"  # on stderr once it accepts: scripts wait for it


def cmd_serve(args) -> int:
    require_extra("serve", "fastapi", "uvicorn", "prometheus_client", what="m2cache serve")
    from m2cache.cli.main import engine_config, run_async
    from m2cache.serve.server import serve
    from m2cache.storage.reader import Store

    config = engine_config(args, Store(args.store))

    def ready(host: str, port: int) -> None:
        print(READY.format(host=host, port=port), file=sys.stderr, flush=True)

    run_async(serve(args.store, config, host=args.host, port=args.port, max_requests=args.max_requests,
                    model_name=args.model_name, on_ready=ready))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from m2cache.cli.main import add_engine_args

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions, streaming)")
    p.add_argument("store")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when ready)")
    p.add_argument("--max-requests", type=int, default=64,
                   help="requests running or waiting at once; more get 429 with Retry-After")
    p.add_argument("--model-name", help="the model id clients see (default: the store's folder name)")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)
