"""A lean causal LM for the Llama / Qwen2 / Qwen3 architectures, built from a loaded HF model.

Why: for the small models this project runs on CPU, a transformers forward spends most of its
time in Python (decorators, kwargs plumbing, output dataclasses, mask helpers, one module call
per projection), not in arithmetic. `LeanCausalLM` computes the same function with few tensor
ops per layer and nothing else, and is a drop-in for how `BatchKV.forward` calls a model:

    model(input_ids=[B, L], position_ids=[B, L], attention_mask=[B, 1, L, T+L] additive float,
          past_key_values=<transformers DynamicCache>, use_cache=True).logits   # [B, L, V]

K/V are appended to the DynamicCache exactly as HF does (`cache.layers[i].keys/values` are
[B, H_kv, T, D], RoPE applied before caching), so BatchKV's keep / compact / select_rows /
extend work unchanged. A cache with a `write_layer(idx, k, v)` method (ssd_core.static_kv.StaticKV)
instead gets each layer's new k / v to write in place and returns the K / V to attend over.

What it computes, layer by layer, as HF does: RMSNorm (fp32 statistics, weight * normed),
one fused q|k|v GEMM (+ biases: Qwen2), Qwen3's per-head q_norm / k_norm, RoPE from
precomputed cos/sin tables (HF's own inv_freq and attention scaling, so default, linear,
llama3 and yarn RoPE are exact), SDPA with the caller's additive mask (GQA heads repeated
as HF does), o_proj, RMSNorm, one fused gate|up GEMM, SiLU(gate) * up, down_proj; final norm
and the LM head (tied or not). Unsupported configs are refused with `UnsupportedModel`
naming the config field.

Weights: the fused q|k|v and gate|up matrices are new tensors; by default (`share=True`) the
HF model's q/k/v/gate/up parameters are then re-pointed at row views of them, so the HF model
still works (its `generate` is what `LeanCausalLM.generate` delegates to) and no weight is
held twice. Every other weight is the HF parameter itself.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3")
WEIGHT_FORMATS = ("float", "int8")  # LeanCausalLM.quantize: how a draft's linears are stored
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # inv_freq fixed at init (not per forward)


class UnsupportedModel(ValueError):
    """The HF model's config asks for something the lean backend does not implement."""

    def __init__(self, field: str, value, why: str) -> None:
        super().__init__(f"lean backend: unsupported {field}={value!r}: {why}; use backend='hf'")
        self.field = field


class LeanOutput(NamedTuple):
    logits: torch.Tensor
    past_key_values: object


def _cfg(config, name: str, default=None):
    return getattr(config, name, default)


def check_config(config) -> None:
    """Raise UnsupportedModel naming the first config field the lean model cannot honour."""
    model_type = _cfg(config, "model_type")
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedModel("model_type", model_type, f"only {', '.join(SUPPORTED_TYPES)} are implemented")
    act = _cfg(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel("hidden_act", act, "only silu (SwiGLU) is implemented")
    if _cfg(config, "use_sliding_window", False):
        raise UnsupportedModel("use_sliding_window", True, "sliding-window attention is not implemented")
    layer_types = _cfg(config, "layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModel("layer_types", sorted(set(layer_types)), "only full_attention layers are implemented")
    rope = _cfg(config, "rope_parameters") or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if isinstance(rope, dict) and any(isinstance(v, dict) for v in rope.values()):
        raise UnsupportedModel("rope_parameters", rope, "per-layer-type RoPE is not implemented")
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModel("rope_parameters.rope_type", rope_type,
                               f"RoPE must be static ({', '.join(STATIC_ROPE_TYPES)}); dynamic kinds change per forward")
    if _cfg(config, "pretraining_tp", 1) not in (None, 1):
        raise UnsupportedModel("pretraining_tp", config.pretraining_tp, "only 1 is implemented")


class _Layer:
    """One decoder layer's tensors (plain attributes: no module-call overhead)."""

    __slots__ = ("idx", "ln1", "wqkv", "bqkv", "qk_norm", "wo", "bo", "ln2", "wgu", "bgu", "wd", "bd")


class Int8Weight:
    """A linear's weight (and bias) packed for fbgemm's dynamic int8 GEMM: per-output-channel
    symmetric int8 weights, activations quantized per call (7-bit range, as torch's dynamic
    Linear does on x86 to avoid vpmaddubsw saturation). For a DRAFT only: its logits change by
    the rounding, which changes what it proposes, never what the target accepts (verification
    takes the draft's q as computed)."""

    __slots__ = ("packed", "out_features", "source")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.source = (weight, bias)  # the model's own float tensors (no copy): pickling repacks them
        w = weight.detach().float().contiguous()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # torch deprecates quantized tensors; 2.13 (pinned) has them
            warnings.simplefilter("ignore", UserWarning)
            qw = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float())
        self.out_features = w.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)

    def __reduce__(self):  # a model sent to a child process (spawn) packs its weights again there
        return (Int8Weight, self.source)


def int8_available() -> bool:
    """Whether this torch build has fbgemm's dynamic int8 GEMM (x86 CPU builds do)."""
    try:
        Int8Weight(torch.ones(2, 4), None)(torch.ones(1, 4))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class LeanCausalLM(nn.Module):
    """See the module docstring. Build with `LeanCausalLM.from_hf(hf_model)`."""

    supports_static_kv = True  # writes K/V through a cache's write_layer (ssd_core.static_kv)

    def __init__(self, hf_model: nn.Module, share: bool = True) -> None:
        super().__init__()
        config = hf_model.config
        check_config(config)
        self.config = config
        self.generation_config = getattr(hf_model, "generation_config", None)
        object.__setattr__(self, "hf", hf_model)  # not a submodule: parameters() lists each weight once
        base = hf_model.model
        first = base.layers[0].self_attn
        rotary = base.rotary_emb  # checked before any weight is fused (share=True re-points HF's)
        inv_freq = rotary.inv_freq.detach().float()
        if inv_freq.numel() * 2 != first.head_dim:
            raise UnsupportedModel("partial_rotary_factor", _cfg(config, "partial_rotary_factor"),
                                   "RoPE must rotate the whole head dimension")
        if any((getattr(b.self_attn, "q_norm", None) is None) != (getattr(b.self_attn, "k_norm", None) is None)
               for b in base.layers):
            raise UnsupportedModel("q_norm/k_norm", None, "needs both or neither")
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = first.head_dim
        self.groups = self.num_heads // self.num_kv_heads
        self.scaling = float(first.scaling)
        self.eps = float(config.rms_norm_eps)
        self.hidden = config.hidden_size
        self.tp_reduce = None  # tensor parallelism (ssd_core.tp): the all-reduce after o_proj / down_proj
        self.weight_format = "float"  # quantize(): "int8" runs the linears on packed int8 copies
        self._head_int8: Int8Weight | None = None
        self.num_layers = len(base.layers)

        self.embed_tokens = base.embed_tokens  # modules, so parameters()/to() see the weights
        self.norm_weight = base.norm.weight
        self.lm_head = hf_model.get_output_embeddings()  # tied: its weight is embed_tokens.weight
        self.fused = nn.ParameterList()
        self.layer_params = nn.ParameterList()
        self._layers: list[_Layer] = []
        for i, block in enumerate(base.layers):
            attn, mlp = block.self_attn, block.mlp
            lyr = _Layer()
            lyr.idx = i
            lyr.ln1 = self._keep(block.input_layernorm.weight)
            lyr.ln2 = self._keep(block.post_attention_layernorm.weight)
            lyr.wqkv = self._fuse([attn.q_proj, attn.k_proj, attn.v_proj], share)
            lyr.bqkv = self._fuse_bias([attn.q_proj, attn.k_proj, attn.v_proj], share)
            lyr.wo, lyr.bo = self._keep(attn.o_proj.weight), self._keep(attn.o_proj.bias)
            lyr.wgu = self._fuse([mlp.gate_proj, mlp.up_proj], share)
            lyr.bgu = self._fuse_bias([mlp.gate_proj, mlp.up_proj], share)
            lyr.wd, lyr.bd = self._keep(mlp.down_proj.weight), self._keep(mlp.down_proj.bias)
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            lyr.qk_norm = None
            if q_norm is not None:  # one [Hq+Hkv, D] weight: q rows then k rows, applied after one rms_norm
                w = torch.cat([q_norm.weight.detach()[None].expand(self.num_heads, -1),
                               k_norm.weight.detach()[None].expand(self.num_kv_heads, -1)])
                lyr.qk_norm = self._own(w)
            self._layers.append(lyr)

        self.attention_scaling = float(rotary.attention_scaling)
        self.inv_freq = inv_freq  # fp32, not a buffer: .to(dtype) must not round it
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        max_pos = int(_cfg(config, "max_position_embeddings", 2048) or 2048)
        if inv_freq.device.type == "cpu":  # CPU grows the table on demand (an IndexError); GPUs cannot
            max_pos = min(max_pos, 16384)
        self._build_rope(max_pos + 1024)

    # -- construction helpers ------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module, share: bool = True) -> "LeanCausalLM":
        return cls(hf_model, share).eval()

    def _keep(self, p: torch.Tensor | None) -> torch.Tensor | None:
        """An HF parameter used as is (registered so .parameters() sees it)."""
        if p is None:
            return None
        if not isinstance(p, nn.Parameter):
            p = nn.Parameter(p, requires_grad=False)
        self.layer_params.append(p)
        return p

    def _own(self, t: torch.Tensor) -> nn.Parameter:
        p = nn.Parameter(t.contiguous(), requires_grad=False)
        self.fused.append(p)
        return p

    def _fuse(self, linears: list[nn.Linear], share: bool) -> nn.Parameter:
        fused = self._own(torch.cat([m.weight.detach() for m in linears], dim=0))
        if share:  # the HF linears now read row views of the fused matrix: one copy of each weight
            start = 0
            for m in linears:
                n = m.weight.shape[0]
                m.weight = nn.Parameter(fused.data[start : start + n], requires_grad=m.weight.requires_grad)
                start += n
        return fused

    def _fuse_bias(self, linears: list[nn.Linear], share: bool) -> nn.Parameter | None:
        if all(m.bias is None for m in linears):
            return None
        parts = [m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.weight.shape[0]) for m in linears]
        fused = self._own(torch.cat(parts))
        if share:
            start = 0
            for m in linears:
                n = m.weight.shape[0]
                if m.bias is not None:
                    m.bias = nn.Parameter(fused.data[start : start + n], requires_grad=m.bias.requires_grad)
                start += n
        return fused

    def ensure_positions(self, positions: int) -> None:
        """RoPE tables covering positions 0..positions-1 (a captured step cannot grow them)."""
        if self.cos.shape[0] < positions:
            self._build_rope(positions)

    def _build_rope(self, positions: int) -> None:
        """cos/sin tables [positions, D] computed as HF's rotary embedding does (fp32, then the
        model dtype); sin carries rotate_half's sign so that rope(x) = x*cos + roll(x)*sin."""
        dtype, device = self.norm_weight.dtype, self.norm_weight.device
        pos = torch.arange(positions, device=device)
        freqs = pos[:, None].float() * self.inv_freq.to(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        half = self.head_dim // 2
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self.cos, self.sin = cos, sin

    def _apply(self, fn, recurse: bool = True):
        """.to()/.cuda()/.half() move the HF model too, so generate() keeps working (the HF
        projections that were views of the fused matrices then get their own copies)."""
        if self.weight_format != "float":  # the int8 copies would go stale
            raise RuntimeError("an int8 lean model cannot be moved or cast; load it again")
        if self.hf is not None:  # None: a tensor-parallel shard (ssd_core.tp) dropped the HF model
            self.hf._apply(fn, recurse)
        return super()._apply(fn, recurse)

    # -- what wrap_model / generate read -------------------------------------------------------
    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def generate(self, *args, **kwargs):
        """HF generation on the underlying HF model (references, assisted generation)."""
        assistant = kwargs.get("assistant_model")
        if isinstance(assistant, LeanCausalLM):
            kwargs["assistant_model"] = assistant.hf
        if self.hf is None:
            raise NotImplementedError("HF generate is not available on a tensor-parallel shard")
        return self.hf.generate(*args, **kwargs)

    def _plain_call(self, input_ids, position_ids, attention_mask, cache):
        """HF's defaults for a call without BatchKV's inputs: positions continue the cache, the
        mask is causal over cache + new tokens, a 2D [B, T+L] 0/1 mask hides padded slots."""
        batch, length = input_ids.shape
        past = _past_length(cache)
        device, dtype = input_ids.device, self.norm_weight.dtype
        if position_ids is None:
            position_ids = (torch.arange(length, device=device) + past).expand(batch, length)
        if attention_mask is not None and attention_mask.dim() == 4:
            return position_ids, attention_mask
        q = torch.arange(length, device=device)[:, None] + past
        visible = torch.arange(past + length, device=device)[None, :] <= q  # [L, T+L]
        visible = visible[None, None].expand(batch, 1, length, past + length)
        if attention_mask is not None:  # 2D padding mask
            if attention_mask.dim() != 2 or attention_mask.shape[-1] != past + length:
                raise ValueError("attention_mask must be [B, T+L] (0/1) or a 4D additive mask [B, 1, L, T+L]")
            visible = visible & attention_mask.bool()[:, None, None, :]
        mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        return position_ids, mask.masked_fill_(~visible, torch.finfo(dtype).min)

    def int8_problem(self) -> str | None:
        """Why this model cannot run on int8 weights (None: it can)."""
        param = self.norm_weight
        if self.tp_reduce is not None or self.hf is None:
            return "int8 weights are not implemented with tensor parallelism"
        if param.device.type != "cpu" or param.dtype != torch.float32:
            return f"int8 weights need a float32 model on a CPU (this one: {param.dtype} on {param.device.type})"
        return None

    def quantize(self, fmt: str) -> "LeanCausalLM":
        """Run every linear (q|k|v, o, gate|up, down, the LM head) on int8 copies of its weights
        ("int8"; "float": as loaded), in place. For a draft on a CPU: a draft step is memory-bound
        on its weights, and fbgemm's int8 GEMM reads a quarter of the bytes and barely slows down
        with a few more rows. The float weights stay (embeddings, HF generate, pickling)."""
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"weight format {fmt!r}: use one of {', '.join(WEIGHT_FORMATS)}")
        if fmt == self.weight_format:
            return self
        if fmt != "int8":
            raise ValueError("an int8 model does not go back to float in place; load it again")
        problem = self.int8_problem()
        if problem is not None:
            raise ValueError(problem)
        for lyr in self._layers:
            lyr.wqkv, lyr.bqkv = Int8Weight(lyr.wqkv, lyr.bqkv), None
            lyr.wo, lyr.bo = Int8Weight(lyr.wo, lyr.bo), None
            lyr.wgu, lyr.bgu = Int8Weight(lyr.wgu, lyr.bgu), None
            lyr.wd, lyr.bd = Int8Weight(lyr.wd, lyr.bd), None
        self._head_int8 = Int8Weight(self.lm_head.weight, getattr(self.lm_head, "bias", None))
        self.weight_format = fmt
        return self

    # -- the forward ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values=None, use_cache: bool = True,
                **unused) -> LeanOutput:
        batch, length = input_ids.shape
        nq, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if position_ids is None or attention_mask is None or attention_mask.dim() != 4:
            position_ids, attention_mask = self._plain_call(input_ids, position_ids, attention_mask, past_key_values)
        try:
            cos = F.embedding(position_ids, self.cos)[:, :, None]  # [B, L, 1, D]
            sin = F.embedding(position_ids, self.sin)[:, :, None]
        except IndexError:  # a position past the table: grow it (CPU raises; callers stay in context)
            self._build_rope(int(position_ids.max()) * 2 + 1)
            cos = F.embedding(position_ids, self.cos)[:, :, None]
            sin = F.embedding(position_ids, self.sin)[:, :, None]
        # a static cache (ssd_core.static_kv) writes K/V in place and hands back what to attend over
        write = getattr(past_key_values, "write_layer", None)
        cache_layers = past_key_values.layers if past_key_values is not None and write is None else None
        shape_heads = (batch, length, nq + 2 * nkv, d)
        hidden = self.hidden
        eps = self.eps
        reduce = self.tp_reduce
        half = d // 2
        h = F.embedding(input_ids, self.embed_tokens.weight)
        for lyr in self._layers:
            x = _rms_norm(h, lyr.ln1, eps, hidden)
            qkv = linear(x, lyr.wqkv, lyr.bqkv).view(shape_heads)
            qk, v = qkv[:, :, : nq + nkv], qkv[:, :, nq + nkv :]
            if lyr.qk_norm is not None:
                qk = _rms_norm(qk, lyr.qk_norm, eps, d)
            qk = qk * cos + qk.roll(half, dims=-1) * sin  # RoPE on q and k heads at once
            q = qk[:, :, :nq].transpose(1, 2)
            k = qk[:, :, nq:].transpose(1, 2)
            v = v.transpose(1, 2)
            if write is not None:
                k, v = write(lyr.idx, k, v)
            elif cache_layers is not None:
                k, v = _cache_update(past_key_values, cache_layers, lyr.idx, k, v)
            if self.groups > 1:
                k, v = _repeat_kv(k, self.groups), _repeat_kv(v, self.groups)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scaling)
            a = a.transpose(1, 2).reshape(batch, length, nq * d)
            o = linear(a, lyr.wo, lyr.bo)
            h = h + (o if reduce is None else reduce(o))  # a shard's partial sum: all-reduced
            x = _rms_norm(h, lyr.ln2, eps, hidden)
            gate, up = linear(x, lyr.wgu, lyr.bgu).chunk(2, dim=-1)
            m = linear(F.silu(gate) * up, lyr.wd, lyr.bd)
            h = h + (m if reduce is None else reduce(m))
        h = _rms_norm(h, self.norm_weight, eps, hidden)
        head = self.lm_head
        if self._head_int8 is not None:
            logits = self._head_int8(h)
        else:
            logits = linear(h, head.weight, head.bias) if type(head) is nn.Linear else head(h)
        return LeanOutput(logits, past_key_values)


# Skinny GEMMs on a CPU: for 2..SKINNY_MAX rows (a verify of K+1 tokens, a draft tree step of a
# few branches) MKL's x @ W^T re-packs the weights every call; W @ x^T reads them as stored. Same
# products, summed in another order (logits within float rounding of F.linear's). Measured on the
# embedded pair, 2 vCPUs, one thread (2026-12-01, scripts/skinny_gemm_bench.py, interleaved, two
# runs: docs/results/2026-12-01/r3/skinny-gemm*.json): draft forwards of 2-8 rows 1.2-1.5x faster,
# target forwards of 2-5 rows 1.1-1.4x, of 6-8 rows level (0.93-1.03x); one row (AR steps, JIT
# drafting) is unchanged: it stays on F.linear.
SKINNY_MAX = 8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, as a W @ x^T GEMM for a few rows on a CPU (SKINNY_MAX); an Int8Weight runs itself."""
    if type(weight) is Int8Weight:
        return weight(x)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 2 <= rows <= SKINNY_MAX or x.device.type != "cpu" or weight.dim() != 2:
        return F.linear(x, weight, bias)
    y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])


def _past_length(cache) -> int:
    layers = getattr(cache, "layers", None) or []
    keys = getattr(layers[0], "keys", None) if layers else None
    return keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dim: int) -> torch.Tensor:
    """HF's RMSNorm: statistics in fp32, `weight * normed.to(input dtype)`."""
    if x.dtype == torch.float32:
        if weight.dim() == 1:
            return F.rms_norm(x, (dim,), weight, eps)  # fused; same products as HF in fp32
        return weight * F.rms_norm(x, (dim,), eps=eps)
    normed = F.rms_norm(x.float(), (dim,), eps=eps)
    return weight * normed.to(x.dtype)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:  # [B, Hkv, T, D] -> [B, Hkv*groups, T, D]
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def _cache_update(cache, layers: list, idx: int, k: torch.Tensor, v: torch.Tensor):
    """Append to layer idx of an HF DynamicCache, as `cache.update` does, minus its Python."""
    if idx < len(layers):
        layer = layers[idx]
        keys = getattr(layer, "keys", None)
        if type(keys) is torch.Tensor and keys.dim() == 4:
            layer.keys = keys = torch.cat([keys, k], dim=-2)
            layer.values = values = torch.cat([layer.values, v], dim=-2)
            return keys, values
    return cache.update(k, v, idx)


def from_hf(model: nn.Module, share: bool = True) -> LeanCausalLM:
    """The lean model over an HF Llama / Qwen2 / Qwen3 causal LM (see LeanCausalLM)."""
    return LeanCausalLM.from_hf(model, share)
