"""
A Qwen2-family decoder in plain PyTorch, read from and written to Hugging Face checkpoint directories.

The architecture of DeepSeek-R1-Distill-Qwen-1.5B/7B and Qwen2.5: RMSNorm, RoPE, grouped-query
attention with a bias on q/k/v, a SwiGLU MLP, a tied or untied head. Parameter names follow
transformers' Qwen2, so a checkpoint loads by stripping the `model.` prefix and nothing else.

    model = Transformer.from_pretrained("path/to/DeepSeek-R1-Distill-Qwen-1.5B")  # bf16 on GPU, fp32 on CPU
    logits = model(input_ids)                                   # (B, T, V)
    logp, entropy = model(input_ids, targets=targets)           # (B, k): log-probs of the next tokens
    model.save_pretrained("out/")                               # transformers and vLLM load this

Choices:
- One forward serves training and sampling. `position_ids` are explicit so padded rows get the right
  RoPE; `mask` is a boolean (B, 1, T, S) "may attend" mask; `cache` is a static `KVCache` written in
  place at the rows' positions (gpt-fast style: fixed shapes, so a decode step compiles). In a cache row
  position == cache index, so each row can be at its own length. A cache without a mask is a prefill
  (causal, from position 0), which lets it use flash attention.
- With `targets`, the forward returns fp32 log-probs and entropies instead of logits, computing the head
  and the log-softmax over `chunk` positions of one row at a time under activation checkpointing: the
  (B, T, V) logits and their gradient never exist (at 152k vocabulary they dwarf the model's activations).
- Attention is torch SDPA; on CUDA with flash-attn and a 16-bit dtype, causal and packed (`cu_seqlens`)
  attention go to flash-attn, and a decode step to `flash_attn_with_kvcache`, which writes the new keys and
  values and reads each row's own length of the cache only. RoPE angles are computed in fp32 from the
  positions on every call.
- Loading builds the model on the meta device and assigns each tensor straight from safetensors. Sliding
  windows and RoPE scaling are refused rather than run wrongly.
- Two CPU speed paths for sampling sit in a fenced section at the end of the file (a reader can skip it).
"""

import json
import math
import shutil
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

try:  # GPU only; absent on CPU machines
    from flash_attn import (
        flash_attn_func,
        flash_attn_varlen_func,
        flash_attn_with_kvcache,
    )
except (ImportError, OSError) as e:  # installed but broken (often a build for another torch): say so
    if getattr(e, "name", None) != "flash_attn":
        warnings.warn(f"flash-attn is installed but does not import ({e}); attention falls back to torch SDPA")
    flash_attn_func = flash_attn_varlen_func = flash_attn_with_kvcache = None

# Files that travel with a checkpoint so that transformers can rebuild the tokenizer and chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")

def attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """Which kernel runs prefill and training attention here, for the start-up line of every entry point."""
    if device.type == "cuda" and dtype != torch.float32 and flash_attn_func is not None:
        import flash_attn
        return f"flash-attn {flash_attn.__version__}"
    why = "not installed" if flash_attn_func is None else ("fp32" if device.type == "cuda" else "CPU")
    return f"torch SDPA (flash-attn: {why})"


def flash_decode(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode steps over a KV cache on this device in this dtype run flash_attn_with_kvcache."""
    return flash_attn_with_kvcache is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


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
    the prefix in use (by default all S). With `flash`, a decode step reads each row's positions up to its
    own instead, whatever `length` is (flash_attn_with_kvcache)."""

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int, device=None, dtype=torch.float32):
        shape = (args.num_hidden_layers, batch_size, args.num_key_value_heads, max_seq_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = max_seq_len
        self.layers = torch.arange(args.num_hidden_layers, device=device)
        self.flash = flash_decode(self.k.device, dtype)

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


def logprobs(logits, targets, temperature: float = 1.0, entropy_grad: bool = False):
    """logits (..., V) in any dtype, targets (...) -> log-probs of the targets and entropies (...) in fp32,
    of softmax(logits / temperature): the sampler's distribution, so an importance ratio starts at 1."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, -1)
    logp = z.gather(-1, targets[..., None])[..., 0] - lse
    with nullcontext() if entropy_grad else torch.no_grad():
        entropy = lse - (torch.softmax(z, -1) * z).sum(-1)
    return logp, entropy


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
        decode = T == 1 and mask is not None and cu_seqlens is None
        if decode and cache is not None and cache.flash:
            return self.o_proj(self._flash_decode(q, k, v, pos, cache).reshape(B, T, self.nh * self.hd))
        if cache is not None:
            k, v = cache.update(self.layer, pos, k, v)  # (B, nkv, S, hd)
        if flash_attn_func is not None and x.is_cuda and x.dtype != torch.float32 and mask is None:
            y = self._flash(q, k, v, cu_seqlens)
        elif decode:
            # a decode step: the nh/nkv query heads that share a kv head go in as that head's query rows
            # (all see the row's one mask), so there is no GQA expansion
            q = q.reshape(B, self.nkv, self.nh // self.nkv, self.hd)  # (B, nkv, nh/nkv, hd)
            y = (cpu_decode_attention(q, k, v, mask) if x.device.type == "cpu" and k.size(2) <= DECODE_MATMUL_MAX_LEN
                 else F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
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

    def _flash_decode(self, q, k, v, pos, cache):
        """A decode step, q (B, nh, 1, hd), k/v (B, nkv, 1, hd): flash-attn writes k, v into the cache at each
        row's position and attends over positions [0, pos] of that row only (the mask the SDPA path builds),
        so padding and idle slots (position 0) cost nothing. GQA is native. Returns (B, 1, nh, hd)."""
        B = q.size(0)
        kc, vc = (c[self.layer, :B].transpose(1, 2) for c in (cache.k, cache.v))  # (B, S, nkv, hd) views, strided
        return flash_attn_with_kvcache(q.transpose(1, 2), kc, vc, k.transpose(1, 2), v.transpose(1, 2),
                                       cache_seqlens=pos[:, 0].to(torch.int32))  # entries before the new one


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

    def forward(self, input_ids, position_ids=None, mask=None, cache: KVCache | None = None, cu_seqlens=None,
                logits_at=None, targets=None, temperature: float = 1.0, chunk: int = 1024, entropy_grad: bool = False):
        """input_ids (B, T) -> logits (B, T, V). See the module docstring for position_ids, mask, cache, cu_seqlens.
        logits_at (B, k): only these positions go through the head -> logits (B, k, V) (a sampler's prefill).
        targets (B, k): the tokens that follow the last k positions -> (log-probs, entropies), each (B, k) fp32,
        of softmax(logits / temperature), computed `chunk` positions at a time (module docstring); the
        entropies carry a gradient only with entropy_grad."""
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
        if targets is None:
            return self.lm_head(self.norm(x))
        x = x[:, T - targets.size(1):]  # (B, k, H)
        logp, entropy = [], []
        for b in range(B):
            out = []
            for s in range(0, targets.size(1), chunk):
                args = (x[b, s:s + chunk], targets[b, s:s + chunk], temperature, entropy_grad)  # (C, H), (C,)
                out.append(checkpoint(self._head_logprobs, *args, use_reentrant=False)
                           if torch.is_grad_enabled() else self._head_logprobs(*args))
            logp.append(torch.cat([lp for lp, _ in out]))
            entropy.append(torch.cat([ent for _, ent in out]))
        return torch.stack(logp), torch.stack(entropy)  # (B, k) each

    def _head_logprobs(self, h, targets, temperature, entropy_grad):
        return logprobs(self.lm_head(self.norm(h)), targets, temperature, entropy_grad)

    # ---- Hugging Face checkpoint directories -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "Transformer":
        """Load config.json + model.safetensors (or shards + model.safetensors.index.json) from `path`.
        Defaults: the first CUDA device in bf16 when there is one, else CPU in fp32."""
        path = Path(path)
        check_dir(path, tokenizer=False)
        device, default_dtype = device_and_dtype(device)
        dtype = dtype or default_dtype
        cfg_file = path / "config.json"
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


def check_dir(path, tokenizer: bool = True):
    """Before anything loads from `path`: it is a directory with config.json, weights (model.safetensors or
    an index) and, with `tokenizer`, tokenizer_config.json and a vocabulary (tokenizer.json, vocab.json or
    tokenizer.model); else FileNotFoundError naming the directory and everything missing (transformers
    would say "Repo id must be in the form ..." for a missing dir, or fail inside the tokenizer)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory (a Hugging Face checkpoint dir: config.json, "
                                f"model.safetensors, tokenizer files)")
    wanted = [("config.json",), ("model.safetensors", "model.safetensors.index.json")]
    if tokenizer:
        wanted += [("tokenizer_config.json",), ("tokenizer.json", "vocab.json", "tokenizer.model")]
    missing = [" or ".join(names) for names in wanted if not any((path / n).is_file() for n in names)]
    if missing:
        raise FileNotFoundError(f"{path}: not a complete model directory, missing {', '.join(missing)}")


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


# ==== CPU speed paths for sampling: skip on a first reading =================================================
# Sampling on the CPU in fp32 spends its time in GEMMs of ~rows x hidden and in attention of one query row
# per sequence. Two paths make that faster (bench/README.md has the measurements); neither changes what
# is computed beyond float rounding, neither is used on CUDA or under autograd.

# A CPU decode step attends with two batched matmuls up to this many cache positions, with SDPA beyond:
# SDPA's CPU kernel pays per (row, kv head), which dominates at short caches and not at long ones.
DECODE_MATMUL_MAX_LEN = 512


def cpu_decode_attention(q, k, v, mask):
    """q (B, nkv, g, hd) (the g query heads that share a kv head), k/v (B, nkv, S, hd), mask (B, 1, 1, S)."""
    s = (q @ k.transpose(2, 3)).mul_(q.size(-1) ** -0.5)  # (B, nkv, g, S)
    return s.masked_fill_(~mask, float("-inf")).softmax(-1) @ v


class Linear(nn.Linear):
    """nn.Linear that can run from a copy of its weight prepacked for oneDNN (`packed_weights`)."""
    packed = None  # an opaque mkldnn tensor while packed

    def forward(self, x):
        if self.packed is None or torch.is_grad_enabled():  # the packed op has no gradient for the weight
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


@contextmanager
def packed_weights(model: Transformer, rows: int):
    """For the duration, every linear layer of `model` run without autograd multiplies by a copy of its
    weight prepacked in oneDNN's blocked layout for GEMMs of about `rows` rows (fp32 throughout; the copy
    doubles the weights' memory; the weights must not change inside). oneDNN's packed GEMM is faster than
    the MKL GEMM that F.linear calls on the CPUs we measured. A no-op on CUDA, in bf16, for FSDP-sharded
    weights and on a torch without these ops. torch.compile cannot trace the packed tensors."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
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
