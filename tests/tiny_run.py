"""
A tiny, fast stand-in for a real run: a character-level tokenizer with a chat template, a random
2-layer Qwen2 saved as an HF dir, a file of toy problems, and a reward that needs no sympy.

    python tests/tiny_run.py --build runs/tiny                     # writes runs/tiny/{base/, problems.jsonl}
    python tests/tiny_run.py configs/tiny.py --out_dir=runs/t1     # train.main with `finish_reward`
    torchrun --nproc_per_node=2 tests/tiny_run.py configs/tiny.py --out_dir=runs/t2

`finish_reward` is ThinkPrune's cutoff with the correctness part taken out: 1 for a completion that
emits EOS within the limit, 0 for one that is cut off. A random model rarely stops within a few
tokens, so the reward has room to rise, and it rises only if the trainer learns *when to stop*.
The tests in test_train.py run this file in subprocesses (torchrun for FSDP, SIGKILL for resume).
Each rank also appends its rollouts' longest completion per step to `{out_dir}/rollout_len_rank{r}.txt`,
so a test can check that ranks really did stop at different lengths.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

import distributed  # noqa: E402
import train  # noqa: E402
from config import load_config  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

SPECIAL = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,'?!{}()<>/\\$=+-*")
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(path))
    return len(vocab)


def make_tiny(root, seed: int = 0, n_problems: int = 64, tied: bool = False) -> tuple[str, str]:
    """Write root/base (tokenizer + random model) and root/problems.jsonl; return their paths."""
    root = Path(root)
    base = root / "base"
    V = make_tokenizer(base)
    args = ModelArgs(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                     max_position_embeddings=512, bos_token_id=None, eos_token_id=SPECIAL.index("<eos>"))
    model = Transformer(args).init_weights(seed=seed)
    model.save_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with open(root / "problems.jsonl", "w") as f:
        for i in range(n_problems):
            a, b = torch.randint(0, 10, (2,), generator=g).tolist()
            f.write(json.dumps({"id": f"tiny-{i}", "problem": f"{a}+{b}", "answer": str((a + b) % 10),
                                "source": "tests/tiny_run.py"}) + "\n")
    return str(base), str(root / "problems.jsonl")


def finish_reward(text: str, gold: str, finished: bool) -> float:
    return 1.0 if finished else 0.0


def _recording_generate(out_dir: str):
    """train.generate, plus a line per call with the longest completion this rank produced."""
    inner = train.generate
    rank = int(os.environ.get("RANK", 0))

    def gen(*args, **kwargs):
        ro = inner(*args, **kwargs)
        with open(Path(out_dir) / f"rollout_len_rank{rank}.txt", "a") as f:
            f.write(f"{int(ro.lengths.max())}\n")
        return ro
    return gen


def unshard_check(root):
    """Under torchrun: rank r decodes 3 + 6r tokens through the FSDP model inside train.unsharded, then
    all ranks take a training step. Without `unsharded` the rank that stops first would leave the
    other waiting forever in an all-gather; here every rank must print its line."""
    d = distributed.init("cpu")
    model = train.load_model(Path(root) / "base", d, trainable=True)
    with train.unsharded(model) as plain, torch.no_grad():
        ro = train.generate(plain, [[4, 10, 11, 5]], n=2, max_new_tokens=3 + 6 * d.rank, eos_ids=(), seed=d.rank)
    model(torch.tensor([[4, 10, 11, 5]])).sum().backward()
    print(f"rank {d.rank} decoded {int(ro.lengths.max())} tokens", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--build":
        print(make_tiny(sys.argv[2]))
    elif sys.argv[1] == "--unshard-check":
        unshard_check(sys.argv[2])
    else:
        cfg = load_config(sys.argv[1], sys.argv[2:], train.Config)
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        train.generate = _recording_generate(cfg.out_dir)
        train.main(cfg, reward_fn=finish_reward)
    distributed.cleanup()
