# A two-stage schedule small enough for CPU tests (tests/test_schedule.py runs it with --model and
# --out_dir pointing at a random tiny model; `python tests/tiny_run.py --build runs/tiny` makes one here).
# Only the mechanics are exercised: a random model's answers are wrong, so every checkpoint ties on
# pass@1 and the rule falls to "shortest".
model = "runs/tiny/base"
out_dir = "runs/tiny_schedule"
train = dict(
    train_data="runs/tiny/problems.jsonl",
    prompts_per_step=4,
    samples_per_prompt=4,
    lr=3e-3,  # a random tiny model needs big steps to move at all
    kl_coef=0.0,  # no reference model: faster, and the schedule does not depend on it
    entropy_coef=0.0,
    micro_batch_size=16,
    rollout_batch=16,
    save_every=2,  # two candidates per stage
    sample_every=0,
    seed=0,
    device="cpu",
)
stages = [
    dict(limit=16, steps=4),
    dict(limit=12, steps=4),
]
val_data = "runs/tiny/problems.jsonl"
val_n_problems = 6
val_samples = 2
val_max_new_tokens = 20
eval_batch = 16
budgets = [4, 8]  # budget-forcing points of the original model on the accuracy/length plot
answer_budget = 6
