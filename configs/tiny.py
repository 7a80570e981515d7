# The tiny run the tests and a laptop use: a random 2-layer model from `python tests/tiny_run.py --build runs/tiny`
# and a limit short enough that a random model is usually cut off, so the cutoff reward has room to rise.
model = "runs/tiny/base"
train_data = "runs/tiny/problems.jsonl"
out_dir = "runs/tiny/train"
limit = 16  # a random model over 87 tokens emits EOS within 16 tokens ~17% of the time
prompts_per_step = 4
samples_per_prompt = 8
steps = 6
lr = 3e-3  # a random tiny model needs big steps to move within a few updates (the 1.5B runs use 1e-6)
kl_coef = 0.01  # large enough that the reference model and the KL term are exercised
entropy_coef = 0.0
micro_batch_size = 8
rollout_batch = 32
save_every = 2
keep_last = 2
sample_every = 2
seed = 0
device = "cpu"
