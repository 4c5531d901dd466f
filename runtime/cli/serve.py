"""``m2cache serve STORE``: the OpenAI-compatible server (see ``m2cache.serve``)."""
from __future__ import annotations

import argparse
import os
import sys

from m2cache.bench.memlimit import UNDER_LIMIT_ENV, ffn_fp16_bytes, rerun_under_limit
from m2cache.cli.engine_args import add_engine_args, engine_config, run_async
from m2cache.errors import ConfigError, require_extra

# imports inside functions: a command imports the store, the engine and the offline tools (torch) when it
# runs; importing this module loads none of them

READY = "m2cache serve: listening on http://{host}:{port}"  # on stderr once it accepts: scripts wait for it
KEY_ENV = "M2CACHE_API_KEY"
ROUTES = ("health", "metrics")


def cmd_serve(args) -> int:
    require_extra("serve", "fastapi", "uvicorn", "prometheus_client", what="m2cache serve")
    from m2cache.storage.reader import Store

    store = Store(args.store)
    key = args.api_key or os.environ.get(KEY_ENV) or None
    if args.memory and not os.environ.get(UNDER_LIMIT_ENV):  # the server itself runs under the limit, as bench's
        if key:  # to the server through its environment, never on a command line others can read (ps)
            os.environ[KEY_ENV] = key
        fp16 = int(store.manifest["resident"]["size"]) + ffn_fp16_bytes(store)
        rc = rerun_under_limit(_without_key(args.argv), args.memory, fp16, forward_signals=True)
        if rc >= 0:
            return rc
    from m2cache.serve.server import serve  # the serve extra (found above) and the engine

    config = engine_config(args, store).replace(admit_timeout=args.queue_timeout or None)

    def ready(host: str, port: int) -> None:
        print(READY.format(host=host, port=port), file=sys.stderr, flush=True)

    run_async(serve(args.store, config, host=args.host, port=args.port, max_requests=args.max_requests,
                    model_name=args.model_name, on_ready=ready, api_key=key, public=_public(args.public)))
    return 0


def _public(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip() and v.strip() != "none")
    bad = [n for n in names if n not in ROUTES]
    if bad:
        raise ConfigError(f"--public {value!r}: {', '.join(bad)} unknown; name {' and/or '.join(ROUTES)}, or none")
    return names


def _without_key(argv: list[str]) -> list[str]:
    """The command line without ``--api-key KEY`` (or ``--api-key=KEY``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--api-key":
            skip = True
        elif not arg.startswith("--api-key="):
            out.append(arg)
    return out


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions, streaming)")
    p.add_argument("store")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when ready)")
    p.add_argument("--max-requests", type=int, default=64,
                   help="requests running or waiting at once; more get 429 with Retry-After")
    p.add_argument("--queue-timeout", type=float, default=30.0,
                   help="seconds a request may wait for room in the KV cache before a 503 with Retry-After "
                        "(0: as long as it takes)")
    p.add_argument("--api-key", help=f"clients must send 'Authorization: Bearer KEY' (or set {KEY_ENV}, which "
                                     "keeps the key off the command line)")
    p.add_argument("--public", default=",".join(ROUTES),
                   help="with a key, the routes that stay open: health, metrics, both (the default) or none")
    p.add_argument("--model-name", help="the model id clients see (default: the store's folder name)")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)
