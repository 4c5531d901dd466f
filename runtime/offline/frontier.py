"""The frontier of ``m2cache eval``: which policies it measures (selection methods across byte budgets),
and how its rows read (a table, a plot of perplexity against bytes fetched per token). The measuring
itself is :mod:`m2cache.offline.evaluate`'s."""
from __future__ import annotations

from pathlib import Path

from m2cache.errors import ConfigError, require_extra

METHODS = ("predictor", "gate", "gate-split", "oracle")
# (FP16, INT8, INT4) shares from every neuron kept down to half of them, most bytes first
FRONTIER_SHARES: tuple[tuple[float, float, float], ...] = (
    (0.1, 0.2, 0.7), (0.0, 0.3, 0.7), (0.1, 0.2, 0.5), (0.05, 0.15, 0.6), (0.05, 0.15, 0.5),
    (0.0, 0.2, 0.55), (0.05, 0.1, 0.45), (0.0, 0.1, 0.5),
)


def frontier_policies(methods: list[str] | tuple[str, ...] = METHODS,
                      shares: tuple[tuple[float, float, float], ...] = FRONTIER_SHARES) -> list[str]:
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown selection method(s) {unknown}; expected some of {', '.join(METHODS)}")
    return [f"{m}:{a:g},{b:g},{c:g}" for m in methods for a, b, c in shares]


def plot_frontier(rows: list[dict], path: str | Path) -> Path:
    """Perplexity over dense against FFN bytes fetched per token, one panel per text, one line per method."""
    require_extra("bench", "matplotlib", what="the frontier plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(dict.fromkeys(r.get("text", "held-out") for r in rows))
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.5), squeeze=False)
    for ax, text in zip(axes[0], texts):
        mine = [r for r in rows if r.get("text", "held-out") == text]
        for method in dict.fromkeys(r["policy"].split(":")[0] for r in mine):
            pts = sorted((r["ffn_bytes_ratio"], 100 * r["ppl_delta"], r["top1"]) for r in mine
                         if r["policy"].split(":")[0] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.axhline(3.0, color="grey", lw=0.8, ls="--")
        ax.axvline(0.30, color="grey", lw=0.8, ls=":")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("FFN bytes fetched per token / dense FP16")
        ax.set_ylabel("perplexity over dense FP32 (%)")
        ax.set_title(f"held-out text: {text}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def format_table(rows: list[dict]) -> str:
    text = any("text" in r for r in rows)
    head = (f"{'text':<10} " if text else "") + (
        f"{'policy':<24} {'kept':>5} {'bytes':>6} {'select':>6} {'ppl':>8} {'dense':>8} {'Δppl':>7} {'top1':>6} "
        f"{'greedy':>6} {'first':>5} {'recall':>6}")
    lines = [head]
    for r in rows:
        rec = f"{r['recall']:.3f}" if "recall" in r else "-"
        lines.append((f"{r.get('text', ''):<10} " if text else "") + (
            f"{r['policy']:<24} {r['kept']:5.2f} {r['ffn_bytes_ratio']:6.3f} {r['selector_bytes_ratio']:6.3f} "
            f"{r['ppl']:8.3f} {r['dense_ppl']:8.3f} {r['ppl_delta']:+7.1%} {r['top1']:6.3f} "
            + (f"{r['agreement']:6.3f} {r['greedy_median']:5.0f} " if r.get("agreement") is not None else
               f"{'-':>6} {'-':>5} ") + f"{rec:>6}"))
    lines.append("bytes: FFN bytes fetched per token / dense FP16; select: bytes the selection keeps resident / all "
                 "FFN FP16 bytes; greedy: share of the greedy tokens equal to dense; first: median tokens before the "
                 "first difference")
    return "\n".join(lines)
