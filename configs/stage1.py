# ThinkPrune stage 1 for DeepSeek-R1-Distill-Qwen-1.5B: RL under a 4000-token limit.
#   torchrun --nproc_per_node=8 train.py configs/stage1.py
# Values follow the official ThinkPrune scripts (veRL GRPO) unless a comment says otherwise.
# schedule.py (configs/thinkprune.py) runs all three stages and picks each stage's checkpoint for you.
model = "models/DeepSeek-R1-Distill-Qwen-1.5B"  # local HF dir: huggingface-cli download deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --local-dir models/DeepSeek-R1-Distill-Qwen-1.5B
out_dir = "runs/stage1"
# train_data: the default, AIME 1983-2021 (907 problems, integer answers) from the shared data dir. The
# official run used 2,470 AIME/AMC problems of the PRIME collection, which we do not have.
limit = 4000  # L, generated tokens; the system prompt says "within 4000 tokens"
max_prompt_tokens = 768  # veRL's max_prompt_length; longer prompts are dropped (logged)
prompts_per_step = 128
samples_per_prompt = 16  # G
temperature = 1.0  # rollouts sample the full distribution, no top-p (evaluation uses 0.6 / top-p 0.95)
lr = 1e-6  # constant: no warmup, no decay
beta1 = 0.9
beta2 = 0.999
weight_decay = 0.01
grad_clip = 1.0
clip_eps = 0.2
minibatches = 1  # one optimizer step per rollout batch (ppo_mini_batch_size = train_batch_size)
ppo_epochs = 1
kl_coef = 0.001  # k3 KL in the loss, subtracted from the objective (the official code had the sign flipped)
entropy_coef = 0.001
adv_norm = "group"  # GRPO: (r - group mean) / group std
steps = 120  # our choice (about 17 passes over 907 problems), not the paper's; validate and pick a checkpoint
save_every = 20  # the official save/validation interval: every checkpoint is a candidate
keep_last = 0  # keep all of them: each holds fp32 weights (7.1 GB) and optimizer.pt (14.2 GB), ~21 GB
micro_batch_size = 4  # 4 x (768 + 4000) tokens per forward; fits 80 GB with activation checkpointing
activation_checkpointing = True
rollout_batch = 256  # KV-cache slots: all 16 x 16 rows of a rank at 8 GPUs decode together
sample_every = 10
seed = 42
