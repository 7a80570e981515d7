"""
A Qwen2-family decoder in plain PyTorch, read from and written to Hugging Face checkpoint directories.

This is the architecture of DeepSeek-R1-Distill-Qwen-1.5B/7B and Qwen2.5: RMSNorm, rotary position
embeddings (RoPE), grouped-query attention with a bias on q/k/v, a SwiGLU MLP, and a tied or untied
output head. Module and parameter names follow transformers' Qwen2 (`layers.0.self_attn.q_proj`), so a
checkpoint loads by stripping the `model.` prefix and nothing else.

    model = Transformer.from_pretrained("path/to/DeepSeek-R1-Distill-Qwen-1.5B")  # bf16 on GPU, fp32 on CPU
    logits = model(input_ids)                                                      # (B, T, V)
    model.save_pretrained("out/")                                                  # transformers/vLLM load this

Choices:
- One forward serves training and sampling. `position_ids` are explicit so padded and packed rows get the
  right RoPE; `mask` is a boolean (B, 1, T, S) "may attend" mask; `cache` is a static `KVCache` that the
  forward writes in place at the rows' positions (gpt-fast style: fixed shapes, so a decode step compiles).
  A cache without a mask is a prefill: T new tokens from position 0 into a cache of length T, causal.
  That is what lets a prefill use flash attention: on CUDA, SDPA with a mask and GQA falls back to its
  math kernel, which holds the (B, heads, T, T) scores.
- In a cache row the sequence always starts at index 0 and position == cache index, so each row of a
  batch can be at its own length (the sampler relies on this for continuous batching).
- Attention is torch SDPA. On CUDA with flash-attn installed and a 16-bit dtype, mask-free causal
  attention and packed sequences (`cu_seqlens`, padding-free training) go to flash-attn; elsewhere a packed batch gets a
  block-diagonal causal mask. Both give the same outputs to tolerance. A decode step on the CPU over a
  short cache attends with two batched matmuls instead (see DECODE_MATMUL_MAX_LEN).
- The linear layers are nn.Linear with one addition: inside `packed_weights` (the sampler on the CPU in
  fp32) they multiply by a copy of their weight packed for oneDNN, whose GEMM ran 1.8-2.6x faster than
  MKL's on the AMD EPYC this was measured on.
- RoPE angles are computed in fp32 from the positions on every call (cheap next to the matmuls) rather
  than kept in a buffer that `.to(bfloat16)` would round.
- Loading builds the model on the meta device and assigns each tensor straight from safetensors, so a
  7B checkpoint is never materialised twice. Sliding-window attention and RoPE scaling are not
  implemented; a config asking for them is refused rather than run wrongly.
"""

import json
import math
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

try:  # GPU only; absent on CPU machines
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None

# Files that travel with a checkpoint so that transformers can rebuild the tokenizer and chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")

# A CPU decode step attends with two batched matmuls up to this many cache positions, with SDPA beyond
# (128 rows, 2 threads, AMD EPYC: the matmuls were 1.1-2x faster at 128-256 positions, level or faster
# at 384-768, 1.4x slower at 1024).
DECODE_MATMUL_MAX_LEN = 512


def device_and_dtype(device=None):
    """The device to run on and its training/sampling dtype: bf16 on CUDA, fp32 on CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf_config(cls, cfg: dict, where: str = "config.json") -> "ModelArgs":
        if cfg.get("model_type") != "qwen2":
            raise ValueError(f"{where}: model_type {cfg.get('model_type')!r} is not supported (only 'qwen2')")
        if cfg.get("use_sliding_window"):
            raise ValueError(f"{where}: use_sliding_window=true is not supported")
        # transformers 5 writes rope_parameters; older checkpoints (R1-Distill) write rope_theta/rope_scaling
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{where}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        try:
            return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                       intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                       num_attention_heads=cfg["num_attention_heads"],
                       num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                       head_dim=cfg.get("head_dim") or 0, rope_theta=float(theta),
                       rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                       tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                       max_position_embeddings=cfg.get("max_position_embeddings", 32768),
                       bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))
        except KeyError as e:
            raise ValueError(f"{where}: missing key {e.args[0]!r}") from None

    def to_hf_config(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rope_theta"}
        d.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                 use_sliding_window=False, attention_dropout=0.0)
        return d


class KVCache:
    """Preallocated keys and values for every layer: k, v are (n_layer, B, n_kv_head, S, head_dim).
    A forward over b rows reads rows [:b] and cache indices [:length] only; the sampler sets `length` to
    the prefix in use (by default all S)."""

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int, device=None, dtype=torch.float32):
        shape = (args.num_hidden_layers, batch_size, args.num_key_value_heads, max_seq_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = max_seq_len
        self.layers = torch.arange(args.num_hidden_layers, device=device)

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv, T, hd) of row b at cache indices pos[b, :]; return the layer's keys and
        values (B, n_kv, length, hd)."""
        B = k.size(0)
        # One index_put_ into the whole buffer (the layer is a tensor index, not a view): torch.compile
        # keeps that in place, where a write into the view self.k[layer] became a copy of the layer's cache.
        idx = (self.layers[layer:layer + 1], torch.arange(B, device=k.device)[:, None], slice(None), pos)
        self.k[idx] = k.transpose(1, 2)  # (B, T, n_kv, hd): the advanced-index dims come first
        self.v[idx] = v.transpose(1, 2)
        return self.k[layer, :B, :, :self.length], self.v[layer, :B, :, :self.length]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32: bf16 sums of squares lose the small components
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_angles(pos: torch.Tensor, head_dim: int, theta: float):
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T), computed in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    ang = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    ang = torch.cat((ang, ang), dim=-1)[:, None]  # (B, 1, T, hd): Qwen rotates the two halves, not pairs
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def packed_causal_mask(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """Block-diagonal causal mask (1, 1, T, T) for sequences packed back to back in one row."""
    doc = torch.bucketize(torch.arange(T, device=cu_seqlens.device), cu_seqlens[1:].long(), right=True)
    causal = torch.ones(T, T, dtype=torch.bool, device=cu_seqlens.device).tril()
    return (causal & (doc[:, None] == doc[None, :]))[None, None]


class Linear(nn.Linear):
    """nn.Linear that can run from a copy of its weight prepacked for oneDNN (Transformer.packed_weights)."""
    packed = None  # an opaque mkldnn tensor while packed

    def forward(self, x):
        if self.packed is None or torch.is_grad_enabled():  # the packed op has no gradient for the weight
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.q_proj = Linear(args.hidden_size, self.nh * self.hd, bias=True)
        self.k_proj = Linear(args.hidden_size, self.nkv * self.hd, bias=True)
        self.v_proj = Linear(args.hidden_size, self.nkv * self.hd, bias=True)
        self.o_proj = Linear(self.nh * self.hd, args.hidden_size, bias=False)

    def forward(self, x, cos, sin, pos, mask, cache, cu_seqlens):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, pos, k, v)  # (B, nkv, S, hd)
        if flash_attn_func is not None and x.is_cuda and x.dtype != torch.float32 and mask is None:
            y = self._flash(q, k, v, cu_seqlens)
        elif T == 1 and mask is not None and cu_seqlens is None:
            # a decode step: the nh/nkv query heads that share a kv head go in as that head's query rows
            # (all see the row's one mask), so there is no GQA expansion
            q = q.reshape(B, self.nkv, self.nh // self.nkv, self.hd)  # (B, nkv, nh/nkv, hd)
            if x.device.type != "cpu" or k.size(2) > DECODE_MATMUL_MAX_LEN:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:  # CPU, short cache: SDPA's kernel pays per (row, kv head); two batched matmuls do not
                s = (q @ k.transpose(2, 3)).mul_(self.hd ** -0.5)  # (B, nkv, nh/nkv, S)
                y = s.masked_fill_(~mask, float("-inf")).softmax(-1) @ v
            y = y.reshape(B, self.nh, 1, self.hd)
        else:
            if cu_seqlens is not None:
                mask = packed_causal_mask(cu_seqlens, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.nkv != self.nh)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hd)  # (B, T, nh*hd)
        return self.o_proj(y)

    def _flash(self, q, k, v, cu_seqlens):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn wants (B, T, heads, hd)
        if cu_seqlens is None:
            return flash_attn_func(q, k, v, causal=True).transpose(1, 2)
        if q.size(0) != 1:
            raise ValueError(f"packed sequences (cu_seqlens) go in one row, got a batch of {q.size(0)}")
        cu = cu_seqlens.to(q.device, torch.int32)  # what flash-attn accepts
        max_len = int((cu[1:] - cu[:-1]).max())
        y = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, max_len, max_len, causal=True)
        return y[None].transpose(1, 2)  # (1, nh, T, hd)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, pos, mask, cache, cu_seqlens):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, mask, cache, cu_seqlens)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.hf_config: dict = {}  # the config.json this model was loaded from, written back on save
        self.source_dir: str | None = None  # where the tokenizer files are

    def init_weights(self, std: float = 0.02, seed: int = 0):
        """Random init for models trained from scratch (the embedded demo); real runs load weights."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:  # scale residual projections down with depth, as GPT-2 does
                    s = std / math.sqrt(2 * self.args.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=g) * s)
        return self

    @contextmanager
    def packed_weights(self, rows: int):
        """For inference in fp32 on the CPU: for the duration, every linear layer run without autograd
        multiplies by a copy of its weight prepacked in oneDNN's blocked layout for GEMMs of about `rows`
        rows (a second copy of the weights in memory). The weights must not change inside. Why: on the AMD
        EPYC (Zen 5) this was measured on, the MKL fp32 GEMM that F.linear calls ran 1.8-2.6x slower than
        oneDNN's packed one at 128-2048 rows and the 40M bench model's layer shapes (not measured on Intel
        CPUs); both are fp32 throughout (max error against fp64 at K=512: oneDNN ~5e-6, MKL ~2e-6). A no-op elsewhere
        (CUDA, bf16, FSDP-sharded weights, a torch without these oneDNN ops). torch.compile cannot trace the
        packed tensors: a compiled forward must run outside this context."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and all(m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
                        and not isinstance(m.weight, DTensor) for m in linears)):
            yield
            return
        try:
            for m in linears:
                m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows)
            yield
        finally:
            for m in linears:
                m.packed = None

    def forward(self, input_ids, position_ids=None, mask=None, cache: KVCache | None = None, cu_seqlens=None,
                logits_at: torch.Tensor | None = None):
        """input_ids (B, T) -> logits (B, T, V). See the module docstring for position_ids, mask, cache, cu_seqlens.
        logits_at (B, k): only these positions go through the head -> logits (B, k, V). A sampler's prefill
        needs one position per prompt, and the head's (B, T, V) output dwarfs everything else at 152k vocab."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        if cache is not None and mask is None and cache.length != T:
            raise ValueError(f"a KV cache without a mask is a prefill, so its length must be T={T} (it is "
                             f"{cache.length}); give a mask (B, 1, T, S) to attend over a longer cache")
        cos, sin = rope_angles(position_ids, self.args.head_dim, self.args.rope_theta)
        x = self.embed_tokens(input_ids)
        for block in self.layers:
            x = block(x, cos, sin, position_ids, mask, cache, cu_seqlens)
        if logits_at is not None:
            x = x.gather(1, logits_at[:, :, None].expand(-1, -1, x.size(-1)))  # (B, k, H)
        return self.lm_head(self.norm(x))

    # ---- Hugging Face checkpoint directories -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "Transformer":
        """Load config.json + model.safetensors (or shards + model.safetensors.index.json) from `path`.
        Defaults: the first CUDA device in bf16 when there is one, else CPU in fp32."""
        path = Path(path)
        device, default_dtype = device_and_dtype(device)
        dtype = dtype or default_dtype
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file}: not found (is {path} a Hugging Face checkpoint directory?)")
        try:
            hf_config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
        args = ModelArgs.from_hf_config(hf_config, where=str(cfg_file))
        with torch.device("meta"):
            model = cls(args)
        expected = dict(model.state_dict())
        if args.tie_word_embeddings:
            expected.pop("lm_head.weight")
        state = {}
        for file, keys in _weight_files(path).items():
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for hf_key in keys or f.keys():
                    key = hf_key.removeprefix("model.")
                    if key not in expected:
                        if key == "lm_head.weight" or key.endswith("rotary_emb.inv_freq"):
                            continue  # tied duplicate / old transformers buffer: not parameters of ours
                        raise ValueError(f"{file}: unexpected tensor {hf_key!r} for a qwen2 model")
                    t = f.get_tensor(hf_key)
                    if t.shape != expected[key].shape:
                        raise ValueError(f"{file}: tensor {hf_key!r} has shape {tuple(t.shape)}, "
                                         f"config.json implies {tuple(expected[key].shape)}")
                    state[key] = t.to(dtype)
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        model.load_state_dict(state, strict=False, assign=True)
        if args.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.hf_config, model.source_dir = hf_config, str(path)
        return model

    def save_pretrained(self, path, state_dict=None, max_shard_bytes: int = 5 * 2**30):
        """Write an HF checkpoint dir: config.json, model.safetensors (sharded with an index above
        max_shard_bytes) and the tokenizer files of `source_dir`. `state_dict` is for a full state dict
        gathered from FSDP; by default the module's own."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        tensors = {}
        for k, t in sd.items():
            if k == "lm_head.weight" and self.args.tie_word_embeddings:
                continue
            tensors[k if k.startswith("lm_head") else "model." + k] = t.detach().to("cpu").contiguous()
        dtype = next(iter(tensors.values())).dtype
        shards, cur, size = [], {}, 0
        for k, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = t, size + nbytes
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(path / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": weight_map}
            (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        cfg = {**self.hf_config, **self.args.to_hf_config(), "dtype": str(dtype).removeprefix("torch.")}
        cfg.pop("rope_theta", None), cfg.pop("rope_scaling", None), cfg.pop("torch_dtype", None)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        if self.source_dir and Path(self.source_dir).resolve() != path.resolve():
            for name in TOKENIZER_FILES:
                if (Path(self.source_dir) / name).is_file():
                    shutil.copy2(Path(self.source_dir) / name, path / name)


def _weight_files(path: Path) -> dict:
    """{safetensors file: [keys to read from it] or None for all} for a checkpoint directory."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = {}
        for key, name in weight_map.items():
            files.setdefault(path / name, []).append(key)
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: listed in {index.name} but missing")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return {single: None}

