"""
ThinkPrune's iterative pruning: RL stages under falling length limits, each starting from the
checkpoint selected in the previous one, then a report.

    python schedule.py configs/thinkprune.py                         # the paper's 4000 -> 3000 -> 2000
    torchrun --nproc_per_node 8 schedule.py configs/thinkprune.py    # training and validation on 8 GPUs
    python schedule.py configs/tiny_schedule.py --out_dir=runs/x     # --key=value overrides the file

`run_schedule`: (1) validate the original model (pass@1 over `val_samples` samples, no length prompt,
`eval.evaluate`): its pass@1 is the bar for every stage; with `budgets`, its budget-forcing points too.
(2) For stage t: `train.main` (the config's `train` dict, then the stage's, from the previous
selection, into `{out_dir}/stage{t}`, keeping every checkpoint), validate each checkpoint, `select`
one. (3) report.md, report.json and plots (report.py). Every result lands in schedule.json (atomic)
as soon as it exists.

Choices:
- Selection, the paper's rule: among checkpoints with pass@1 >= (1 - tolerance) x the original's, the
  shortest mean length (ties: higher pass@1, then the earlier step); if none qualifies, the most
  accurate, and it says so. The reason is written beside the choice.
- A stage starts from the selected weights with a fresh optimizer; its KL reference is its starting
  model, which is not a candidate of its own stage. Every validation uses the same seed (common random
  numbers). One process group serves all stages and validations.
- Resume: rerun the same command. Finished stages are skipped, an unfinished one resumes from its newest
  checkpoint, cached validations are reused; a schedule.json made with other validation settings, base
  model or stage definitions is refused, naming the key that differs.
"""

import dataclasses
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import checkpoint
import distributed
import eval as ev
import train
from config import check, load_config, typed
from data import load_problems
from report import schedule_report, write_json, write_text


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

    def check(self):
        """train and every stage: dicts of train.Config overrides with the right types, limit and steps in
        each stage; each stage's resulting train config passes train.Config.check()."""
        train_types = {f.name: f.type for f in dataclasses.fields(train.Config)}
        for name, d in [("train", self.train)] + [(f"stages[{i}]", s) for i, s in enumerate(self.stages)]:
            check(isinstance(d, dict), name, d, "should be a dict of train.Config overrides")
            for key in d:
                check(key in train_types, f"{name}.{key}", d[key], "not a train.Config key")
                check(key not in ("model", "out_dir", "keep_last"), f"{name}.{key}", d[key],
                      "set by the schedule, not the config")
                d[key] = typed(name, key, d[key], train_types[key])
        for i, s in enumerate(self.stages):
            check("limit" in s and "steps" in s, f"stages[{i}]", s, "needs 'limit' and 'steps'")
            try:
                dataclasses.replace(train.Config(), **{**self.train, **s}).check()
            except ValueError as e:
                raise ValueError(f"stages[{i}] (with train): {e}") from None
        for key in ("val_samples", "val_max_new_tokens", "eval_batch", "answer_budget"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        check(self.val_n_problems >= 0, "val_n_problems", self.val_n_problems, "must be >= 0 (0 = all)")
        check(0 <= self.tolerance < 1, "tolerance", self.tolerance, "must be in [0, 1)")
        check(all(isinstance(b, int) and b >= 1 for b in self.budgets), "budgets", self.budgets,
              "token counts >= 1")


# what a cached validation depends on: a schedule.json made with other values is refused
VALIDATION_KEYS = ("model", "val_data", "val_n_problems", "val_samples", "val_max_new_tokens", "temperature",
                   "top_p", "seed", "tolerance", "answer_budget")


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
    if distributed.rank() == 0:
        write_json(out / "schedule.json", state)


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
        now = {**cfg.train, **cfg.stages[t]} if t < len(cfg.stages) else {}
        diff = sorted(k for k in set(st["overrides"]) | set(now) if st["overrides"].get(k, "-") != now.get(k, "-"))
        if diff:
            raise ValueError(f"{path}: stage {t + 1} was run with other settings: " + ", ".join(
                f"{k}={st['overrides'].get(k, '(unset)')!r}, now {now.get(k, '(unset)')!r}" for k in diff))
    state["config"] = asdict(cfg)  # report-only fields (budgets, report) may change
    return state


# ---- validation ----------------------------------------------------------------------------------------

def validate(cfg: ScheduleConfig, path: str, name: str, out: Path, budget: int | None = None) -> dict:
    """eval.evaluate of the checkpoint at `path` on the validation set; records to evals/{name}.jsonl."""
    model, tokenizer = ev.load_model(path, distributed.device())
    problems = load_problems(ev.benchmark_path(cfg.val_data))
    problems = problems[:cfg.val_n_problems] if cfg.val_n_problems else problems
    res = ev.evaluate(model, tokenizer, problems, cfg.val_samples, cfg.val_max_new_tokens, cfg.temperature,
                      cfg.top_p, cfg.seed, budget=budget, answer_budget=cfg.answer_budget, max_batch=cfg.eval_batch)
    records = res.pop("records")
    if distributed.rank() == 0:
        (out / "evals").mkdir(exist_ok=True)
        write_text(out / "evals" / f"{name}.jsonl", "".join(json.dumps(asdict(r)) + "\n" for r in records))
        print(f"[schedule] {name}: pass@1 {res['accuracy']:.4f}, mean length {res['mean_length']:.1f}, "
              f"truncated {res['truncation_rate']:.3f} ({res['seconds']:.0f}s)", flush=True)
    del model
    distributed.free_memory()
    return {"path": str(path), **res}


def run_schedule(cfg: ScheduleConfig, train_fn=train.main, base: dict | None = None) -> dict:
    """Run (or resume) the whole schedule; returns the state that schedule.json holds. `base`: the original
    model's `validate` result under these settings when the caller has it (a sweep validates its base once
    for all its runs). Rank 0 holds the out_dir's lock (checkpoint.lock) throughout: a second schedule on
    it is refused."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with checkpoint.lock(out) if distributed.rank() == 0 else nullcontext():
        return _run_schedule(cfg, train_fn, out, base)


def _run_schedule(cfg: ScheduleConfig, train_fn, out: Path, base: dict | None) -> dict:
    state = load_state(cfg, out)
    t0 = time.time()

    # 1. the original model: the bar every stage is held to, and the budget-forcing baseline
    if state["base"] is None:
        state["base"] = base or validate(cfg, cfg.model, "base", out)
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
            st["trained"] = True
            save_state(state, out)
        for ckpt in checkpoint.complete(stage_dir):
            if ckpt.name not in st["evals"]:
                st["evals"][ckpt.name] = validate(cfg, str(ckpt), f"stage{t}_{ckpt.name}", out)
                save_state(state, out)
        candidates = [{"step": int(name.removeprefix("step_")), "path": e["path"], "accuracy": e["accuracy"],
                       "mean_length": e["mean_length"]} for name, e in sorted(st["evals"].items())]
        st["selected"], st["reason"] = select(candidates, base_acc, cfg.tolerance)
        save_state(state, out)
        if distributed.rank() == 0:
            print(f"[schedule] stage {t} (limit {overrides['limit']}): {st['reason']}", flush=True)
        model = st["selected"]["path"]

    state["seconds_this_run"] = round(time.time() - t0, 1)
    save_state(state, out)
    if cfg.report and distributed.rank() == 0:
        schedule_report(state, out)
    return state


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("--"):
        sys.exit("usage: python schedule.py configs/X.py [--key=value ...]")
    cfg = load_config(sys.argv[1], sys.argv[2:], ScheduleConfig)
    distributed.init(cfg.train.get("device", ""))
    run_schedule(cfg)
    distributed.cleanup()  # rank 0 writes the report: the others wait for it here
