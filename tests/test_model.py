"""model.py against transformers' Qwen2ForCausalLM: same logits, checkpoints that load both ways,
and clear errors for broken checkpoint directories."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

import model as model_module
from model import KVCache, Linear, ModelArgs, Transformer, packed_weights

# (tied head, q heads, kv heads, hidden, intermediate, layers, vocab, rope theta): odd sizes on purpose
SHAPES = [
    (True, 4, 2, 64, 136, 2, 211, 1e6),
    (False, 4, 2, 48, 100, 3, 97, 1e4),
    (False, 6, 1, 72, 64, 1, 130, 5e5),
    (True, 2, 2, 32, 50, 2, 64, 1e6),
]


def hf_model(tied, nh, nkv, hidden, inter, layers, vocab, theta, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=nh, num_key_value_heads=nkv, tie_word_embeddings=tied,
                      rope_parameters={"rope_type": "default", "rope_theta": theta}, max_position_embeddings=512)
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits biases to zero; randomise them so the q/k/v bias is really tested
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def tokens(vocab, B=2, T=17, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES)
def test_transformers_checkpoint_loads_with_same_logits(shape, tmp_path):
    ref = hf_model(*shape)
    ref.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path, device="cpu")
    x = tokens(shape[6])
    at = torch.tensor([[16, 0, 5], [3, 3, 9]])  # (B, k) positions for logits_at, repeats allowed
    with torch.no_grad():
        full = ref(x).logits  # (B, T, V)
        torch.testing.assert_close(ours(x), full, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours(x, logits_at=at), full.gather(1, at[:, :, None].expand(-1, -1, full.size(-1))),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_our_checkpoint_loads_in_transformers(shape, tmp_path):
    hf_model(*shape).save_pretrained(tmp_path / "src")
    ours = Transformer.from_pretrained(tmp_path / "src")
    with torch.no_grad():  # change the weights so the round trip cannot pass by reading the source
        for p in ours.parameters():
            p.mul_(1.5)
    ours.save_pretrained(tmp_path / "out")
    back = Qwen2ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    x = tokens(shape[6])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x), atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_round_trips(tmp_path):
    src = hf_model(*SHAPES[1])
    src.save_pretrained(tmp_path / "src")
    ours = Transformer.from_pretrained(tmp_path / "src")
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    again = Transformer.from_pretrained(tmp_path / "sharded")
    hf = Qwen2ForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32).eval()
    x = tokens(SHAPES[1][6])
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x), atol=0, rtol=0)
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=1e-4)


def test_old_style_rope_theta_key_is_read(tmp_path):
    """R1-Distill's config.json says rope_theta at top level, not rope_parameters."""
    hf_model(*SHAPES[0]).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    cfg["rope_theta"] = theta
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert Transformer.from_pretrained(tmp_path).args.rope_theta == theta == 1e6


def test_tokenizer_files_travel_with_the_checkpoint(tmp_path):
    hf_model(*SHAPES[3]).save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    Transformer.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"chat_template": "x"}'


def test_padded_rows_and_packed_rows_match_single_sequences():
    model = Transformer(ModelArgs(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)).init_weights().eval()
    a, b = tokens(50, 1, 9, seed=2), tokens(50, 1, 5, seed=3)
    with torch.no_grad():
        la, lb = model(a), model(b)
        # right-padded batch: plain causal attention leaves the real tokens untouched
        padded = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)])
        out = model(padded)
        torch.testing.assert_close(out[1:, :5], lb, atol=1e-5, rtol=1e-5)
        # packed: one row, positions restart, block-diagonal attention
        packed = torch.cat([a, b], 1)
        pos = torch.cat([torch.arange(9), torch.arange(5)])[None]
        cu = torch.tensor([0, 9, 14], dtype=torch.int32)
        out = model(packed, position_ids=pos, cu_seqlens=cu)
        torch.testing.assert_close(out[:, :9], la, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 9:], lb, atol=1e-5, rtol=1e-5)


def test_mask_free_prefill_fills_the_cache_like_a_masked_one(tmp_path):
    """A cache without a mask is a causal prefill from position 0 (the path flash attention takes on CUDA):
    same logits and same cache as the masked prefill; a cache longer than T still needs the mask."""
    model = Transformer.from_pretrained(_saved(tmp_path))
    x = tokens(64, 2, 9, seed=5)
    plain, masked = KVCache(model.args, 2, 9), KVCache(model.args, 2, 9)
    with torch.no_grad():
        out = model(x, cache=plain)
        causal = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 1, 9, 9)
        ref = model(x, position_ids=torch.arange(9).expand(2, 9), mask=causal, cache=masked)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain.k, masked.k)
        torch.testing.assert_close(plain.v, masked.v)
        with pytest.raises(ValueError, match="length must be T=9"):
            model(x, cache=KVCache(model.args, 2, 16))


@pytest.mark.parametrize("attention", ["matmul", "sdpa"])
def test_kv_cache_decode_matches_full_forward(tmp_path, monkeypatch, attention):
    """Prefill rows of different lengths into a static cache, then decode one token per row at a time,
    with either decode attention (on the CPU: two batched matmuls for a short cache, SDPA beyond)."""
    if attention == "sdpa":
        monkeypatch.setattr(model_module, "DECODE_MATMUL_MAX_LEN", 0)
    model = Transformer.from_pretrained(_saved(tmp_path))
    x = tokens(64, 2, 12, seed=4)
    lens = torch.tensor([7, 4])
    S = 16
    cache = KVCache(model.args, 2, S)
    with torch.no_grad():
        full = model(x)
        pos = torch.arange(7).expand(2, 7)  # prefill 7 positions; row 1 writes junk past its length 4
        mask = torch.arange(S)[None, None, None, :] <= pos[:, None, :, None]
        model(x[:, :7], position_ids=pos, mask=mask, cache=cache)
        cur = lens.clone()
        for _ in range(5):  # each row continues from its own length: junk in the cache is overwritten
            p = cur[:, None]
            tok = x.gather(1, p)
            out = model(tok, position_ids=p, mask=torch.arange(S)[None, None, None, :] <= p[:, None, :, None],
                        cache=cache)
            for b in range(2):
                torch.testing.assert_close(out[b, 0], full[b, cur[b]], atol=1e-4, rtol=1e-4)
            cur += 1


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")
def test_packed_weights_give_the_same_logits_and_go_on_exit(tmp_path):
    """Inside packed_weights every linear run without autograd uses a oneDNN-packed copy of its weight (same
    logits to fp32 rounding); with autograd on it uses the weight itself, so gradients reach it. On exit,
    also through an exception, the copies are gone. bf16 weights are not packed."""
    model = Transformer.from_pretrained(_saved(tmp_path))
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 7 * model.args.num_hidden_layers + 1
    x = tokens(64, 3, 11)
    with torch.no_grad():
        ref = model(x)
    with packed_weights(model, rows=3):
        assert all(m.packed is not None for m in linears)
        with torch.inference_mode():
            torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
        model(x).logsumexp(-1).mean().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in linears)
    with pytest.raises(RuntimeError, match="inside"), packed_weights(model, rows=3):
        raise RuntimeError("an error inside")
    assert all(m.packed is None for m in linears)
    with packed_weights(model.to(torch.bfloat16), rows=3):
        assert all(m.packed is None for m in linears)


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path)


def test_missing_weights_file_is_named(tmp_path):
    hf_model(*SHAPES[3]).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path):
    Transformer.from_pretrained(_saved(tmp_path)).save_pretrained(tmp_path / "sh", max_shard_bytes=5_000)
    victim = sorted((tmp_path / "sh").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        Transformer.from_pretrained(tmp_path / "sh")


def test_wrong_tensor_shape_names_the_key(tmp_path):
    d = _saved(tmp_path)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape"):
        Transformer.from_pretrained(d)


def test_missing_tensor_is_named(tmp_path):
    d = _saved(tmp_path)
    sd = load_file(d / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="norm.weight"):
        Transformer.from_pretrained(d)


@pytest.mark.parametrize("edit, match", [
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope type 'yarn'"),
])
def test_unsupported_config_is_refused_with_the_key(tmp_path, edit, match):
    d = _saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        Transformer.from_pretrained(d)


def test_bf16_load_keeps_dtype(tmp_path):
    m = Transformer.from_pretrained(_saved(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m(tokens(64)).dtype == torch.bfloat16


def _saved(tmp_path):
    d = tmp_path / "ckpt"
    hf_model(*SHAPES[0]).save_pretrained(d)  # GQA, tied head
    return d
