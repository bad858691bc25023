"""Train the embedded target/draft model pair.

Both models are Llama-architecture causal LMs (``transformers.LlamaForCausalLM``) sharing one
byte-level BPE tokenizer. The corpus is the Python standard library's own source
(``sysconfig.get_paths()["stdlib"]``: its top-level ``*.py`` files for "small", all its ``*.py``
files except tests and site-packages for "large"; sorted by path, every 32nd held out for a
validation loss), so the pair can be rebuilt on any machine without a download. On CPU, training
is deterministic given the seed, the Python version (which fixes the corpus), the torch version,
the CPU instruction set and the number of torch threads.

The target is trained first with plain next-token cross-entropy. The draft starts as a truncated
copy of the trained target (its embedding, first decoder layer(s) and final norm) and is then
distilled from the target's logits on the same data (KL to the target's distribution plus a little
cross-entropy); both choices raise the draft's greedy agreement with the target compared with a
randomly initialised draft or plain LM training (measured numbers: ssd_models/README.md).

Weights are stored in float16 (to keep the committed pair small) while ``config.json`` says
``float32``, so ``from_pretrained`` with the default ``dtype="auto"`` loads them in float32, the
fast dtype on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import sysconfig
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SPECIAL_TOKEN = "<|endoftext|>"
SIZE_NAMES = ("base", "small", "large")  # "tiny" is a hidden size for tests


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int


@dataclasses.dataclass(frozen=True)
class PairSize:
    vocab_size: int
    context: int
    target: ModelShape
    draft: ModelShape
    target_steps: int
    draft_steps: int
    batch_size: int
    target_lr: float
    draft_lr: float
    corpus: str  # "top" = top-level stdlib *.py files, "all" = recursive (tests and site-packages excluded)
    max_files: int | None = None  # cap on the number of (sorted) corpus files
    distill_ce_weight: float = 0.25  # draft loss = w * CE(labels) + (1 - w) * KL(target || draft)
    # "target": the draft starts as a truncated copy of the trained target (its embedding, first
    # draft.layers decoder layers and final norm; needs equal hidden/heads/intermediate);
    # "scratch": random init.
    draft_init: str = "target"
    warmup_steps: int = 50


SIZES: dict[str, PairSize] = {
    # For tests only: a few seconds on one CPU thread.
    "tiny": PairSize(
        vocab_size=320,
        context=32,
        target=ModelShape(hidden=32, layers=2, heads=2, intermediate=64),
        draft=ModelShape(hidden=32, layers=1, heads=2, intermediate=64),
        target_steps=6,
        draft_steps=6,
        batch_size=2,
        target_lr=3e-3,
        draft_lr=3e-3,
        corpus="top",
        max_files=2,
    ),
    # The embedded default pair (ssd_models/default): a deep, narrow target whose decode step is
    # dominated by per-layer weight reads and op overheads (so verifying K+1 tokens costs little
    # more than one, as for an LLM on a GPU), and a 2-layer draft cut from its first layers (two
    # layers can copy earlier spans, which the target's greedy code continuations do a lot; one
    # layer cannot). Draft step ~1/9 of a verify. Two CPU cores, at most 45 minutes in all.
    "base": PairSize(
        vocab_size=4096,
        context=256,
        target=ModelShape(hidden=256, layers=12, heads=4, intermediate=704),
        draft=ModelShape(hidden=256, layers=2, heads=4, intermediate=704),
        target_steps=1100,
        draft_steps=500,
        batch_size=4,
        target_lr=1e-3,
        draft_lr=1e-3,
        corpus="top",
    ),
    # The embedded pair before 2026-12-01: ~5-6 minutes on two cores, but a draft step costs a
    # quarter of the target's, outside the regime speculative decoding is for.
    "small": PairSize(
        vocab_size=4096,
        context=256,
        target=ModelShape(hidden=192, layers=4, heads=4, intermediate=512),
        draft=ModelShape(hidden=192, layers=1, heads=4, intermediate=512),
        target_steps=1800,
        draft_steps=900,
        batch_size=4,
        target_lr=1e-3,
        draft_lr=1e-3,
        corpus="top",
    ),
    # One GPU (untested here: no GPU was available when it was written). ~12 MB of stdlib source,
    # ~3.5M tokens; the target sees ~4 epochs.
    "large": PairSize(
        vocab_size=8192,
        context=512,
        target=ModelShape(hidden=512, layers=8, heads=8, intermediate=1536),
        draft=ModelShape(hidden=512, layers=1, heads=8, intermediate=1536),
        target_steps=2000,
        draft_steps=1500,
        batch_size=16,
        target_lr=1e-3,
        draft_lr=1e-3,
        corpus="all",
        warmup_steps=100,
    ),
}


# --------------------------------------------------------------------------------------------
# Embedded default pair
# --------------------------------------------------------------------------------------------


def default_pair_root() -> Path:
    """Directory of the embedded default pair: ``<repo or site-packages>/ssd_models/default``."""
    import ssd_train

    return Path(ssd_train.__file__).resolve().parent.parent / "ssd_models" / "default"


def default_pair_dirs() -> tuple[Path, Path]:
    """(target_dir, draft_dir) of the embedded default pair; FileNotFoundError if it is missing."""
    root = default_pair_root()
    target, draft = root / "target", root / "draft"
    missing = [d for d in (target, draft) if not (d / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"embedded model pair not found (missing {', '.join(str(d) for d in missing)}); "
            f"build it with `ssd train-pair --out {root}`"
        )
    return target, draft


# --------------------------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------------------------

_EXCLUDED_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def corpus_files(kind: str = "top", max_files: int | None = None) -> list[Path]:
    """Sorted stdlib source files: "top" = ``<stdlib>/*.py``; "all" = recursive, without tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if kind == "top":
        files = sorted(root.glob("*.py"))
    elif kind == "all":
        files = sorted(
            p for p in root.rglob("*.py") if not _EXCLUDED_PARTS.intersection(p.relative_to(root).parts[:-1])
        )
    else:
        raise ValueError(f"unknown corpus kind {kind!r}")
    if max_files is not None:
        files = files[:max_files]
    if not files:
        raise FileNotFoundError(f"no Python source files under {root}")
    return files


def read_corpus(files: Iterable[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: Path | None = None, context: int = 256):
    """Byte-level BPE trained on ``texts``, wrapped as a PreTrainedTokenizerFast (bos = eos = pad =
    ``<|endoftext|>``, id 0). Saved with save_pretrained to ``out_dir`` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        model_max_length=context,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def _token_stream(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """All texts tokenized and concatenated, each followed by the eos token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def make_config(shape: ModelShape, size: PairSize, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=size.vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=size.context,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )


def _make_model(shape: ModelShape, size: PairSize, tokenizer, seed: int, device: str):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config(shape, size, tokenizer))
    return model.to(device=device, dtype=torch.float32)


def _bf16_autocast_ok(device: str) -> bool:
    """Mixed bf16 precision only where the hardware runs it natively (else it is slower than fp32)."""
    try:
        if device.startswith("cuda"):
            return bool(torch.cuda.is_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _init_draft_from_target(draft, target) -> None:
    """Copy the target's embedding, first decoder layers and final norm into the draft."""
    src = target.state_dict()
    dst = draft.state_dict()
    missing = [k for k in dst if k not in src or src[k].shape != dst[k].shape]
    if missing:
        raise ValueError(f"draft_init='target' needs a draft shaped like a truncated target; mismatch at {missing[:3]}")
    draft.load_state_dict({k: src[k].detach().clone() for k in dst})


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    warmup = max(1, min(warmup, total // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _batches(stream: torch.Tensor, context: int, batch_size: int, steps: int, seed: int):
    """Deterministic random windows of context + 1 tokens (inputs and shifted labels)."""
    gen = torch.Generator().manual_seed(seed)
    n_starts = stream.numel() - context - 1
    if n_starts <= 0:
        raise ValueError(f"corpus has {stream.numel()} tokens, fewer than context + 1 = {context + 1}")
    for _ in range(steps):
        starts = torch.randint(0, n_starts, (batch_size,), generator=gen)
        yield torch.stack([stream[s : s + context + 1] for s in starts.tolist()])


def _train(
    model,
    stream: torch.Tensor,
    size: PairSize,
    steps: int,
    lr: float,
    seed: int,
    device: str,
    desc: str,
    progress: bool,
    teacher=None,
) -> float:
    from tqdm.auto import tqdm

    model.train()
    opt = _optimizer(model, lr)
    ce_w = size.distill_ce_weight
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    use_bf16 = _bf16_autocast_ok(device)
    ema = None
    bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True)
    for step, batch in enumerate(_batches(stream, size.context, size.batch_size, steps, seed)):
        batch = batch.to(device)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, size.warmup_steps)
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=inputs).logits
        logits = logits.float()
        vocab = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1))
        if teacher is None:
            loss = ce
        else:
            with torch.no_grad(), torch.autocast(dev_type, dtype=torch.bfloat16, enabled=use_bf16):
                t_logits = teacher(input_ids=inputs).logits
            t_logp = F.log_softmax(t_logits.float(), dim=-1).reshape(-1, vocab)
            d_logp = F.log_softmax(logits, dim=-1).reshape(-1, vocab)
            kl = F.kl_div(d_logp, t_logp, log_target=True, reduction="batchmean")
            loss = ce_w * ce + (1.0 - ce_w) * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = ce.item() if ema is None else 0.95 * ema + 0.05 * ce.item()
        bar.update(1)
        bar.set_postfix(ce=f"{ema:.3f}", refresh=False)
    bar.close()
    model.eval()
    return float(ema if ema is not None else float("nan"))


@torch.no_grad()
def _eval_ce(model, stream: torch.Tensor, context: int, device: str, max_windows: int = 64) -> float:
    """Mean next-token cross-entropy over consecutive non-overlapping windows of ``stream``."""
    model.eval()
    n = min(max_windows, (stream.numel() - 1) // context)
    if n <= 0:
        return float("nan")
    total = 0.0
    for i in range(n):
        w = stream[i * context : i * context + context + 1].to(device)
        logits = model(input_ids=w[None, :-1]).logits.float()
        total += F.cross_entropy(logits[0], w[1:]).item()
    return total / n


def _save_model(model, tokenizer, out: Path) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    half = model.to(torch.float16)
    half.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_length=model.config.max_position_embeddings,
    )
    half.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    model.to(torch.float32)
    # Stored in float16 for size; run in float32 by default (dtype="auto" reads this field).
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _n_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def train_pair(
    out_dir: Path,
    size: str = "base",
    device: str = "cpu",
    seed: int = 0,
    steps: int | None = None,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Train the target, then distill the draft from it; write ``out_dir/{target,draft}``.

    ``steps`` overrides the number of optimizer steps of each model. Returns (target_dir, draft_dir).
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZE_NAMES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    if steps is not None and steps <= 0:
        raise ValueError("steps must be positive")
    cfg = SIZES[size]
    out_dir = Path(out_dir)
    target_dir, draft_dir = out_dir / "target", out_dir / "draft"
    t0 = time.perf_counter()

    files = corpus_files(cfg.corpus, cfg.max_files)
    # Every 32nd file is held out for a validation loss.
    val_files = files[16::32] if len(files) >= 32 else []
    held_out = set(val_files)
    train_files = [f for f in files if f not in held_out]
    texts = read_corpus(train_files)
    tokenizer = train_tokenizer(texts, cfg.vocab_size, None, context=cfg.context)
    stream = _token_stream(tokenizer, texts)
    val_stream = _token_stream(tokenizer, read_corpus(val_files)) if val_files else stream
    log.info("corpus: %d files, %d training tokens, %d validation tokens", len(train_files), stream.numel(), val_stream.numel())
    if progress:
        print(f"corpus: {len(train_files)} stdlib files, {stream.numel():,} tokens (vocab {len(tokenizer)})", flush=True)

    target_steps = steps if steps is not None else cfg.target_steps
    draft_steps = steps if steps is not None else cfg.draft_steps

    target = _make_model(cfg.target, cfg, tokenizer, seed, device)
    t_ce = _train(target, stream, cfg, target_steps, cfg.target_lr, seed + 1, device, "target", progress)
    t_time = time.perf_counter() - t0

    draft = _make_model(cfg.draft, cfg, tokenizer, seed + 2, device)
    if cfg.draft_init == "target":
        _init_draft_from_target(draft, target)
    for p in target.parameters():
        p.requires_grad_(False)
    teacher = target if cfg.distill_ce_weight < 1.0 else None
    d_ce = _train(draft, stream, cfg, draft_steps, cfg.draft_lr, seed + 3, device, "draft", progress, teacher=teacher)
    train_time = time.perf_counter() - t0

    info = {
        "size": size,
        "seed": seed,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bf16_autocast": _bf16_autocast_ok(device),
        "corpus": f"stdlib {cfg.corpus} *.py ({len(train_files)} train files, {len(val_files)} val files)",
        "train_tokens": stream.numel(),
        "target": {
            "shape": dataclasses.asdict(cfg.target),
            "params": _n_params(target),
            "steps": target_steps,
            "train_ce_ema": round(t_ce, 4),
            "val_ce": round(_eval_ce(target, val_stream, cfg.context, device), 4),
        },
        "draft": {
            "shape": dataclasses.asdict(cfg.draft),
            "init": cfg.draft_init,
            "loss": f"{cfg.distill_ce_weight} * CE + {1 - cfg.distill_ce_weight} * KL(target || draft)",
            "params": _n_params(draft),
            "steps": draft_steps,
            "train_ce_ema": round(d_ce, 4),
            "val_ce": round(_eval_ce(draft, val_stream, cfg.context, device), 4),
        },
        "target_train_seconds": round(t_time, 1),
        "total_train_seconds": round(train_time, 1),
    }
    _save_model(target, tokenizer, target_dir)
    _save_model(draft, tokenizer, draft_dir)
    (out_dir / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if progress:
        print(json.dumps(info, indent=2), flush=True)
    return target_dir, draft_dir
