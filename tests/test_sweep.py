"""sweep.py on a shortened sweep: two methods, one seed, two steps each from a 40-step SFT base. The report
has the shape the README promises, and a rerun reads finished runs instead of training them again. (The
claims are measured by `python sweep.py`, not asserted here.) The claim arithmetic is checked by hand."""

import json

import pytest

import schedule
import sweep


def test_claims_by_hand():
    runs = [{"method": m, "limit": 50, "seed": s, "accuracy": a, "mean_length": n}
            for m, acc, n in (("thinkprune", (0.8, 0.82), 40.0), ("direct", (0.6, 0.62), 45.0))
            for s, a in enumerate(acc)]
    base = {"accuracy": 0.81, "mean_length": 100.0}
    out = {c["claim"]: c for c in sweep.claims(runs, base, [{"mean_length": 30.0, "accuracy": 0.1},
                                                             {"mean_length": 50.0, "accuracy": 0.3}], 50)}
    assert out["ThinkPrune at L=50 cuts length >= 50% within 2 points of the base"]["held"]  # 60% shorter, 81 -> 81
    assert out["iterative pruning beats direct pruning at the tighter limit"]["held"]  # 20 points, SE 0.014
    forced = out["budget forcing of the base at ThinkPrune's length (L=50) is worse"]
    assert forced["held"] and "20.0%" in forced["detail"]  # interpolated at 40 tokens: 0.1 + 0.2 / 2
    assert sweep.interpolate([(1, 0.0), (3, 1.0)], 2) == 0.5 and sweep.interpolate([(1, 0.0), (3, 1.0)], 9) == 1.0


@pytest.mark.slow
def test_shortened_sweep_writes_the_report_and_skips_finished_runs(tmp_path, monkeypatch):
    cfg = sweep.SweepConfig(
        out_dir=str(tmp_path), toy=dict(steps=40, n_train=400, n_val=20, n_test=30, threads=1),
        train=dict(prompts_per_step=4, samples_per_prompt=4, lr=1e-4, kl_coef=0.0, entropy_coef=0.0,
                   micro_batch_size=16, rollout_batch=16, save_every=1, sample_every=0, device="cpu"),
        methods={"thinkprune": {"ladder": [1.2, 1.0]}, "direct": {}}, limits=[100], seeds=[0], steps=2,
        val_n_problems=10, test_n_problems=30, max_new_tokens=300, budgets=[40])
    cfg.check()
    summary = sweep.main(cfg)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == summary
    assert {"runs", "base", "budget_forcing", "claims", "seconds", "commit"} <= set(summary)
    assert sorted((r["method"], r["limit"], r["seed"]) for r in summary["runs"]) == [("direct", 100, 0),
                                                                                    ("thinkprune", 100, 0)]
    for r in summary["runs"] + [summary["base"]]:
        assert 0 <= r["accuracy"] <= 1 and r["mean_length"] > 0 and "wait_per_completion" in r
    assert [p["budget"] for p in summary["budget_forcing"]] == [40]
    assert all({"claim", "held", "detail"} == set(c) for c in summary["claims"]) and summary["claims"]
    tp = json.loads((tmp_path / "runs" / "thinkprune_L100_s0" / "schedule.json").read_text())
    assert [s["limit"] for s in tp["stages"]] == [120, 100]  # the ladder, one step each
    results = json.loads((tmp_path / "results.json").read_text())
    assert tp["base"] == results["base_val"]  # the base validated once for all runs, not once per run
    assert not (tmp_path / "runs" / "thinkprune_L100_s0" / "evals" / "base.jsonl").exists()
    for name in ("report.md", "pareto.png", "by_difficulty.png"):
        assert (tmp_path / name).stat().st_size > 0

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(schedule, "run_schedule", no_training)
    again = sweep.main(cfg)
    assert again["runs"] == summary["runs"] and again["base"] == summary["base"]
