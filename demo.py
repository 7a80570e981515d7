"""
The embedded ThinkPrune run: a tiny long-thinking model, built here and pruned on a CPU, end to end.

    python demo.py                                  # everything, into runs/demo/
    python demo.py configs/demo.py --out_dir=runs/x # --key=value overrides the config file
    python demo.py --toy='{"steps":3000}'          # lists and dicts as JSON

What it runs, each step skipped when its result is already on disk (kill it and run it again: it resumes):
1. The base model (`toy.build`): problems in runs/demo/data/{train,val,test}.jsonl, a tokenizer, and a
   tiny Qwen2 SFT'd on verbose traces full of redundant "Wait, let me check" re-checks.
2. ThinkPrune (`schedule.run_schedule`): RL stages under falling limits, each from the checkpoint the
   previous stage selected on the validation problems (pass@1 >= 0.9 x the base's, then shortest).
3. Direct pruning, the paper's ablation: one RL stage at the final limit from the base, with as many
   steps as all the stages together, selected by the same rule.
4. Held-out test set, no length prompt, the same sampling settings for all: the base, the ThinkPrune
   model, the direct-pruning model, and budget forcing of the base (cut the thinking at B tokens,
   append "</think>\\n\\n**Final Answer:**\\n\\n", let it answer) at the configured budgets and at the
   ThinkPrune model's mean length, so the two meet at equal length.
5. runs/demo/report.json (the summary), report.md (tables), acc_vs_length.png, plus schedule.py's
   stage and training plots under runs/demo/thinkprune/.

Every number in the report comes from `eval.evaluate` on the test problems; the validation set is only
for selection.
"""

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import report
import schedule
import toy
from config import check, load_config


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    toy: dict = field(default_factory=dict)  # toy.ToyConfig overrides (model size, SFT steps, ...)
    train: dict = field(default_factory=dict)  # train.Config overrides shared by every RL stage
    stages: list = field(default_factory=list)  # [{limit, steps, ...}] for ThinkPrune; direct = last limit
    val_n_problems: int = 0  # 0 = all of val.jsonl
    val_samples: int = 1
    test_n_problems: int = 0  # 0 = all of test.jsonl
    test_samples: int = 1
    max_new_tokens: int = 512  # evaluation's own cap, far above any completion of the base
    temperature: float = 0.6  # the paper's evaluation sampling
    top_p: float = 0.95
    eval_batch: int = 256
    budgets: list = field(default_factory=list)  # budget-forcing points; the pruned mean length is added
    answer_budget: int = 16  # tokens after the forced cue: "$\boxed{7}$" and EOS fit easily
    seed: int = 0

    def check(self):
        check(bool(self.stages), "stages", self.stages, "give at least one stage")
        for key in ("val_samples", "test_samples", "max_new_tokens", "eval_batch", "answer_budget"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        for key in self.toy:
            check(key in {f.name for f in dataclasses.fields(toy.ToyConfig)}, f"toy.{key}", self.toy[key],
                  "not a toy.ToyConfig key")
        toy.ToyConfig(**self.toy).check()
        schedule_config(self, "thinkprune", self.stages).check()


def schedule_config(cfg: DemoConfig, name: str, stages: list) -> schedule.ScheduleConfig:
    out, data = Path(cfg.out_dir), Path(cfg.out_dir) / "data"
    return schedule.ScheduleConfig(
        model=str(out / "base"), out_dir=str(out / name), stages=stages,
        train={"train_data": str(data / "train.jsonl"), **cfg.train}, val_data=str(data / "val.jsonl"),
        val_n_problems=cfg.val_n_problems, val_samples=cfg.val_samples, val_max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, eval_batch=cfg.eval_batch,
        answer_budget=cfg.answer_budget)


def test_evals(cfg: DemoConfig, sched: schedule.ScheduleConfig, pruned_path: str, direct_path: str):
    """schedule.validate on the test set instead of validation; each result cached in runs/demo/test.json
    with the settings it was made with (other settings: everything is evaluated again)."""
    test = dataclasses.replace(sched, val_data=str(Path(cfg.out_dir) / "data" / "test.jsonl"),
                               val_n_problems=cfg.test_n_problems, val_samples=cfg.test_samples)
    cache = Path(cfg.out_dir) / "test.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    settings = {k: getattr(test, k) for k in schedule.VALIDATION_KEYS}
    if done.get("settings") != settings:
        done = {"settings": settings}

    def run(name, path, budget=None):
        if name not in done:
            res = schedule.validate(test, path, f"test_{name}", Path(cfg.out_dir), budget)
            res.pop("problems")  # the per-problem numbers stay in evals/test_*.jsonl
            done[name] = res
            report.write_json(cache, done)
        return done[name]

    base, pruned, direct = run("base", sched.model), run("thinkprune", pruned_path), run("direct", direct_path)
    budgets = sorted(set(cfg.budgets) | {round(pruned["mean_length"])})
    forcing = [{"budget": B, **run(f"budget{B}", sched.model, B)} for B in budgets]
    return base, pruned, direct, forcing


def main(cfg: DemoConfig) -> dict:
    t0 = time.time()
    out = Path(cfg.out_dir)
    seconds = json.loads((out / "seconds.json").read_text()) if (out / "seconds.json").is_file() else {}

    def timed(name, fn, *args):
        t = time.time()
        result = fn(*args)
        seconds[name] = round(seconds.get(name, 0.0) + time.time() - t, 1)
        report.write_json(out / "seconds.json", seconds)
        return result

    # 1. the base (built once; a rerun with other toy settings is refused, not silently given the old base)
    out.mkdir(parents=True, exist_ok=True)
    timed("base", toy.ensure_base, toy.ToyConfig(out=str(out), **cfg.toy))
    # 2. ThinkPrune, 3. direct pruning at the last limit with the same total number of steps
    sched = schedule_config(cfg, "thinkprune", cfg.stages)
    state = timed("thinkprune", schedule.run_schedule, sched)
    direct_stage = {**cfg.stages[-1], "steps": sum(s["steps"] for s in cfg.stages)}
    dstate = timed("direct", schedule.run_schedule, dataclasses.replace(
        schedule_config(cfg, "direct", [direct_stage]), report=False))
    # 4. the test set
    pruned_path, direct_path = state["stages"][-1]["selected"]["path"], dstate["stages"][-1]["selected"]["path"]
    base, pruned, direct, forcing = timed("test", test_evals, cfg, sched, pruned_path, direct_path)
    # 5. the report
    return report.demo_report(cfg, state, base, pruned, direct, forcing, seconds, time.time() - t0)


if __name__ == "__main__":
    default = str(Path(__file__).resolve().parent / "configs" / "demo.py")  # from any cwd
    path = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else default
    main(load_config(path, [a for a in sys.argv[1:] if a.startswith("--")], DemoConfig))
