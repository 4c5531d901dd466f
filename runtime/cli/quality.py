"""The quality commands: ``train-predictor``, ``policies``, ``tune`` and ``eval``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from m2cache.engine.config import format_size
from m2cache.offline.frontier import format_table, frontier_policies, plot_frontier
from m2cache.offline.progress import ProgressBar

# imports inside functions: a command imports the store, the engine and the offline tools (torch) when it
# runs; importing this module loads none of them


def _read_text(path: str | None) -> str | None:
    return Path(path).read_text(encoding="utf-8") if path else None


def cmd_train_predictor(args) -> int:
    from m2cache.offline.train import train_predictors

    report = train_predictors(args.store, _read_text(args.text), rank=args.rank, tokens=args.tokens,
                              progress=not args.quiet, epochs=args.epochs)
    print(report.summary())
    return 0


def cmd_policies(args) -> int:
    from m2cache.engine.policies import default_policy_name, policy_figures

    from m2cache.storage.reader import Store

    store = Store(args.store)
    default = default_policy_name(store)
    rows = policy_figures(store)
    if args.json:
        json.dump([r | {"default": r["name"] == default} for r in rows], sys.stdout, indent=2)
        print()
        return 0
    dense = store.layer_bytes("fp16") * store.config.num_layers
    print(f"{'policy':<16} {'fp16':>5} {'int8':>5} {'int4':>5} {'fetched a token':>17} {'resident':>10}  "
          f"{'quality':<14} kind")
    for r in rows:
        quality = "exact" if r["name"] == "dense-fp16" else _quality(r.get("quality"))
        kind = r["kind"] + (" per-layer" if r["per_layer"] else "") + ("  (default)" if r["name"] == default else "")
        s = r["shares"]
        print(f"{r['name']:<16} {s['fp16']:5.2f} {s['int8']:5.2f} {s['int4']:5.2f} {_mb(r['fetched']):>9} "
              f"{r['fetched'] / dense:6.3f} {_mb(r['resident']):>10}  {quality:<14} {kind}")
    print(f"fetched a token: the FFN bytes a decode token computes from, every layer, and their share of dense "
          f"FP16's {_mb(dense)}")
    print("resident: what the policy keeps beside the tiers (a gate policy's INT4 gate rows and norms, the "
          "predictors)")
    print("quality: perplexity against the dense FP32 model on held-out text, measured when the store was built "
          "(`m2cache eval STORE --policy NAME` measures more)")
    if store.split:
        print("a split store of format version 2 (up/down fetched, INT4 gate rows resident): gate:FP16,INT8,INT4 "
              "(ad hoc) runs too")
    else:
        print("also: oracle:FP16,INT8,INT4 (exact contributions, for measuring), predictor:FP16,INT8,INT4 and "
              "gate:FP16,INT8,INT4 (ad hoc)")
    if store.version < 3 and not store.split:
        print(f"format version {store.version}: its gate policies fetch the gate rows too; `m2cache upgrade "
              f"{store.path}` lays it out so that they fetch up and down only")
    return 0


def _mb(n: float) -> str:
    return format_size(n) if n else "0"


def _quality(q: dict | None) -> str:
    return "-" if not q else f"ppl {q['ppl_delta']:+.1%}"


def cmd_tune(args) -> int:
    from m2cache.offline.tune import tune

    report = tune(args.store, args.bytes_per_token, name=args.name, text=_read_text(args.text),
                  tokens=args.tokens, progress=not args.quiet, set_default=not args.no_default,
                  per_layer=args.per_layer, kind=args.kind, objective=args.objective)
    print(report.summary())
    return 0


def cmd_eval(args) -> int:
    from m2cache.engine.policies import default_policy_name, parse_shares
    from m2cache.offline.evaluate import evaluate_texts
    from m2cache.storage.reader import SPLIT, Store

    if args.frontier:
        shares = tuple(parse_shares("x:" + spec).astuple() for spec in args.shares.split("/")) if args.shares else None
        # on a store that keeps its gate rows apart the gate policies run as gate-split measures them
        methods = args.methods or ("predictor,gate,oracle" if SPLIT in Store(args.store).views
                                   else "predictor,gate,gate-split,oracle")
        policies = frontier_policies(methods.split(","), *([shares] if shares else [])) + (args.policy or [])
    else:
        policies = args.policy or ["dense-fp16", default_policy_name(Store(args.store))]
    # the pydoc prose's held-out tail (with --frontier, or without --text), and every --text (its last 20%)
    texts: dict[str, str | None] = {"pydoc": None} if args.frontier or not args.text else {}
    for path in args.text or []:
        texts[Path(path).name] = _read_text(path)
    bar = None if args.quiet else ProgressBar("eval", len(policies) * len(texts))
    rows = evaluate_texts(args.store, policies, texts, tokens=args.tokens, greedy_tokens=args.greedy_tokens,
                          resident=args.resident, progress=bar)
    if args.plot:
        print(f"plot: {plot_frontier(rows, args.plot)}", file=sys.stderr)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        print(format_table(rows))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from m2cache.offline.train import DEFAULT_RANK, DEFAULT_TOKENS

    p = subparsers.add_parser("train-predictor", help="train the per-layer neuron predictors of a store")
    p.add_argument("store")
    p.add_argument("--text", help="calibration text file (default: CPython's pydoc_data prose)")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help=f"predictor hidden width r (default {DEFAULT_RANK})")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens")
    p.add_argument("--epochs", type=int, default=2, help="gradient epochs after the closed-form start")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_predictor)

    p = subparsers.add_parser("policies", help="list a store's precision policies: shares, bytes fetched a token, "
                                               "bytes kept resident, quality")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per policy (bytes exact)")
    p.set_defaults(func=cmd_policies)

    p = subparsers.add_parser("tune", help="search precision shares under a bytes-per-token budget")
    p.add_argument("store")
    p.add_argument("--bytes-per-token", type=float, required=True,
                   help="budget as a ratio of dense FP16 FFN bytes per token, e.g. 0.4")
    p.add_argument("--name", help="policy name (default tuned-<percent>)")
    p.add_argument("--text", help="calibration text file (default: CPython's pydoc_data prose)")
    p.add_argument("--tokens", type=int, default=1024, help="calibration tokens per candidate")
    p.add_argument("--no-default", action="store_true", help="do not make it the store's default policy")
    p.add_argument("--per-layer", action="store_true",
                   help="then each layer's own shares at the same bytes (INT8/INT4 exchanged between layers)")
    p.add_argument("--kind", choices=("predictor", "gate"), default="predictor",
                   help="what ranks the neurons: the trained predictors, or the resident INT4 gate rows")
    p.add_argument("--objective", choices=("ppl", "entropy"), default="ppl",
                   help="minimised on the calibration text: perplexity, or the mean entropy of the next-token "
                        "distribution (the paper's uncertainty score)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tune)

    p = subparsers.add_parser("eval", help="perplexity and greedy agreement of policies vs the dense FP32 model")
    p.add_argument("store")
    p.add_argument("--text", action="append",
                   help="text file; its last 20%% is the held-out part (repeatable; default: pydoc_data prose)")
    p.add_argument("--frontier", action="store_true",
                   help="every selection method of --methods across a range of shares, on the pydoc prose and "
                        "each --text")
    p.add_argument("--methods", default=None,
                   help="the frontier's selection methods (default predictor,gate,oracle; on a store of format 2 "
                        "gate-split too: the gate as format 3 runs it, its gate rows resident)")
    p.add_argument("--shares", help="the frontier's FP16,INT8,INT4 shares, '/'-separated (default: 8 from every "
                                    "neuron kept down to half)")
    p.add_argument("--plot", help="write a PNG of perplexity against bytes fetched per token")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--policy", action="append",
                   help="dense-fp16, oracle:A,B,C, predictor:A,B,C, gate:A,B,C, gate-split:A,B,C or a stored name "
                        "(repeatable; "
                        "default: dense-fp16 and the store's default)")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens for perplexity")
    p.add_argument("--greedy-tokens", type=int, default=64,
                   help="greedy tokens per prompt compared with dense (the slow part: ~1 min a policy at 64)")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per policy")
    p.add_argument("--resident", choices=("full", "int8"), default="full",
                   help="the form of attention, embeddings and LM head the policies run with (the engine's "
                        "--resident); the dense FP32 reference stays full")
    p.set_defaults(func=cmd_eval)
