"""
What a person reads after a run: Markdown tables, JSON summaries and PNG plots, for eval.py, schedule.py
and the embedded demo. Every file is written to a temporary name and renamed, so a kill or a failure
leaves the previous report or the new one, never half of one.

    write_json(path, obj); write_text(path, text)           # atomic
    md_table(["model", "accuracy (%)"], [["base", "56.8"]])  # a Markdown table
    schedule_report(state, out)                              # schedule.json's state -> report.md/.json + plots
    plot_acc_vs_length({"label": [(mean_length, accuracy), ...]}, path)

An evaluation result (`eval.evaluate`) is a dict with accuracy, mean_length, truncation_rate,
forced_rate and keywords ({keyword: {per_completion, per_1k_tokens}}); `headline` picks what a summary
quotes. Plots use matplotlib's file-only backend.
"""

import json
import os
import subprocess
from pathlib import Path


def write_text(path, text: str):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1))


def commit() -> str:
    """The short git commit of this code, or "unknown" outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def headline(res: dict) -> dict:
    """The numbers a summary quotes from an evaluation result."""
    return {"accuracy": res["accuracy"], "mean_length": res["mean_length"],
            "wait_per_completion": res["keywords"]["Wait"]["per_completion"]}


def md_table(head: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def results_table(runs: list[dict]) -> str:
    """One row per (checkpoint, benchmark, budget) evaluation run."""
    return md_table(["checkpoint", "benchmark", "budget", "k", "pass@1 (%)", "mean len", "median len",
                     "truncated (%)", "Wait/compl", "perplexity"],
                    [[r["ckpt"], r["data"], r.get("budget") or "-", r.get("samples", "-"), pct(r["accuracy"]),
                      f"{r['mean_length']:.0f}", f"{r['median_length']:.0f}", pct(r["truncation_rate"]),
                      f"{r['keywords']['Wait']['per_completion']:.2f}",
                      f"{r['perplexity']:.2f}" if "perplexity" in r else "-"] for r in runs])


def keyword_table(runs: list[dict], label: str = "ckpt") -> str:
    """Keywords down, runs across (per completion / per 1k tokens), e.g. before vs after pruning."""
    head = ["keyword"] + [f"{r[label]} {unit}" for r in runs for unit in ("/compl", "/1k tok")]
    kws = list(runs[0]["keywords"]) if runs else []
    return md_table(head, [[kw] + [f"{r['keywords'][kw][k]:.2f}" for r in runs
                                   for k in ("per_completion", "per_1k_tokens")] for kw in kws])


# ---- the schedule ----------------------------------------------------------------------------------------

def stage_rows(state: dict) -> list[dict]:
    """One row per stage (stage 0 = the original model): limit, selected step, and its validation numbers."""
    rows = [{"stage": 0, "limit": None, "step": None, "label": "original", **state["base"]}]
    for st in state["stages"]:
        if st["selected"] is not None:
            name = f"step_{st['selected']['step']:06d}"
            rows.append({"stage": st["stage"], "limit": st["limit"], "step": st["selected"]["step"],
                         "label": f"stage {st['stage']} (L={st['limit']})", **st["evals"][name]})
    return rows


def schedule_summary(state: dict) -> dict:
    """The machine-readable headline: original vs final selection, the budget-forcing points, the stages."""
    rows = stage_rows(state)
    return {"base": headline(state["base"]), "pruned": headline(rows[-1]),
            "budget_forcing": [{"budget": p["budget"], **headline(p)} for p in state["budget_forcing"]],
            "stages": [{"limit": r["limit"], "selected_step": r["step"], **headline(r)} for r in rows[1:]]}


def schedule_report(state: dict, out: Path) -> Path:
    """report.md, report.json (`schedule_summary`), stages.png, training.png and acc_vs_length.png in `out`."""
    out = Path(out)
    rows, cfg = stage_rows(state), state["config"]
    md = ["# ThinkPrune schedule", "",
          f"Validation: `{cfg['val_data']}`, {cfg['val_samples']} samples per problem, temperature "
          f"{cfg['temperature']}, top-p {cfg['top_p']}, up to {cfg['val_max_new_tokens']} new tokens, no length "
          f"prompt. Selection: pass@1 >= (1 - {cfg['tolerance']}) x original, then shortest.", "",
          md_table(["stage", "limit", "selected step", "pass@1 (%)", "mean len", "truncated (%)", "Wait /compl",
                    "Wait /1k tok"],
                   [[r["stage"], r["limit"] or "-", r["step"] if r["step"] is not None else "original",
                     pct(r["accuracy"]), f"{r['mean_length']:.1f}", pct(r["truncation_rate"]),
                     f"{r['keywords']['Wait']['per_completion']:.2f}", f"{r['keywords']['Wait']['per_1k_tokens']:.2f}"]
                    for r in rows]),
          "", "## Hesitation keywords, original and each stage's selection", "", keyword_table(rows, "label")]
    for st in state["stages"]:
        chosen = st["selected"]["path"] if st["selected"] is not None else None
        md += ["", f"## Stage {st['stage']}: limit {st['limit']}", "", f"Started from `{st['start']}`.", "",
               md_table(["step", "pass@1 (%)", "mean len", "truncated (%)", "Wait /compl", "selected"],
                        [[int(name.removeprefix("step_")), pct(e["accuracy"]), f"{e['mean_length']:.1f}",
                          pct(e["truncation_rate"]), f"{e['keywords']['Wait']['per_completion']:.2f}",
                          "**yes**" if e["path"] == chosen else ""] for name, e in sorted(st["evals"].items())])]
        if st["reason"]:
            md += ["", f"Why: {st['reason']}."]
    if state["budget_forcing"]:
        md += ["", "## Budget forcing (original model)", "",
               md_table(["B", "pass@1 (%)", "mean len", "forced (%)"],
                        [[p["budget"], pct(p["accuracy"]), f"{p['mean_length']:.1f}", pct(p["forced_rate"])]
                         for p in state["budget_forcing"]])]
    md += ["", "![accuracy and length per stage](stages.png)", "", "![training curves](training.png)", "",
           "![accuracy vs length](acc_vs_length.png)", ""]
    plot_stages(rows, out / "stages.png")
    plot_training([Path(st["out_dir"]) for st in state["stages"]], out / "training.png")
    series = {"ThinkPrune (selected per stage)": [(r["mean_length"], r["accuracy"]) for r in rows],
              "all validated checkpoints": [(e["mean_length"], e["accuracy"]) for st in state["stages"]
                                            for e in st["evals"].values()],
              "budget forcing": [(p["mean_length"], p["accuracy"]) for p in state["budget_forcing"]]}
    plot_acc_vs_length(series, out / "acc_vs_length.png")
    write_json(out / "report.json", schedule_summary(state))
    write_text(out / "report.md", "\n".join(md))
    return out / "report.md"


# ---- the embedded demo ------------------------------------------------------------------------------------

def demo_report(cfg, state, base, pruned, direct, forcing, seconds: dict, wall: float) -> dict:
    """report.json, report.md and acc_vs_length.png of demo.py in cfg.out_dir; returns the JSON."""
    out = Path(cfg.out_dir)
    stages = [{"limit": st["limit"], "selected_step": st["selected"]["step"],
               **headline(st["evals"][f"step_{st['selected']['step']:06d}"])} for st in state["stages"]]
    summary = {
        "base": headline(base), "pruned": headline(pruned), "direct": headline(direct),
        "budget_forcing": [{"budget": f["budget"], **headline(f)} for f in forcing],
        "stages": stages,  # validation numbers of each stage's selected checkpoint
        "seconds": round(sum(seconds.values()), 1), "seconds_by_part": seconds, "seconds_this_run": round(wall, 1),
        "commit": commit(),
        "test": {"problems": base["n_problems"], "samples": cfg.test_samples, "temperature": cfg.temperature,
                 "top_p": cfg.top_p},
    }
    plot_acc_vs_length({
        "base": [(base["mean_length"], base["accuracy"])],
        "ThinkPrune (final)": [(pruned["mean_length"], pruned["accuracy"])],
        "direct pruning": [(direct["mean_length"], direct["accuracy"])],
        "budget forcing (base)": [(f["mean_length"], f["accuracy"]) for f in forcing],
    }, out / "acc_vs_length.png")
    rows = [("base", base), ("ThinkPrune", pruned), ("direct pruning", direct)] + \
        [(f"budget forcing B={f['budget']}", f) for f in forcing]
    table = md_table(["model", "accuracy (%)", "mean length", "truncated (%)", "forced (%)", "Wait / completion"],
                     [[name, pct(r["accuracy"]), f"{r['mean_length']:.1f}", pct(r["truncation_rate"]),
                       pct(r["forced_rate"]), f"{r['keywords']['Wait']['per_completion']:.2f}"] for name, r in rows])
    md = [f"# ThinkPrune, embedded run (commit {summary['commit']}, {summary['seconds']:.0f} s)", "",
          f"Test set: {base['n_problems']} held-out problems x {cfg.test_samples} sample(s), temperature "
          f"{cfg.temperature}, top-p {cfg.top_p}, no length prompt.", "", table, "",
          "ThinkPrune stages (validation numbers of the selected checkpoint):", "",
          md_table(["stage", "limit", "selected step", "accuracy (%)", "mean length"],
                   [[i, s["limit"], s["selected_step"], pct(s["accuracy"]), f"{s['mean_length']:.1f}"]
                    for i, s in enumerate(stages, 1)]), "",
          "![accuracy vs length](acc_vs_length.png)", "",
          "Per stage: [thinkprune/report.md](thinkprune/report.md), ![training curves](thinkprune/training.png)", ""]
    write_json(out / "report.json", summary)
    write_text(out / "report.md", "\n".join(md))
    print("\n".join(md[:5]), flush=True)
    return summary


# ---- the sweep --------------------------------------------------------------------------------------------

def sweep_report(summary: dict, out: Path):
    """report.json (the summary), report.md, pareto.png and by_difficulty.png of sweep.py in `out`."""
    out, runs = Path(out), summary["runs"]
    groups = {}  # (limit, method) -> its runs, one per seed
    for r in runs:
        groups.setdefault((r["limit"], r["method"]), []).append(r)

    def mean_sd(rs, key):
        xs = [r[key] for r in rs]
        m = sum(xs) / len(xs)
        return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0

    rows = []
    for (L, m), rs in sorted(groups.items()):
        (a, sa), (n, sn), (w, _) = mean_sd(rs, "accuracy"), mean_sd(rs, "mean_length"), mean_sd(rs, "wait_per_completion")
        rows.append([L, m, len(rs), f"{100 * a:.1f} ± {100 * sa:.1f}", f"{n:.1f} ± {sn:.1f}", f"{w:.2f}"])
    base = summary["base"]
    md = [f"# Length-control sweep (commit {summary['commit']}, {summary['seconds']:.0f} s)", "",
          f"Base: {pct(base['accuracy'])}% at {base['mean_length']:.1f} tokens. Test accuracy and mean length: "
          "mean ± standard deviation over seeds.", "",
          md_table(["limit", "method", "seeds", "accuracy (%)", "mean length", "Wait / completion"], rows), "",
          "## Budget forcing of the base", "",
          md_table(["B", "accuracy (%)", "mean length"],
                   [[p["budget"], pct(p["accuracy"]), f"{p['mean_length']:.1f}"] for p in summary["budget_forcing"]]),
          "", "## Claims", "",
          md_table(["claim", "held", "detail"], [[c["claim"], "yes" if c["held"] else "no", c["detail"]]
                                                 for c in summary["claims"]]),
          "", "![accuracy vs length](pareto.png)", "", "![accuracy by difficulty](by_difficulty.png)", ""]
    plot_pareto(groups, base, summary["budget_forcing"], out / "pareto.png")
    plot_by_difficulty(groups, base, out / "by_difficulty.png")
    write_json(out / "report.json", summary)
    write_text(out / "report.md", "\n".join(md))


def plot_pareto(groups: dict, base: dict, forcing: list[dict], path: Path):
    """Test accuracy against mean length: a point per (method, limit) with seed standard deviations as
    error bars, the base, and the budget-forcing curve of the base."""
    fig, ax = _plt().subplots(figsize=(7, 5))
    methods = sorted({m for _, m in groups})
    markers = "osD^v<>"
    limits = sorted({L for L, _ in groups})
    for (L, m), rs in sorted(groups.items()):
        xs, ys = [r["mean_length"] for r in rs], [100 * r["accuracy"] for r in rs]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sx = (sum((x - mx) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
        sy = (sum((y - my) ** 2 for y in ys) / (len(ys) - 1)) ** 0.5 if len(ys) > 1 else 0.0
        ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt=markers[limits.index(L) % len(markers)],
                    color=f"C{methods.index(m)}", capsize=3, label=f"{m} (L={L})")
    ax.plot([base["mean_length"]], [100 * base["accuracy"]], "k*", ms=12, label="base")
    if forcing:
        ax.plot([p["mean_length"] for p in forcing], [100 * p["accuracy"] for p in forcing], "kx--", label="budget forcing (base)")
    ax.set_xlabel("mean length (tokens)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def plot_by_difficulty(groups: dict, base: dict, path: Path):
    """Accuracy by difficulty for each method (mean over seeds), one panel per final limit, and the base."""
    limits = sorted({L for L, _ in groups})
    fig, axes = _plt().subplots(1, len(limits), figsize=(5 * len(limits), 4), squeeze=False)
    for ax, L in zip(axes[0], limits):
        ks = sorted(base["by_difficulty"], key=int)
        ax.plot([int(k) for k in ks], [100 * base["by_difficulty"][k] for k in ks], "k*--", label="base")
        for i, m in enumerate(sorted({m for L2, m in groups if L2 == L})):
            rs = groups[(L, m)]
            ax.plot([int(k) for k in ks], [100 * sum(r["by_difficulty"].get(k, 0) for r in rs) / len(rs) for k in ks],
                    "o-", color=f"C{i}", label=m)
        ax.set_title(f"final limit {L}")
        ax.set_xlabel("difficulty (steps)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    _save(fig, path)


# ---- plots ------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path):
    plt = _plt()
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def plot_stages(rows: list[dict], path: Path):
    """Validation accuracy and mean length of the original model and each stage's selection."""
    fig, (a, b) = _plt().subplots(1, 2, figsize=(9, 3.5))
    x = [r["stage"] for r in rows]
    a.plot(x, [100 * r["accuracy"] for r in rows], "o-")
    a.set_ylabel("validation pass@1 (%)")
    b.plot(x, [r["mean_length"] for r in rows], "o-", color="C1")
    b.set_ylabel("mean length (tokens)")
    for ax in (a, b):
        ax.set_xticks(x, ["orig"] + [f"L={r['limit']}" for r in rows[1:]])
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_training(stage_dirs: list[Path], path: Path):
    """Reward, mean length and truncation rate over the stages' steps, end to end."""
    fig, axes = _plt().subplots(1, 3, figsize=(12, 3.5))
    offset = 0
    for t, d in enumerate(stage_dirs, 1):
        f = d / "metrics.jsonl"
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
        if not rows:
            continue
        steps = [offset + r["step"] for r in rows]
        for ax, key in zip(axes, ("reward", "mean_len", "truncation_rate")):
            ax.plot(steps, [r[key] for r in rows], label=f"stage {t} (L={rows[0]['limit']})", color=f"C{t - 1}")
            ax.axvline(offset, color="grey", lw=0.5)
        offset = steps[-1]
    for ax, title in zip(axes, ("reward", "mean length (tokens)", "truncation rate")):
        ax.set_title(title)
        ax.set_xlabel("step (all stages)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _save(fig, path)


def plot_acc_vs_length(series: dict, path: Path):
    """series: {label: [(mean_length, accuracy), ...]}; a line for a ThinkPrune path, crosses for budget
    forcing, points otherwise."""
    fig, ax = _plt().subplots(figsize=(6, 4.5))
    for i, (label, pts) in enumerate(series.items()):
        if not pts:
            continue
        xs, ys = zip(*pts)
        style = "o-" if label.startswith("ThinkPrune") else ("x--" if "budget" in label else "o")
        kw = {"alpha": 0.35, "ms": 4} if label.startswith("all ") else {}
        ax.plot(xs, [100 * y for y in ys], style, label=label, color=f"C{i}", **kw)
    ax.set_xlabel("mean length (tokens)")
    ax.set_ylabel("pass@1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
