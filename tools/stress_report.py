"""Runs the stress scenarios and prints one table: scenario x (requests, completed with the fault-free
tokens, failed with a typed error, cancelled, hung, leaked tasks/threads, budget violations, worst
event-loop lag).

    python tools/stress_report.py            # the 20-layer tiny model (about a minute)
    python tools/stress_report.py --demo     # also the demo model (SmolLM2-135M; minutes)
    python tools/stress_report.py --only transient,cancel-storm --scale 2
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from stress import scenarios as S  # noqa: E402  (tests/stress/scenarios.py)

# per scenario: keyword arguments at scale 1 for the tiny model / the demo model
TINY = {"fault-free": dict(n=8, max_tokens=16), "transient": dict(n=8, max_tokens=16),
        "permanent": dict(n=8, max_tokens=16), "permanent-isolated": dict(n=12, max_tokens=12),
        "corrupt": dict(n=8, max_tokens=16), "stall": dict(n=6, max_tokens=12),
        "cancel-storm": dict(n=16, max_tokens=12), "concurrent": dict(n=32, max_tokens=16),
        "shutdown": dict(n=8, max_tokens=12)}
DEMO = {"fault-free": dict(n=2, max_tokens=6), "transient": dict(n=2, max_tokens=6),
        "permanent": dict(n=2, max_tokens=6), "corrupt": dict(n=2, max_tokens=6),
        "stall": dict(n=2, max_tokens=4), "cancel-storm": dict(n=4, max_tokens=6),
        "concurrent": dict(n=4, max_tokens=6), "shutdown": dict(n=3, max_tokens=6)}


def scaled(kw: dict, scale: float) -> dict:
    return {k: max(1, int(v * scale)) if k == "n" else v for k, v in kw.items()}


async def run(model: S.Model, plan: dict[str, dict], only: set[str] | None, scale: float) -> list[S.Outcome]:
    outcomes = []
    for name, kw in plan.items():
        if only and name not in only:
            continue
        out = await S.SCENARIOS[name](model, **scaled(kw, scale))
        out.scenario = f"{model.name}: {out.scenario}"
        outcomes.append(out)
        print(f"  {out.scenario}: {'clean' if out.clean else 'NOT CLEAN'}; {'; '.join(n for n in out.notes if n)}",
              file=sys.stderr, flush=True)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", action="store_true", help="also run on the demo model (fetched/converted if needed)")
    ap.add_argument("--only", help="comma-separated scenarios: " + ", ".join(S.SCENARIOS))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the number of requests")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    outcomes: list[S.Outcome] = []
    with S.one_torch_thread(), tempfile.TemporaryDirectory() as tmp:
        tiny = S.build_tiny(Path(tmp))
        outcomes += asyncio.run(run(tiny, TINY, only, args.scale))
    if args.demo:
        from m2cache.offline.convert import fetch_demo

        demo = S.load_model("demo", fetch_demo(progress=False))
        outcomes += asyncio.run(run(demo, DEMO, only, args.scale))
    print(S.table(outcomes))
    bad = [o for o in outcomes if not o.clean]
    for o in bad:
        print(f"NOT CLEAN: {o.scenario}: {o.notes} {o.errors}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
