"""The comparison of strategies: a markdown table and the gain-against-forgetting figure."""

from __future__ import annotations

from pathlib import Path


def render_comparison(comparison: dict) -> str:
    """The comparison as Markdown: a table with the base model's task accuracy, then each strategy's
    differences from it (task, retained abilities, held-out log-likelihood) and notes."""
    base = comparison["base"]
    lines = [f"# Forgetting comparison: {comparison['model']} ({comparison['style']})", "",
             "Differences are trained minus base. Task: held-out new-task accuracy (verifier). Retained: mean of "
             "format following, JSON validity, refusal of harmful requests and 1 - over-refusal. Log-lik: mean "
             "log-probability per token of held-out text (drops mean forgetting).", "",
             "| strategy | rows | task acc. | Δ task | Δ format | Δ JSON | Δ refusal | Δ over-refusal | "
             "Δ retained | Δ log-lik | notes |", "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| base | - | {base['task_accuracy']:.2f} | - | - | - | - | - | - | - | |"]
    for r in comparison["strategies"]:
        d = r["deltas"]
        notes = "; ".join(f"{k}: {v if not isinstance(v, float) else round(v, 3)}" for k, v in r["notes"].items())
        lines.append(f"| {r['strategy']} | {r['train_rows']} | {r['metrics']['task_accuracy']:.2f} | "
                     f"{d['task_accuracy']:+.2f} | {d['format_following']:+.2f} | {d['json_validity']:+.2f} | "
                     f"{d['refusal_rate']:+.2f} | {d['over_refusal_rate']:+.2f} | {r['retained_delta']:+.3f} | "
                     f"{d['heldout_loglik']:+.3f} | {notes} |")
    lines += ["", f"Total time: {comparison['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def plot_forgetting(comparison: dict, path: Path) -> None:
    """Save a scatter plot to `path`: one point per strategy, new-task gain (x) against held-out
    log-likelihood drop (y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in comparison["strategies"]:
        x, y = r["deltas"]["task_accuracy"], -r["deltas"]["heldout_loglik"]
        ax.scatter(x, y, s=60)
        ax.annotate(r["strategy"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.axhline(0, color="#999", lw=0.8)
    ax.axvline(0, color="#999", lw=0.8)
    ax.set_xlabel("new-task gain (accuracy, trained - base)")
    ax.set_ylabel("forgetting (held-out log-lik drop, nats/token)")
    ax.set_title("gain vs forgetting per strategy (lower right is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
