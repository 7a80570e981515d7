# The embedded ThinkPrune run (python demo.py): a 0.58M-parameter model that thinks in verbose,
# re-checking traces, pruned by three RL stages on 2 CPU cores. Every value here was picked by
# measurement on such a machine; the README says what was tried.
out_dir = "runs/demo"
toy = dict()  # toy.ToyConfig defaults: 0.58M parameters, 800 SFT steps of 16 traces
train = dict(
    prompts_per_step=8,
    samples_per_prompt=8,  # G = 8: 8 groups, 64 completions a step
    lr=3e-4,  # a 0.6M model moves at 3e-4 where a 1.5B one needs 1e-6
    kl_coef=0.0,  # no reference model: the cutoff reward alone, as the brief's first measurement
    entropy_coef=0.0,
    temperature=0.7,  # near the evaluation's 0.6: at 1.0 this tiny model rambles (53% cut at L=300), at 0.6 not
    micro_batch_size=64,
    rollout_batch=64,
    save_every=4,  # 2-3 candidates per stage for the selection rule
    sample_every=8,
    num_samples=2,
    seed=0,
    device="cpu",
)
# The base thinks ~240 tokens; the necessary steps alone take 31-163 (~100 on average). The last limit
# leaves room for the longest necessary chain (12 steps) and little else.
stages = [
    dict(limit=300, steps=8),
    dict(limit=230, steps=8),
    dict(limit=175, steps=12),  # measured: truncation at 175 falls from 80% to ~15% in 12-16 steps
]
val_n_problems = 100  # selection only; 100 keep the demo near 8 minutes
val_samples = 1
test_n_problems = 500
test_samples = 1
max_new_tokens = 640  # the base's longest traces reach ~500 tokens
budgets = [60, 100, 140, 180]
