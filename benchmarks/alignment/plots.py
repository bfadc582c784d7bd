"""Gold reward against cost (target forward passes, wall time), with the Pareto front."""

from __future__ import annotations

from pathlib import Path

from .statistics import pareto


def plot(rows, path: Path, xkey: str, xlabel: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    colors = {"vanilla": "black", "draft": "tab:gray", "sd": "tab:brown", "sss": "tab:blue", "sss-paper": "tab:cyan",
              "sss-sir": "tab:pink",
              "bon": "tab:red", "spec-rejection": "tab:orange", "soft-bon": "tab:green"}
    markers = {"vanilla": "s", "draft": "v", "sd": "D", "sss": "o", "sss-paper": "P", "sss-sir": "h", "bon": "^",
               "spec-rejection": "X", "soft-bon": "*"}
    pts = [(r[xkey], r["gold_mean"]) for r in rows]
    for kind in colors:
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        sel = sorted(sel, key=lambda r: r[xkey])
        xs, ys = [r[xkey] for r in sel], [r["gold_mean"] for r in sel]
        err = [[r["gold_mean"] - r["gold_ci95_lo"] for r in sel], [r["gold_ci95_hi"] - r["gold_mean"] for r in sel]]
        ax.errorbar(xs, ys, yerr=err, fmt=markers[kind] + ("-" if kind == "bon" else ""), color=colors[kind],
                    label=kind, capsize=2, alpha=0.85, markersize=7)
        for r in sel:
            short = r["method"].replace(kind, "").strip()
            if short:
                ax.annotate(short, (r[xkey], r["gold_mean"]), fontsize=6.5, xytext=(4, 3), textcoords="offset points")
    front = pareto(pts)
    fx = [pts[i][0] for i in front]
    fy = [pts[i][1] for i in front]
    ax.step(fx, fy, where="post", color="purple", alpha=0.4, lw=2, label="Pareto front")
    ax.set_xscale("symlog", linthresh=1.0)  # the draft alone runs the target 0 times
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean gold reward (P(positive), MiniLM head)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
