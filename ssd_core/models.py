"""Loading HF causal LMs (offline), on the HF or the lean backend."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ssd_core.config import BACKENDS, DRAFT_WEIGHTS
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
    def weights(self) -> str:
        """How its linears are stored: float | int8 (apply_weights; the lean model's own record)."""
        return getattr(self.model, "weight_format", "float")

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
# The environment variable the entry points (ssd_cli, `python -m target_service`) read once, as the
# default of --backend; this module never reads it: the choice is passed in.
BACKEND_ENV = "SSD_BACKEND"


def resolve_backend(backend: str | None = None) -> str:
    """backend, else DEFAULT_BACKEND; refuses unknown names."""
    name = backend or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise InvalidParameter("backend", name, f"use one of {', '.join(BACKENDS)}")
    return name


def apply_backend(model: torch.nn.Module, backend: str | None = None) -> torch.nn.Module:
    """The model to run for this backend: the HF model itself, or the lean model over it."""
    explicit = backend is not None
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


def int8_problem(model: torch.nn.Module) -> str | None:
    """Why this model cannot run on int8 weights (None: it can)."""
    from ssd_core.lean import LeanCausalLM, int8_available

    if not isinstance(model, LeanCausalLM):
        return "int8 weights need the lean backend"
    problem = model.int8_problem()
    if problem is None and not int8_available():
        return "this torch build has no fbgemm int8 GEMM"
    return problem


def apply_weights(loaded: LoadedModel, weights: str) -> LoadedModel:
    """Store a DRAFT's linears as `weights` (ssd_core.config.DRAFT_WEIGHTS), in place: "int8" or
    refuse, "auto" int8 where it applies (else float, with a log line), "float" as loaded."""
    if weights not in DRAFT_WEIGHTS:
        raise InvalidParameter("weights", weights, f"use one of {', '.join(DRAFT_WEIGHTS)}")
    if weights == "float" or loaded.weights == "int8":
        return loaded
    problem = int8_problem(loaded.model)
    if problem is not None:
        if weights == "int8":
            raise InvalidParameter("weights", weights, problem)
        log.info("draft %s: float weights (%s)", loaded.name, problem)
        return loaded
    loaded.model.quantize("int8")
    log.info("draft %s: int8 weights", loaded.name)
    return loaded


def load_model(path: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
               backend: str | None = None, tensor_parallel: int = 1, weights: str = "float") -> LoadedModel:
    """Load a causal LM and its tokenizer from a local HF directory; never touches the network.

    backend: "hf" runs the transformers modules, "lean" the ssd_core.lean model built from the
    same weights (Llama / Qwen2 / Qwen3); None: DEFAULT_BACKEND, which runs HF (with a log line)
    for a model lean does not implement.

    tensor_parallel > 1: the lean model sharded over that many ranks (ssd_core.tp); this process is
    rank 0 and starts the others as processes (one per GPU from `device` on, or CPU processes).

    weights: how the linears are stored (apply_weights; drafts only: a target stays "float")."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no HF model at {path} (config.json missing)")
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    resolve_backend(backend)  # refuse an unknown name before loading anything
    if tensor_parallel != 1:
        if weights == "int8":
            raise InvalidParameter("weights", weights, "int8 weights are not implemented with tensor parallelism")
        weights = "float"
        if resolve_backend(backend) != "lean":
            raise InvalidParameter("tensor_parallel", tensor_parallel, "tensor parallelism needs the lean backend")
        from ssd_core.tp import launch

        model = launch(path, tensor_parallel, device, dt, torch.get_num_threads())
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, local_files_only=True).to(dev).eval()
        model = apply_backend(model, backend)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:  # a model dir without tokenizer files: token ids only
        log.warning("no tokenizer loaded from %s (%s); token ids only", path, exc)
        tokenizer = None
    return apply_weights(wrap_model(model, tokenizer, name=path.name), weights)


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

