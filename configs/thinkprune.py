# The paper's schedule for DeepSeek-R1-Distill-Qwen-1.5B: three RL stages at limits 4000 -> 3000 -> 2000,
# each from the checkpoint the previous stage selected on the validation set (pass@1 >= 0.9 x the
# original model's, then shortest). torchrun --nproc_per_node 8 schedule.py configs/thinkprune.py
# a local HF dir: huggingface-cli download deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --local-dir models/...
model = "models/DeepSeek-R1-Distill-Qwen-1.5B"
out_dir = "runs/thinkprune"
# shared by all stages; everything else is train.py's defaults (AIME 1983-2021 train set, G=16, 128 prompts
# per step, lr 1e-6, k3 KL 0.001 to the stage's starting model, ThinkPrune's system prompt with the limit)
train = dict(
    save_every=20,  # every saved checkpoint is a candidate: 20 steps apart is ~6 candidates per stage
    temperature=1.0,  # rollouts sample the full distribution; evaluation uses 0.6 / 0.95 (below)
    rollout_batch=256,
    micro_batch_size=4,
    activation_checkpointing=True,  # 4k-token sequences of a 1.5B model in 80 GB
)
# Step counts are our choice for this codebase (about one pass over the 907 training problems per
# 8 steps at 128 prompts per step), not a number restated from the paper.
stages = [
    dict(limit=4000, steps=120),
    dict(limit=3000, steps=100),
    dict(limit=2000, steps=100),
]
# validation: AIME 2022+2023 (60 problems), the paper's evaluation settings, no length prompt
val_data = "aime_val"
val_samples = 16
val_max_new_tokens = 32000
temperature = 0.6
top_p = 0.95
eval_batch = 32  # KV-cache slots: at 32k tokens a 1.5B row is ~0.93 GB in bf16 (28 layers x 2 kv heads x 128)
tolerance = 0.10  # the paper's rule: keep >= 90% of the original pass@1, then the shortest
budgets = [500, 1000, 2000, 4000, 8000]  # the s1-style baseline the paper compares against
answer_budget = 512
