# ThinkPrune stage 3: the same recipe under a 2000-token limit, from stage 2's selected checkpoint.
#   torchrun --nproc_per_node=8 train.py configs/stage3.py --model=runs/stage2/step_000100
exec(open(__file__.replace("stage3.py", "stage1.py")).read())  # every other value is stage 1's
model = "runs/stage2/step_000100"  # replace with the checkpoint validation selected; schedule.py sets it
out_dir = "runs/stage3"
limit = 2000
steps = 100  # our choice, as in stage 1
