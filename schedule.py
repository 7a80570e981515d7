"""
ThinkPrune's iterative pruning: RL stages under falling length limits, each starting from the
checkpoint selected in the previous one, then a report.

    python schedule.py configs/thinkprune.py                         # the paper's 4000 -> 3000 -> 2000
    torchrun --nproc_per_node 8 schedule.py configs/thinkprune.py    # training and validation on 8 GPUs
    python schedule.py configs/tiny_schedule.py --out_dir=runs/x     # --key=value overrides the file

The flow, in the order `run_schedule` runs it (every result lands in `{out_dir}/schedule.json` as soon
as it exists, written to a temporary file and renamed):
1. Validate the original model on the validation set (pass@1 over `val_samples` samples, no length
   prompt, `eval.evaluate`). Its pass@1 sets the bar for every stage. With `budgets`, the budget-forcing
   baseline of the original model is validated too (points for the accuracy/length plot).
2. For stage t: train with `train.main` (the config's `train` dict, then the stage's dict, then
   model = the previous selection, out_dir = `{out_dir}/stage{t}`, keep_last = 0 since every checkpoint
   is a candidate); validate every saved checkpoint of the stage; `select` one; it is stage t+1's model.
3. Write `{out_dir}/report.md`, `report.json` (`summary`: original vs final, stages, budget forcing) and
   the PNG plots (`write_report`; the plot and summary functions take the state dict, so other drivers,
   such as the embedded demo, can add series like direct pruning).

Selection (`select`, the paper's rule): keep the checkpoints whose pass@1 >= (1 - tolerance) x the
original model's pass@1 (tolerance 0.10), then take the shortest mean length; ties on length go to
the higher pass@1, then the earlier step. If none qualifies, take the most accurate (ties: shorter,
then earlier) and say so. The reason is written next to the choice in schedule.json.

Resume: kill it at any point and run the same command. Finished stages (with a selection) are skipped;
a stage whose training had not finished calls train.main on the same out_dir, which resumes from its
newest complete checkpoint; validations already in schedule.json are not redone. A schedule.json made
with different validation settings, base model or stage definitions is refused rather than mixed in.

Choices: a stage starts from the selected checkpoint's weights with a fresh optimizer, and its KL
reference (train.py's kl_coef) is that stage's starting model; the starting model itself is not a
candidate of its own stage. Every validation samples with the same seed, so checkpoints are compared
on common random numbers. Each stage uses the train seed it is given (so the same problem order from
its start) unless its dict sets another. Under torchrun, train.main tears its process group down at the end, so the
schedule makes a new one before validating. Per-completion validation records go to
`{out_dir}/evals/*.jsonl`.
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import eval as ev
import train
from data import load_problems


@dataclass
class ScheduleConfig:
    model: str = "runs/toy/base"  # the original model (HF dir); stage 1 starts here
    out_dir: str = "runs/schedule"
    train: dict = field(default_factory=dict)  # train.Config overrides shared by all stages
    stages: list = field(default_factory=list)  # per stage, train.Config overrides: limit, steps, anything else
    # validation: the selection rule's numbers
    val_data: str = "aime_val"  # short name (see eval.py) or a JSONL path
    val_n_problems: int = 0  # 0 = all
    val_samples: int = 16
    val_max_new_tokens: int = 32000
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0
    eval_batch: int = 32  # KV-cache slots per generate call during validation (1.5B: ~0.93 GB a row at 32k)
    tolerance: float = 0.10  # keep checkpoints with pass@1 >= (1 - tolerance) x the original's
    budgets: list = field(default_factory=list)  # budget-forcing baseline of the original model at these B
    answer_budget: int = 256  # tokens after the forced cue
    report: bool = True


# what a cached validation depends on: a schedule.json made with other values is refused
VALIDATION_KEYS = ("model", "val_data", "val_n_problems", "val_samples", "val_max_new_tokens", "temperature",
                   "top_p", "seed", "tolerance", "answer_budget")


def load_schedule_config(path: str | None, overrides: list[str]) -> ScheduleConfig:
    """Defaults <- assignments in the file <- `--key=value` (lists and dicts as JSON). Unknown keys,
    and stage/train keys that train.Config does not have, are errors naming the key."""
    cfg = train.load_config(path, overrides, cls=ScheduleConfig)  # train.py's rules: unknown keys are errors
    where = path or "overrides"
    train_types = {f.name: f.type for f in dataclasses.fields(train.Config)}
    for name, d in [("train", cfg.train)] + [(f"stages[{i}]", s) for i, s in enumerate(cfg.stages)]:
        if not isinstance(d, dict):
            raise ValueError(f"{where}: {name} should be a dict of train.Config overrides")
        for key in d:
            if key not in train_types:
                raise ValueError(f"{where}: {name}: unknown train config key {key!r}")
            if key in ("model", "out_dir", "keep_last"):
                raise ValueError(f"{where}: {name}: {key!r} is set by the schedule, not the config")
            d[key] = train.typed(f"{where}: {name}", key, d[key], train_types[key])
    for i, s in enumerate(cfg.stages):
        if "limit" not in s or "steps" not in s:
            raise ValueError(f"{where}: stages[{i}] needs 'limit' and 'steps'")
    return cfg


def select(candidates: list[dict], base_acc: float, tol: float) -> tuple[dict, str]:
    """The paper's rule. candidates: dicts with step, accuracy, mean_length. Returns (choice, reason)."""
    if not candidates:
        raise ValueError("select: no checkpoints to choose from")
    floor = (1 - tol) * base_acc
    # accuracies are fractions k/n: compare with a hair of slack so 0.9 x 2/3 >= 0.6 holds in floats
    ok = [c for c in candidates if c["accuracy"] >= floor - 1e-9]
    if ok:
        best = min(ok, key=lambda c: (c["mean_length"], -c["accuracy"], c["step"]))
        return best, (f"{len(ok)} of {len(candidates)} checkpoints keep pass@1 >= (1 - {tol:g}) x {base_acc:.4f} = "
                      f"{floor:.4f}; step {best['step']} is the shortest of them (mean length "
                      f"{best['mean_length']:.1f}, pass@1 {best['accuracy']:.4f})")
    best = max(candidates, key=lambda c: (c["accuracy"], -c["mean_length"], -c["step"]))
    return best, (f"none of the {len(candidates)} checkpoints keeps pass@1 >= (1 - {tol:g}) x {base_acc:.4f} = "
                  f"{floor:.4f}; fell back to the most accurate, step {best['step']} (pass@1 "
                  f"{best['accuracy']:.4f}, mean length {best['mean_length']:.1f})")


# ---- state -------------------------------------------------------------------------------------------

def save_state(state: dict, out: Path):
    if _rank() == 0:
        ev.write_json(out / "schedule.json", state)


def load_state(cfg: ScheduleConfig, out: Path) -> dict:
    """schedule.json if there is one made with the same settings, else a fresh state."""
    path = out / "schedule.json"
    if not path.is_file():
        return {"config": asdict(cfg), "base": None, "budget_forcing": [], "stages": []}
    state = json.loads(path.read_text())
    old = state["config"]
    for key in VALIDATION_KEYS:
        if old.get(key) != getattr(cfg, key):
            raise ValueError(f"{path}: made with {key}={old.get(key)!r}, now {getattr(cfg, key)!r}; "
                             f"use another out_dir (cached validations would not compare)")
    for t, st in enumerate(state["stages"]):
        now = {**cfg.train, **cfg.stages[t]} if t < len(cfg.stages) else None
        if st["overrides"] != now:
            raise ValueError(f"{path}: stage {t + 1} was run with {st['overrides']}, the config now says {now}")
    state["config"] = asdict(cfg)  # report-only fields (budgets, report) may change
    return state


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


_store, _generation = None, 0  # the rendezvous store, kept across process groups


def _ensure_process_group():
    """Under torchrun, a process group for training and validation. train.main destroys the group when
    it ends, so a new one is made after each stage, each under its own key prefix in one store: a new
    group must not read the keys of the last one (a rank still tearing it down would hang the others)."""
    global _store, _generation
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 or dist.is_initialized():
        return
    if _store is None:
        _store, rank, world = next(dist.rendezvous("env://"))
        _store.set_timeout(dist.constants.default_pg_timeout)
    _generation += 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    train.init_process_group(torch.cuda.is_available(), store=dist.PrefixStore(f"schedule_pg{_generation}", _store),
                             rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


# ---- validation ----------------------------------------------------------------------------------------

def validate(cfg: ScheduleConfig, path: str, name: str, out: Path, budget: int | None = None) -> dict:
    """eval.evaluate of the checkpoint at `path` on the validation set; records to evals/{name}.jsonl."""
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    model, tokenizer = ev.load_model(path, device)
    problems = load_problems(ev.benchmark_path(cfg.val_data))
    problems = problems[:cfg.val_n_problems] if cfg.val_n_problems else problems
    res = ev.evaluate(model, tokenizer, problems, cfg.val_samples, cfg.val_max_new_tokens, cfg.temperature,
                      cfg.top_p, cfg.seed, budget=budget, answer_budget=cfg.answer_budget, max_batch=cfg.eval_batch)
    records = res.pop("records")
    if _rank() == 0:
        (out / "evals").mkdir(exist_ok=True)
        with open(out / "evals" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(asdict(r)) + "\n" for r in records)
        print(f"[schedule] {name}: pass@1 {res['accuracy']:.4f}, mean length {res['mean_length']:.1f}, "
              f"truncated {res['truncation_rate']:.3f} ({res['seconds']:.0f}s)", flush=True)
    del model
    return {"path": str(path), **res}


def stage_checkpoints(stage_dir: Path) -> list[Path]:
    """The stage's complete checkpoints (train.py writes trainer_state.pt last, then renames)."""
    return sorted(p for p in stage_dir.glob("step_*") if (p / "trainer_state.pt").is_file())


def run_schedule(cfg: ScheduleConfig, train_fn=train.main) -> dict:
    """Run (or resume) the whole schedule; returns the state that schedule.json holds."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _ensure_process_group()
    state = load_state(cfg, out)
    t0 = time.time()

    # 1. the original model: the bar every stage is held to, and the budget-forcing baseline
    if state["base"] is None:
        state["base"] = validate(cfg, cfg.model, "base", out)
        save_state(state, out)
    done = {p["budget"] for p in state["budget_forcing"]}
    for B in cfg.budgets:
        if B not in done:
            state["budget_forcing"].append({"budget": B, **validate(cfg, cfg.model, f"base_budget{B}", out, B)})
            save_state(state, out)
    base_acc = state["base"]["accuracy"]

    # 2. the stages
    model = cfg.model
    for t, overrides in enumerate(cfg.stages, 1):
        stage_dir = out / f"stage{t}"
        if len(state["stages"]) < t:
            state["stages"].append({"stage": t, "limit": overrides["limit"], "overrides": {**cfg.train, **overrides},
                                    "start": model, "out_dir": str(stage_dir), "trained": False, "evals": {},
                                    "selected": None, "reason": None})
            save_state(state, out)
        st = state["stages"][t - 1]
        if st["selected"] is not None:
            model = st["selected"]["path"]
            continue
        if not st["trained"]:
            tcfg = dataclasses.replace(train.Config(), **{**cfg.train, **overrides}, model=model,
                                       out_dir=str(stage_dir), keep_last=0)
            train_fn(tcfg)  # resumes from stage_dir's newest checkpoint when there is one
            _ensure_process_group()
            st["trained"] = True
            save_state(state, out)
        for ckpt in stage_checkpoints(stage_dir):
            if ckpt.name not in st["evals"]:
                st["evals"][ckpt.name] = validate(cfg, str(ckpt), f"stage{t}_{ckpt.name}", out)
                save_state(state, out)
        candidates = [{"step": int(name.removeprefix("step_")), "path": e["path"], "accuracy": e["accuracy"],
                       "mean_length": e["mean_length"]} for name, e in sorted(st["evals"].items())]
        st["selected"], st["reason"] = select(candidates, base_acc, cfg.tolerance)
        save_state(state, out)
        if _rank() == 0:
            print(f"[schedule] stage {t} (limit {overrides['limit']}): {st['reason']}", flush=True)
        model = st["selected"]["path"]

    state["seconds_this_run"] = round(time.time() - t0, 1)
    save_state(state, out)
    if cfg.report and _rank() == 0:
        write_report(state, out)
    return state


# ---- report ------------------------------------------------------------------------------------------

def stage_rows(state: dict) -> list[dict]:
    """One row per stage (stage 0 = the original model): limit, selected step, and its validation numbers."""
    rows = [{"stage": 0, "limit": None, "step": None, "label": "original", **state["base"]}]
    for st in state["stages"]:
        if st["selected"] is not None:
            name = f"step_{st['selected']['step']:06d}"
            rows.append({"stage": st["stage"], "limit": st["limit"], "step": st["selected"]["step"],
                         "label": f"stage {st['stage']} (L={st['limit']})", **st["evals"][name]})
    return rows


def summary(state: dict) -> dict:
    """The machine-readable headline: original vs final selection, the budget-forcing points, the stages."""
    rows = stage_rows(state)
    return {"base": ev.headline(state["base"]), "pruned": ev.headline(rows[-1]),
            "budget_forcing": [{"budget": p["budget"], **ev.headline(p)} for p in state["budget_forcing"]],
            "stages": [{"limit": r["limit"], "selected_step": r["step"], **ev.headline(r)} for r in rows[1:]]}


def write_report(state: dict, out: Path, extra_points: dict | None = None) -> Path:
    """report.md, report.json (`summary`) and stages.png, training.png, acc_vs_length.png in `out`.
    extra_points: more series for the accuracy/length plot, {label: [(mean_length, accuracy), ...]}
    (e.g. direct pruning)."""
    out = Path(out)
    rows = stage_rows(state)
    (out / "report.json").write_text(json.dumps(summary(state), indent=1))
    cfg = state["config"]
    md = ["# ThinkPrune schedule", "",
          f"Validation: `{cfg['val_data']}`, {cfg['val_samples']} samples per problem, temperature "
          f"{cfg['temperature']}, top-p {cfg['top_p']}, up to {cfg['val_max_new_tokens']} new tokens, no length "
          f"prompt. Selection: pass@1 >= (1 - {cfg['tolerance']}) x original, then shortest.", "",
          "| stage | limit | selected step | pass@1 (%) | mean len | truncated (%) | Wait /compl | Wait /1k tok |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wait = r["keywords"]["Wait"]
        md.append(f"| {r['stage']} | {r['limit'] or '-'} | {r['step'] if r['step'] is not None else 'original'} "
                  f"| {100 * r['accuracy']:.1f} | {r['mean_length']:.1f} | {100 * r['truncation_rate']:.1f} "
                  f"| {wait['per_completion']:.2f} | {wait['per_1k_tokens']:.2f} |")
    md += ["", "## Hesitation keywords, original and each stage's selection", "", ev.keyword_table(rows, "label")]
    for st in state["stages"]:
        md += ["", f"## Stage {st['stage']}: limit {st['limit']}", "", f"Started from `{st['start']}`.", "",
               "| step | pass@1 (%) | mean len | truncated (%) | Wait /compl | selected |", "|---|---|---|---|---|---|"]
        for name, e in sorted(st["evals"].items()):
            chosen = st["selected"] is not None and e["path"] == st["selected"]["path"]
            md.append(f"| {int(name.removeprefix('step_'))} | {100 * e['accuracy']:.1f} | {e['mean_length']:.1f} "
                      f"| {100 * e['truncation_rate']:.1f} | {e['keywords']['Wait']['per_completion']:.2f} "
                      f"| {'**yes**' if chosen else ''} |")
        if st["reason"]:
            md += ["", f"Why: {st['reason']}."]
    if state["budget_forcing"]:
        md += ["", "## Budget forcing (original model)", "", "| B | pass@1 (%) | mean len | forced (%) |",
               "|---|---|---|---|"]
        md += [f"| {p['budget']} | {100 * p['accuracy']:.1f} | {p['mean_length']:.1f} | {100 * p['forced_rate']:.1f} |"
               for p in state["budget_forcing"]]
    md += ["", "![accuracy and length per stage](stages.png)", "", "![training curves](training.png)", "",
           "![accuracy vs length](acc_vs_length.png)", ""]
    plot_stages(rows, out / "stages.png")
    plot_training([Path(st["out_dir"]) for st in state["stages"]], out / "training.png")
    series = {"ThinkPrune (selected per stage)": [(r["mean_length"], r["accuracy"]) for r in rows]}
    series["all validated checkpoints"] = [(e["mean_length"], e["accuracy"]) for st in state["stages"]
                                           for e in st["evals"].values()]
    if state["budget_forcing"]:
        series["budget forcing"] = [(p["mean_length"], p["accuracy"]) for p in state["budget_forcing"]]
    plot_acc_vs_length({**series, **(extra_points or {})}, out / "acc_vs_length.png")
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_stages(rows: list[dict], path: Path):
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    x = [r["stage"] for r in rows]
    names = ["orig"] + [f"L={r['limit']}" for r in rows[1:]]
    a.plot(x, [100 * r["accuracy"] for r in rows], "o-")
    a.set_ylabel("validation pass@1 (%)")
    b.plot(x, [r["mean_length"] for r in rows], "o-", color="C1")
    b.set_ylabel("mean length (tokens)")
    for ax in (a, b):
        ax.set_xticks(x, names)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(stage_dirs: list[Path], path: Path):
    """Reward, mean length and truncation rate over the stages' steps, end to end."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_acc_vs_length(series: dict, path: Path):
    """series: {label: [(mean_length, accuracy), ...]}; a line for the ThinkPrune path, points otherwise."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("--"):
        sys.exit("usage: python schedule.py configs/X.py [--key=value ...]")
    run_schedule(load_schedule_config(sys.argv[1], sys.argv[2:]))
    if dist.is_initialized():
        train.destroy_process_group()  # rank 0 writes the report: the others wait for it there
