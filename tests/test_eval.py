"""eval.py on models whose outputs we know: a "scripted" real Transformer that writes one fixed
completion whatever the prompt (so pass@1, lengths and keyword rates are known in advance), and a tiny
random model whose aggregates are checked against a recomputation from its own completions.

The scripted model is an ordinary `model.Transformer` with its attention and MLP outputs zeroed, so
logits depend on the current token only; one-hot embeddings and a permutation-like head with large
weights make it a deterministic next-token table (deterministic at temperature 0.6 too)."""

import json
import math
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer

import eval as ev
from data import seed_for
from model import ModelArgs, Transformer
from reward import score
from rollout import generate
from toy import CHAT_TEMPLATE, SPECIAL  # the embedded model's chat markers, pad first (id 0)

# what the scripted model writes after the prompt's last token "\n": one "Wait", then the answer 7
SCRIPT = ["W", "a", "i", "t", ",", " ", "</think>", "\\", "b", "o", "x", "e", "d", "{", "7", "}", "<|eos|>"]
SCRIPT_TEXT = "Wait, </think>\\boxed{7}"


def save_char_tokenizer(out: Path):
    """A character-level tokenizer (printable ASCII + newline) with a chat template, AutoTokenizer-loadable."""
    chars = list(string.printable[:95]) + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIAL + ["<think>", "</think>", "[UNK]"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in ("<think>", "</think>")])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
           "pad_token": "<|pad|>", "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return len(vocab)


def tiny_args(V, hidden=64):
    return ModelArgs(vocab_size=V, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                     max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)


def save_random_model(out: Path, seed=0) -> Path:
    """Char tokenizer + a tiny random Transformer, saved as an HF checkpoint dir."""
    V = save_char_tokenizer(out)
    model = Transformer(tiny_args(V)).init_weights(seed=seed)
    model.source_dir = str(out)
    model.save_pretrained(out)
    return out


def save_scripted_model(out: Path) -> Path:
    """Char tokenizer + a Transformer that writes SCRIPT after "\\n" (and after any token not in SCRIPT)."""
    V = save_char_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    model = Transformer(tiny_args(V, hidden=128)).init_weights()
    ids = [tok.convert_tokens_to_ids(t) for t in SCRIPT]
    nxt = {a: b for a, b in zip(ids, ids[1:])}
    with torch.no_grad():
        for layer in model.layers:  # the residual stream stays the token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.embed_tokens.weight.copy_(torch.eye(V, 128))
        model.lm_head.weight.zero_()
        for t in range(V):
            model.lm_head.weight[nxt.get(t, ids[0]), t] = 50.0  # logit gap ~50 * sqrt(128): no sampling noise
    model.source_dir = str(out)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    d = save_scripted_model(tmp_path_factory.mktemp("scripted"))
    return Transformer.from_pretrained(d, device="cpu"), AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    d = save_random_model(tmp_path_factory.mktemp("random"))
    return Transformer.from_pretrained(d, device="cpu"), AutoTokenizer.from_pretrained(d)


PROBLEMS = [{"id": "a", "problem": "3+4", "answer": "7"}, {"id": "b", "problem": "2+5", "answer": "7"},
            {"id": "c", "problem": "1+2", "answer": "3"}]


def test_scripted_model_numbers_are_known(scripted):
    model, tok = scripted
    res = ev.evaluate(model, tok, PROBLEMS, samples=4, max_new_tokens=40, temperature=0.6, top_p=0.95, seed=0)
    assert [r.text for r in res["records"]] == [SCRIPT_TEXT] * 12
    assert res["accuracy"] == pytest.approx(2 / 3)  # answers 7, 7 right; 3 wrong
    assert [p["accuracy"] for p in res["problems"]] == [1.0, 1.0, 0.0]
    assert res["mean_length"] == res["median_length"] == len(SCRIPT) == 17  # EOS counted
    assert res["truncation_rate"] == 0.0 and res["n_completions"] == 12 and res["n_problems"] == 3
    assert res["keywords"]["Wait"] == {"per_completion": 1.0, "per_1k_tokens": pytest.approx(1000 / 17)}
    assert res["keywords"]["Alternatively"]["per_completion"] == 0.0


def test_cut_off_completions_are_wrong_and_counted_as_truncated(scripted):
    model, tok = scripted
    res = ev.evaluate(model, tok, PROBLEMS, samples=2, max_new_tokens=16, seed=0)  # one short of the EOS
    assert all(r.text == SCRIPT_TEXT and not r.finished for r in res["records"])
    assert res["accuracy"] == 0.0 and res["truncation_rate"] == 1.0 and res["mean_length"] == 16


def test_aggregates_match_a_recomputation_from_the_completions(scripted):
    """The scripted model at temperature 75: its script's tokens stay likely but not certain, so completions
    come out right, wrong (a slipped digit or brace), cut off (one after its right answer), with 0 to 3 "Wait"s. Each record is the
    rollout's row, graded; accuracy (per problem, then averaged), lengths, truncation and the "Wait" rates
    equal a recomputation from the records with this test's own rules (last \\boxed{} of a finished text; "wait"
    as a whole word)."""
    model, tok = scripted
    problems = PROBLEMS + [{"id": "d", "problem": "9-9", "answer": "0"}]
    res = ev.evaluate(model, tok, problems, samples=4, max_new_tokens=30, temperature=75.0, top_p=1.0, seed=11)
    recs = res["records"]
    assert [(r.problem_id, r.sample) for r in recs] == [(p["id"], j) for p in problems for j in range(4)]
    gold = {p["id"]: p["answer"] for p in problems}
    ro = generate(model, [ev.build_prompt(tok, p["problem"], None, "") for p in problems], 4, 30,
                  temperature=75.0, top_p=1.0, eos_ids=(2,), seed=[seed_for(11, i) for i in range(4)])
    waits = []
    for i, r in enumerate(recs):  # each record is the rollout's row, decoded and graded
        assert r.length == int(ro.lengths[i]) and r.finished == bool(ro.finished[i])
        assert r.text == tok.decode(ro.tokens[i, :ro.lengths[i]].tolist(), skip_special_tokens=True)
        boxed = re.findall(r"\\boxed\{([^{}]*)\}", r.text)
        assert r.correct == float(r.finished and bool(boxed) and boxed[-1] == gold[r.problem_id]), r.text
        waits.append(re.findall(r"\w+", r.text.lower()).count("wait"))
        assert r.keywords["Wait"] == waits[-1], r.text
    # the inputs exercise every branch: right and wrong, finished and cut (one with the right answer in it,
    # wrong all the same), with and without the keyword
    assert 0 < sum(r.correct for r in recs) < 8 and 0 < sum(r.finished for r in recs) < 16
    assert any(not r.finished and score(r.text, gold[r.problem_id], True) == 1 for r in recs)
    assert 0 in waits and max(waits) >= 2
    by = {pid: [r for r in recs if r.problem_id == pid] for pid in gold}
    assert [p["accuracy"] for p in res["problems"]] == [sum(r.correct for r in by[pid]) / 4 for pid in gold]
    assert res["accuracy"] == pytest.approx(sum(sum(r.correct for r in rs) / 4 for rs in by.values()) / 4)
    assert res["mean_length"] == pytest.approx(sum(r.length for r in recs) / 16)
    assert res["truncation_rate"] == pytest.approx(sum(not r.finished for r in recs) / 16)
    assert res["keywords"]["Wait"]["per_completion"] == pytest.approx(sum(waits) / 16)
    assert res["keywords"]["Wait"]["per_1k_tokens"] == pytest.approx(1000 * sum(waits) / sum(r.length for r in recs))


def test_pass_at_1_averages_per_problem_first():
    recs = [ev.Completion("x", 0, 1.0, 10, True, ""), ev.Completion("y", 0, 0.0, 30, True, ""),
            ev.Completion("y", 1, 0.0, 20, False, "")]
    s = ev.summarize(recs)
    assert s["accuracy"] == 0.5  # problem x: 1/1, problem y: 0/2 (not 1/3)
    assert s["mean_length"] == 20 and s["median_length"] == 20 and s["truncation_rate"] == pytest.approx(1 / 3)


def test_keywords_counted_per_phrase_case_insensitive_at_word_boundaries():
    c = ev.count_keywords("Wait. But wait, hmm... Let me double-check. Awaits? HMM. Alternatively")
    assert c["Wait"] == 2 and c["But wait"] == 1 and c["Hmm"] == 2 and c["double-check"] == 1
    assert c["Alternatively"] == 1 and c["Let me check"] == 0


def test_budget_forcing_cuts_at_B_and_appends_the_cue(scripted):
    model, tok = scripted
    prompts = [ev.build_prompt(tok, p["problem"], None, "") for p in PROBLEMS]
    cue = tok.encode(ev.FORCE_CUE, add_special_tokens=False)
    script = [tok.convert_tokens_to_ids(t) for t in SCRIPT]
    ro, forced = ev.budget_force(model, tok, prompts, 2, budget=3, answer_budget=40, temperature=0.6, top_p=0.95,
                                 seeds=[0, 1, 2], eos=(2,))
    assert forced.all() and ro.finished.all()
    for i in range(6):  # "Wai" | cue | the model starts again after the cue's "\n" and answers
        assert ro.tokens[i, :ro.lengths[i]].tolist() == script[:3] + cue + script
    # thinking already closed at B=7 ("Wait, </think>"): no cue, the answer just continues
    ro, forced = ev.budget_force(model, tok, prompts, 1, budget=7, answer_budget=40, temperature=0.6, top_p=0.95,
                                 seeds=[0, 1, 2], eos=(2,))
    assert not forced.any() and all(ro.tokens[i, :ro.lengths[i]].tolist() == script for i in range(3))
    res = ev.evaluate(model, tok, PROBLEMS, samples=2, max_new_tokens=40, budget=3, answer_budget=40)
    assert res["forced_rate"] == 1.0 and res["mean_length"] == 3 + len(cue) + 17  # all output tokens count
    assert res["accuracy"] == pytest.approx(2 / 3)  # graded on the answer after the cue


def test_budget_forcing_keeps_the_sampled_prefix(random_model):
    model, tok = random_model
    prompts = [ev.build_prompt(tok, p["problem"], None, "") for p in PROBLEMS]
    cue = tok.encode(ev.FORCE_CUE, add_special_tokens=False)
    plain = generate(model, prompts, 2, 5, temperature=1.0, eos_ids=(2,), seed=[7, 8, 9])
    ro, forced = ev.budget_force(model, tok, prompts, 2, 5, 8, temperature=1.0, top_p=1.0, seeds=[7, 8, 9],
                                 eos=(2,))
    assert forced.any()
    for i in range(6):
        L = int(plain.lengths[i])
        assert ro.tokens[i, :L].tolist() == plain.tokens[i, :L].tolist()  # same draw up to B
        if forced[i]:
            assert L == 5 and ro.tokens[i, 5:5 + len(cue)].tolist() == cue
            assert 5 + len(cue) < ro.lengths[i] <= 5 + len(cue) + 8
        elif plain.finished[i]:
            assert ro.lengths[i] == L


def test_reasoning_perplexity_matches_one_sequence_at_a_time(random_model, scripted):
    model, tok = random_model
    texts = ["Wait, 3+4=7 </think> \\boxed{7}", "ok", "Hmm, let me think a little longer here"]
    batched = ev.reasoning_nll(model, tok, texts, max_tokens=120, chunk=5)  # two batches, several chunks
    with torch.no_grad():
        for t, (nll, n) in zip(texts, batched):
            ids = torch.tensor([[1] + tok.encode(t.split("</think>")[0], add_special_tokens=False)])
            logp = model(ids).log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])
            assert n == ids.size(1) - 1 and nll == pytest.approx(float(-logp.sum()), rel=1e-5)
    # the scripted model is certain of its own reasoning: perplexity 1
    smodel, stok = scripted
    res = ev.evaluate(smodel, stok, PROBLEMS[:1], samples=2, max_new_tokens=40, ref=(smodel, stok))
    assert res["perplexity"] == pytest.approx(1.0, abs=1e-3)
    res = ev.evaluate(model, tok, PROBLEMS[:1], samples=2, max_new_tokens=40, ref=(smodel, stok))
    assert res["perplexity"] > 10


def test_benchmark_names_and_paper_sample_counts(tmp_path):
    assert ev.benchmark_path("aime24") == ev.DATA_DIR / "aime24.jsonl"
    assert ev.benchmark_path(str(tmp_path / "mine.jsonl")) == tmp_path / "mine.jsonl"
    assert ev.samples_for("aime24") == ev.samples_for("amc23") == 64
    assert ev.samples_for("math500") == ev.samples_for("/x/minerva.jsonl") == 16
    assert ev.DATA_DIR.joinpath("aime24.jsonl").is_file()


def test_cli_two_checkpoints_writes_json_markdown_and_records(tmp_path):
    a, b = save_scripted_model(tmp_path / "a"), save_random_model(tmp_path / "b")
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    out = tmp_path / "out"
    subprocess.run([sys.executable, "eval.py", f"--ckpt={a},{b}", f"--data={data}", "--samples=2",
                    "--max_new_tokens=20", "--budget=3", "--answer_budget=30", f"--ref={a}",
                    f"--out={out}"], check=True, cwd=Path(ev.__file__).parent, capture_output=True)
    runs = json.loads((out / "eval.json").read_text())["runs"]
    assert [(Path(r["ckpt"]).name, r["budget"]) for r in runs] == [("a", None), ("a", 3), ("b", None), ("b", 3)]
    assert runs[0]["accuracy"] == pytest.approx(2 / 3) and runs[0]["perplexity"] == pytest.approx(1.0, abs=1e-3)
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 3 * 2 and json.loads(lines[0])["text"] == SCRIPT_TEXT
    md = (out / "eval.md").read_text()
    assert f"{a} /compl" in md and f"{b} /compl" in md  # before/after side by side
    assert "| Wait | 1.00 | 58.82 |" in md


def test_cli_rejects_bad_arguments_before_loading_a_model(tmp_path, capsys):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    missing = tmp_path / "no_model"  # never loaded: each error below comes first
    with pytest.raises(FileNotFoundError, match="nosuch.jsonl"):
        ev.main([f"--ckpt={missing}", f"--data={data},nosuch", f"--out={tmp_path / 'out'}"])
    for bad in ("--n_problems=0", "--budget=5,x"):
        with pytest.raises(ValueError) as e:
            ev.main([f"--ckpt={missing}", f"--data={data}", f"--out={tmp_path / 'out'}", bad])
        assert bad[2:].split("=")[0] in str(e.value)


@pytest.mark.slow
def test_torchrun_two_ranks_gather_every_problem_back_in_order(tmp_path):
    a = save_random_model(tmp_path / "a", seed=1)
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"{i}+1", "answer": str(i + 1)}) + "\n"
                            for i in range(5)))
    common = [f"--ckpt={a}", f"--data={data}", "--samples=2", "--max_new_tokens=12"]
    repo = Path(ev.__file__).parent
    subprocess.run([sys.executable, "eval.py", *common, f"--out={tmp_path / 'one'}"], check=True, cwd=repo,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "eval.py",
                    *common, f"--out={tmp_path / 'two'}"], check=True, cwd=repo, capture_output=True)
    one = json.loads((tmp_path / "one" / "eval.json").read_text())["runs"][0]
    two = json.loads((tmp_path / "two" / "eval.json").read_text())["runs"][0]
    assert two["n_completions"] == one["n_completions"] == 10
    assert [p["id"] for p in two["problems"]] == [f"p{i}" for i in range(5)]  # gathered back in order
    recs = [json.loads(line) for line in (tmp_path / "two" / "records.jsonl").read_text().splitlines()]
    assert [r["problem_id"] for r in recs] == [f"p{i}" for i in range(5) for _ in range(2)]
    assert math.isclose(sum(r["length"] for r in recs) / 10, two["mean_length"])
    # sampling is seeded per problem: the same completions as the one-process run, so the same numbers
    alone = [json.loads(line) for line in (tmp_path / "one" / "records.jsonl").read_text().splitlines()]
    assert [r["text"] for r in recs] == [r["text"] for r in alone] and len({r["text"] for r in recs}) > 1
    assert two["mean_length"] == one["mean_length"] and two["accuracy"] == one["accuracy"]
