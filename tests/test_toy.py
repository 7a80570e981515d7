"""toy.py: the embedded task's problems and traces are right, its tokenizer and chat template behave like a
real model's, and a few SFT steps give a checkpoint that both transformers and model.py load."""

import json
import random
import re
import string

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import toy
from data import SYSTEM_PROMPT, build_prompt, load_problems
from model import Transformer
from reward import extract_answer, is_equiv
from rollout import generate


NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen".split()


def oracle(problem: str) -> str:
    """The answer recomputed without toy.py's helpers: add the digit k times to the start, mod 100."""
    start, add, k = re.match(r"Start at (\d\d) and add (\d), (\w+) times?,", problem).groups()
    value = int(start)
    for _ in range(NUMBERS.index(k)):
        value = (value + int(add)) % 100
    return f"{value:02d}"


def test_problems_are_deterministic_distinct_and_correct():
    rows = toy.make_problems(1000, seed=7)
    assert rows == toy.make_problems(1000, seed=7)
    assert rows != toy.make_problems(1000, seed=8)
    assert len({r["problem"] for r in rows}) == len({r["id"] for r in rows}) == 1000
    for r in rows:
        assert set(r) == {"id", "problem", "answer", "difficulty", "source"}
        assert r["answer"] == oracle(r["problem"])
        assert r["difficulty"] == NUMBERS.index(r["problem"].split(", ")[1].split()[0])  # the steps asked for
    n_steps = [toy.parse_problem(r["problem"])[2] for r in rows]
    assert min(n_steps) == 1 and max(n_steps) == 12  # lengths vary with the problem
    assert sum(toy.parse_problem(r["problem"])[0] + 9 * k >= 100 for r, k in zip(rows, n_steps)) > 100  # wraps
    answers = [r["answer"] for r in rows]
    assert max(answers.count(f"{d:02d}") for d in range(100)) < 0.03 * len(rows)  # no answer worth guessing
    with pytest.raises(ValueError, match="not a toy problem"):
        toy.parse_problem("Start at 12 and add 0, two times, keeping the last two digits. What do you get?")


def test_a_hand_made_problem_parses_walks_and_is_graded():
    problem = "Start at 97 and add 8, three times, keeping the last two digits. What do you get?"
    assert toy.parse_problem(problem) == (97, 8, 3)
    assert toy.minimal_trace(problem) == ("three: 97+8=05.\ntwo: 05+8=13.\none: 13+8=21.\n</think>\n\n"
                                          "**Final Answer:**\n\n$\\boxed{21}$")  # 105 keeps 05: mod 100
    assert toy.parse_problem(problem.replace("three times", "one time")) == (97, 8, 1)
    for bad in ("Start at 7 and add 8, three times, keeping the last two digits. What do you get?",  # one digit
                "Start at 97 and add 8, zero times, keeping the last two digits. What do you get?",
                "Start at 97 and add 8, three times. What do you get?"):
        with pytest.raises(ValueError, match="not a toy problem"):
            toy.parse_problem(bad)
    # the grader reads the two-digit answer as a number: a leading zero does not matter, a slip does
    assert is_equiv(extract_answer("</think>\n\n**Final Answer:**\n\n$\\boxed{05}$"), "05")
    assert is_equiv("5", "05") and not is_equiv("13", "21")


def test_exclude_keeps_held_out_problems_out():
    test = toy.make_problems(200, seed=2, min_steps=3, max_steps=3)
    train = toy.make_problems(500, seed=0, min_steps=3, max_steps=3, exclude={r["problem"] for r in test})
    assert not {r["problem"] for r in test} & {r["problem"] for r in train}


def test_traces_think_then_answer_the_gold():
    rng = random.Random(0)
    waits = []
    for r in toy.make_problems(200, seed=1):
        t = toy.write_trace(r["problem"], rng)
        thinking, answer = t.split("</think>")
        assert answer == f"\n\n**Final Answer:**\n\n$\\boxed{{{r['answer']}}}$"
        assert extract_answer(t) == r["answer"] and is_equiv(extract_answer(t), r["answer"])
        # every necessary step is written, numbered, with its right value somewhere in the thinking
        s, add, k = toy.parse_problem(r["problem"])
        for i in range(k, 0, -1):  # counted down: "five: ..." first, "one: ..." last
            assert f"{toy.WORDS[i]}: {s:02d}+{add}={(s + add) % 100:02d}.\n" in thinking
            s = (s + add) % 100
        assert f"{toy.WORDS[k + 1]}:" not in thinking and thinking.rstrip().endswith(".")  # no step past k
        # a wrong value is always followed by its correction for the same step
        for wrong, fix in re.findall(r"(\w+: \d\d\+\d)=\d\d\.\nWait, that's wrong\. (\w+: \d\d\+\d)=", t):
            assert wrong == fix
        waits.append(t.count("Wait"))
    assert sum(waits) / len(waits) > 2


def test_the_blind_spot_drops_the_carry_unnoticed_and_longer_walks_hit_it_more():
    # hand-made: 63+7 makes ones 3+7 = 10, a blind spot; the thinker writes 60 and goes on from there
    assert toy.blind_spot(63, 7) and toy.blind_spot(91, 9) and not toy.blind_spot(64, 6) and not toy.blind_spot(64, 7)
    t = toy.write_trace("Start at 63 and add 7, three times, keeping the last two digits. What do you get?",
                        random.Random(0), toy.TraceStyle(p_slip=1.0))
    assert "three: 63+7=60.\ntwo: 60+7=67.\n" in t.replace("Wait, let me check: 60+7=67. Yes.\n", "")
    assert "63+7=70" not in t and "wrong" not in t and extract_answer(t) == "74"  # right: 84
    # the final check repeats the last step as the first pass wrote it, the slip included
    t = toy.write_trace("Start at 46 and add 7, two times, keeping the last two digits. What do you get?",
                        random.Random(0), toy.TraceStyle(p_open=0, p_check=0, p_wrong=0, p_verify=1, p_slip=1))
    assert t == ("two: 46+7=53.\none: 53+7=50.\n"
                 "Wait, let me verify the last step again: 53+7=50. Yes, 50.\n"
                 "</think>\n\n**Final Answer:**\n\n$\\boxed{50}$")

    def hits_blind_spot(problem):  # does the right chain of additions pass a blind spot?
        s, add, k = toy.parse_problem(problem)
        return any(toy.blind_spot((s + i * add) % 100, add) for i in range(k))

    rng, wrong = random.Random(0), {}
    for r in toy.make_problems(3000, seed=5):
        right = extract_answer(toy.write_trace(r["problem"], rng, toy.TraceStyle(p_slip=0.8))) == r["answer"]
        if not hits_blind_spot(r["problem"]):
            assert right, r["problem"]  # every other mistake is corrected in the trace
        wrong.setdefault(r["difficulty"], []).append(not right)
    rate = {k: sum(v) / len(v) for k, v in wrong.items()}
    short, long = (sum(rate[k] for k in ks) / 3 for ks in ((1, 2, 3), (10, 11, 12)))
    assert short < 0.1 and long > 0.15


def test_minimal_trace_keeps_every_step_and_no_redundancy():
    r = toy.make_problems(1, seed=3)[0]
    t = toy.minimal_trace(r["problem"])
    assert "Wait" not in t and t.split("</think>")[0].count("+") == toy.parse_problem(r["problem"])[2]
    assert extract_answer(t) == r["answer"]
    verbose = [toy.write_trace(r["problem"], random.Random(i)) for i in range(50)]
    assert sum(map(len, verbose)) / 50 > 2 * len(t)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    rng = random.Random(0)
    rows = toy.make_problems(300, seed=0)
    corpus = [toy.write_trace(r["problem"], rng) for r in rows] + [r["problem"] for r in rows]
    d = tmp_path_factory.mktemp("tok")
    toy.save_tokenizer(toy.build_tokenizer(corpus + [SYSTEM_PROMPT] * 10, 400), d)
    return d


def test_tokenizer_round_trips_and_keeps_digits_and_think_tags(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [string.printable, SYSTEM_PROMPT.replace("{L}", "120"), "Ünïcode → ∑ also round-trips",
             toy.write_trace(toy.make_problems(1, seed=5)[0]["problem"], random.Random(1))]
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert len(tok.encode("<think>", add_special_tokens=False)) == 1
    assert len(tok.encode("</think>", add_special_tokens=False)) == 1
    assert tok.convert_ids_to_tokens(tok.encode("1234567890", add_special_tokens=False)) == list("1234567890")
    assert tok.pad_token_id == 0 and tok.eos_token == toy.EOS and tok.bos_token == toy.BOS
    # </think> survives decoding without special tokens, so graders can find the answer after it
    ids = tok.encode("a</think>b", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "a</think>b"


def test_chat_template_gives_r1_style_prompts(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    problem = toy.make_problems(1, seed=0)[0]["problem"]
    instruction = " Let's think step by step and output the final answer within \\boxed{}."
    plain = tok.decode(build_prompt(tok, problem, None, SYSTEM_PROMPT))
    assert plain == f"{toy.BOS}<|user|>{problem}{instruction}<|assistant|><think>\n"
    limited = tok.decode(build_prompt(tok, problem, 120, SYSTEM_PROMPT))
    system = SYSTEM_PROMPT.replace("{L}", "120")
    assert limited == f"{toy.BOS}<|system|>{system}<|user|>{problem}{instruction}<|assistant|><think>\n"
    assert system.endswith("The output of the assistant should be within 120 tokens.")
    chat = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]
    assert tok.apply_chat_template(chat, tokenize=False) == f"{toy.BOS}<|user|>1+1<|assistant|>2{toy.EOS}"


def test_tiny_sft_lowers_the_loss_and_saves_a_loadable_checkpoint(tmp_path):
    cfg = toy.ToyConfig(out=str(tmp_path), n_train=40, n_val=10, n_test=10, vocab_size=300, hidden_size=32,
                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        steps=12, batch_size=4, warmup=2, lr=1e-2)
    base = toy.build(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "sft_metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    splits = {name: load_problems(tmp_path / "data" / f"{name}.jsonl") for name in ("train", "val", "test")}
    assert [len(splits[k]) for k in ("train", "val", "test")] == [40, 10, 10]
    held_out = {r["problem"] for r in splits["val"] + splits["test"]}
    assert not held_out & {r["problem"] for r in splits["train"]}
    # difficulty is the number of steps the problem asks for; necessary_length counts the minimal trace's
    # tokens and EOS: each step writes at least five digits, "+", "=" and "." (digits are single tokens)
    rows = splits["train"] + splits["test"]
    assert all(r["difficulty"] == NUMBERS.index(r["problem"].split(", ")[1].split()[0]) for r in rows)
    assert all(r["necessary_length"] >= 8 * r["difficulty"] + 1 for r in rows)
    by_k = {}
    for r in rows:
        by_k.setdefault(r["difficulty"], []).append(r["necessary_length"])
    means = [sum(v) / len(v) for _, v in sorted(by_k.items())]
    assert len(means) >= 3 and means == sorted(means)  # more steps, more necessary tokens

    ours = Transformer.from_pretrained(base, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base)
    ids = torch.tensor([build_prompt(tok, splits["test"][0]["problem"], None, SYSTEM_PROMPT)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
        out = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id)
    # our sampler, greedy, writes what transformers' greedy generate writes (EOS included, if it comes)
    ro = generate(ours, ids.tolist(), n=1, max_new_tokens=8, temperature=0, eos_ids=tok.eos_token_id)
    assert ro.tokens[0, :ro.lengths[0]].tolist() == out[0, ids.shape[1]:].tolist()
