# The embedded ThinkPrune run (python demo.py): a 0.6M-parameter model that thinks in verbose,
# re-checking traces, pruned by three RL stages on 2 CPU cores. Every value here was picked by
# measurement on such a machine; the README says what was tried.
out_dir = "runs/demo"
toy = dict()  # toy.ToyConfig defaults: 0.58M parameters, 2300 SFT steps of 16 traces (~8.5 min)
train = dict(
    prompts_per_step=16,
    samples_per_prompt=8,  # G = 8: 16 groups, 128 completions a step
    lr=1e-4,  # a 0.6M model moves at 1e-4 where a 1.5B one needs 1e-6
    kl_coef=0.0,  # no reference model: the cutoff reward alone, as the brief's first measurement
    entropy_coef=0.0,
    temperature=1.0,
    micro_batch_size=64,
    rollout_batch=128,
    save_every=5,  # 3-5 candidates per stage for the selection rule
    sample_every=10,
    num_samples=2,
    seed=0,
    device="cpu",
)
# The base thinks ~170 tokens; the necessary steps alone take 42-90 (65 on average). L1 already cuts the longest
# traces; the last limit leaves room for the longest necessary chain and little else.
stages = [
    dict(limit=140, steps=25),  # measured: 170 -> ~100 tokens in 25 steps, accuracy up
    dict(limit=115, steps=20),  # -> ~70: most re-checks gone
    dict(limit=95, steps=15),  # at the necessary length (65 on average); the longest chains need ~90
]
val_n_problems = 200
val_samples = 1
test_n_problems = 500
test_samples = 1
max_new_tokens = 512
budgets = [40, 60, 80, 100, 120]
