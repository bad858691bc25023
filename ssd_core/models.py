"""Loading HF causal LMs (offline) and building tiny seeded random ones for tests."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from ssd_core.config import BACKENDS
from ssd_core.errors import IncompatibleModels, InvalidParameter

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


@dataclass(slots=True)
class LoadedModel:
    """A model with what the engine needs to know about it."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase | None
    name: str
    vocab_size: int  # rows of the LM head (logits width)
    max_context: int
    eos_token_ids: tuple[int, ...]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidParameter("device", device, "CUDA is not available on this machine")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidParameter("device", device, "use cpu or cuda[:N]")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidParameter("dtype", dtype, f"use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# lean: same logits (bit-identical on this machine) and ~1.3x faster forwards on CPU, measured
# (docs/design.md, "Lean backend"). As the default it falls back to hf, with a log line, for a
# model it does not implement; asked for explicitly it refuses such a model instead.
DEFAULT_BACKEND = "lean"
BACKEND_ENV = "SSD_BACKEND"  # the default for this process and the processes it starts


def resolve_backend(backend: str | None = None) -> str:
    """backend, else $SSD_BACKEND, else DEFAULT_BACKEND; refuses unknown names."""
    name = backend or os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise InvalidParameter("backend", name, f"use one of {', '.join(BACKENDS)}")
    return name


def set_default_backend(backend: str | None) -> None:
    """Make backend the default of load_model here and in child processes (bench draft
    process, services started by ssd up / the bench), which inherit the environment."""
    if backend is not None:
        os.environ[BACKEND_ENV] = resolve_backend(backend)


def apply_backend(model: torch.nn.Module, backend: str | None = None) -> torch.nn.Module:
    """The model to run for this backend: the HF model itself, or the lean model over it."""
    explicit = backend or os.environ.get(BACKEND_ENV)
    if resolve_backend(backend) != "lean":
        return model
    from ssd_core.lean import LeanCausalLM, UnsupportedModel

    if isinstance(model, LeanCausalLM):
        return model
    try:
        return LeanCausalLM.from_hf(model)
    except UnsupportedModel as exc:
        if explicit:
            raise
        log.info("%s: running the HF modules", exc)
        return model


def load_model(path: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
               backend: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local HF directory; never touches the network.

    backend: "hf" runs the transformers modules, "lean" the ssd_core.lean model built from the
    same weights (Llama / Qwen2 / Qwen3); None: $SSD_BACKEND, else DEFAULT_BACKEND."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no HF model at {path} (config.json missing)")
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    resolve_backend(backend)  # refuse an unknown name before loading anything
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, local_files_only=True).to(dev).eval()
    model = apply_backend(model, backend)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:  # a model dir without tokenizer files: token ids only
        log.warning("no tokenizer loaded from %s (%s); token ids only", path, exc)
        tokenizer = None
    return wrap_model(model, tokenizer, name=path.name)


def wrap_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, name: str) -> LoadedModel:
    config = model.config
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    vocab = model.get_output_embeddings().weight.shape[0]
    max_ctx = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    return LoadedModel(model.eval(), tokenizer, name, vocab, max_ctx, eos_ids)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase | None, vocab_size: int) -> str:
    """Hash of the token -> id map (or just the vocab size without a tokenizer)."""
    if tokenizer is None:
        payload = f"vocab:{vocab_size}"
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_pair(target: LoadedModel, draft: LoadedModel) -> None:
    """Refuse a target/draft pair that does not share one vocabulary."""
    if target.vocab_size != draft.vocab_size:
        raise IncompatibleModels(
            f"vocabulary mismatch: target {target.name} has {target.vocab_size} logits, "
            f"draft {draft.name} has {draft.vocab_size}; speculative decoding needs one shared vocabulary"
        )
    if target.tokenizer is not None and draft.tokenizer is not None:
        t, d = tokenizer_fingerprint(target.tokenizer, 0), tokenizer_fingerprint(draft.tokenizer, 0)
        if t != d:
            raise IncompatibleModels(f"tokenizer mismatch: target {target.name} ({t}) vs draft {draft.name} ({d})")


def tiny_llama_config(vocab_size: int = 64, hidden_size: int = 32, layers: int = 2, heads: int = 4,
                      kv_heads: int = 2, max_positions: int = 256, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        tie_word_embeddings=False, **extra,
    )


def random_model(config, seed: int, dtype: torch.dtype = torch.float32, init_std: float | None = None) -> torch.nn.Module:
    """A seeded random causal LM built from a config (tests; never a download)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if init_std is not None:
            config.initializer_range = init_std
        model = AutoModelForCausalLM.from_config(config).to(dtype).eval() if not isinstance(config, LlamaConfig) \
            else LlamaForCausalLM(config).to(dtype).eval()
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def perturbed_copy(model: torch.nn.Module, noise: float, seed: int) -> torch.nn.Module:
    """A draft that agrees with the target often but not always: the target plus seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    copy = type(model)(model.config).to(next(model.parameters()).dtype).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * noise * p.float().std().clamp(min=1e-3))
    return copy


def load_config(path: str | Path):
    return AutoConfig.from_pretrained(path, local_files_only=True)
