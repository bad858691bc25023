"""The target side: batches requests, runs the verify forward, verifies exactly, commits.

`Engine.step()` is one round for the whole batch:
    specs = speculator.propose(outcomes)      # speculations (cache hits, JIT or fast guesses)
    logits = target forward [last, d_1..d_K]  # one verify pass, K+1 positions per sequence
    num_accepted, bonus = verify(...)         # exact speculative sampling (pure function)
    commit, emit deltas, retire finished      # KV rollback, stop checks, stats
AR is the same loop with K = 0 (verify then just samples from p). Sequences can join between
steps (continuous batching) and leave when they finish without disturbing the others.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ssd_core import metrics
from ssd_core.backup import ngram_guess
from ssd_core.config import BatchPolicy, Mode, SamplingParams, SpecConfig
from ssd_core.errors import InvalidParameter
from ssd_core.kv import BatchKV, make_kv
from ssd_core.logprobs import TokenLogprob, position_logprobs, records
from ssd_core.models import LoadedModel, check_pair
from ssd_core.detok import TextStream
from ssd_core.plan import RoundPlan, resolve_plan
from ssd_core.planner import Planner
from ssd_core.sampling import derive_seed, penalize, process_logits
from ssd_core.speculator import DraftSpeculator
from ssd_core.stats import EngineTimings, RequestStats
from ssd_core.types import RoundOutcome, SeqStart, SpecSource, Speculation, Speculator
from ssd_core.validate import speculation_problem
from ssd_core.verify import draw_noise, point_mass, verify, verify_greedy

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Request:
    prompt_ids: tuple[int, ...]
    params: SamplingParams = SamplingParams()
    seq_id: str = ""


@dataclass(frozen=True, slots=True)
class Result:
    seq_id: str
    token_ids: tuple[int, ...]  # new tokens only
    text: str
    finish_reason: str  # "eos" | "length" | "stop" | "abort"
    stats: RequestStats
    # only when the request asked (SamplingParams.logprobs / prompt_logprobs); one per token, the
    # prompt's from its second token on (the first has no context to be scored in)
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """Tokens committed for one sequence in one step (streaming), and the text they release.

    The `text` of all of a sequence's deltas adds up to its Result.text (text that could still
    turn into a stop string is held back until it cannot)."""

    seq_id: str
    token_ids: tuple[int, ...]
    finished: Result | None = None
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()  # of token_ids, when asked
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # in a sequence's first delta, when asked


@dataclass(slots=True)
class _Seq:
    req: Request
    tokens: list[int]
    gen: torch.Generator
    stats: RequestStats
    draft_seed: int = 0  # the draft's per-sequence seed (keyed hash of the request seed)
    text: TextStream | None = None  # None without a tokenizer
    round: int = -1
    new: int = 0  # tokens generated so far
    limit: int = 0  # max new tokens (request cap, clipped by the context)
    stop_at: int | None = None  # where in the text a stop string starts, once one completed
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the new tokens, when asked
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class _ArgmaxOnly:
    """A greedy batch's verify forward: the target's argmax [B, K+1] instead of distributions."""

    argmax: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.argmax.device


SpeculatorFactory = Callable[[RoundPlan, float], Speculator]  # (plan, saguaro_c) -> speculator


class Engine:
    """Target model + verifier + a speculator, with the batch-size policy in between.

    The speculator comes from `speculator_factory` (e.g. a pool of remote draft endpoints) or,
    by default, is an in-process DraftSpeculator over `draft`.
    """

    def __init__(self, target: LoadedModel, draft: LoadedModel | None = None, spec: SpecConfig = SpecConfig(),
                 policy: BatchPolicy = BatchPolicy(), speculator_factory: SpeculatorFactory | None = None,
                 draft_seed_key: bytes = b"", planner: Planner | None = None) -> None:
        if draft is not None:
            check_pair(target, draft)
            speculator_factory = speculator_factory or _local_factory(draft)
        if spec.mode is not Mode.AR and speculator_factory is None:
            raise InvalidParameter("draft", None, f"mode {spec.mode.value} needs a draft model or draft endpoints")
        self.target, self.draft, self.spec, self.policy = target, draft, spec, policy
        self._factory = speculator_factory
        # K / fan-out / backup from measured costs (ssd_core.planner) unless the spec fixes K or the
        # fan-out; without a planner, from the BatchPolicy table
        self.planner = planner if spec.lookahead is None and not spec.fan_out and spec.mode is not Mode.AR else None
        self.kv = make_kv(target.model, 0, target.device)  # preallocated for the lean backend
        self.seqs: list[_Seq] = []
        self.timings = EngineTimings()
        self._plan: RoundPlan | None = None
        self._speculator: Speculator | None = None
        self._outcomes: dict[str, RoundOutcome] = {}
        self._ready: list[Delta] = []  # finished at admission (prompt scoring): returned by the next step
        self._ids = itertools.count()
        # Key of the draft seeds' derivation. A service uses a secret one, so a remote draft cannot
        # work out the target's noise from a request seed it might guess; in-process, b"" keeps
        # seeded runs reproducible from one process to the next.
        self._seed_key = draft_seed_key

    # -- public API --------------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> list[Result]:
        """Run requests to completion as one batch; results in request order."""
        ids = self.add(requests)
        done: dict[str, Result] = {}
        while self.busy:
            for d in self.step():
                if d.finished is not None:
                    done[d.seq_id] = d.finished
        return [done[i] for i in ids]

    @property
    def busy(self) -> bool:
        """Sequences to step, or results of admitted requests that the next step returns."""
        return bool(self.seqs or self._ready)

    def add(self, requests: list[Request]) -> list[str]:
        """Validate and admit requests (prefill); they take part from the next step on. A request
        with max_new_tokens 0 only scores its prompt: its result comes with the next step."""
        admitted = [self._admit(r) for r in requests]
        scored = [s for s in admitted if s.limit == 0]
        if scored:  # a prefill of their own: the generating rows' prefill stays as without them
            self._prefill(scored, keep=False)
            for s in scored:
                s.stats.finish(0)
                result = Result(s.req.seq_id, (), "", "length", s.stats, prompt_logprobs=s.prompt_logprobs)
                self._ready.append(Delta(s.req.seq_id, (), result, prompt_logprobs=s.prompt_logprobs))
        new = [s for s in admitted if s.limit > 0]
        if not new:
            return [s.req.seq_id for s in admitted]
        if self._speculator is not None:  # first: a draft in another process prefills beside ours
            self._speculator.add([self._start(s) for s in new])
        try:
            self._prefill(new)
        except BaseException:
            if self._speculator is not None:  # they never joined: the speculator must not keep them
                self._speculator.remove([s.req.seq_id for s in new])
            raise
        for s in new:
            self._outcomes[s.req.seq_id] = RoundOutcome.first(s.req.seq_id)
        self.seqs.extend(new)
        return [s.req.seq_id for s in admitted]

    def abort(self, seq_id: str) -> Result | None:
        idx = [i for i, s in enumerate(self.seqs) if s.req.seq_id == seq_id]
        if not idx:
            return None
        return self._retire([(idx[0], "abort")])[0][0]

    def close(self) -> None:
        if self._speculator is not None:
            self._speculator.close()

    def step(self) -> list[Delta]:
        """One verification round for every active sequence (and the results of prompt-only requests)."""
        ready, self._ready = self._ready, []
        if not self.seqs:
            return ready
        ts = time.perf_counter()
        plan = self._replan()
        built0 = getattr(self._speculator, "build_wait_s", None)
        specs = self._speculate(plan)
        built1 = getattr(self._speculator, "build_wait_s", None)
        t0 = time.perf_counter()
        target_probs, logprobs = self._verify_forward(specs)
        t1 = time.perf_counter()
        for seq in self.seqs:  # before commit: a request that finishes now reports this round too
            seq.stats.target_forward_s += t1 - t0
            seq.stats.speculate_s += t0 - ts
        num_accepted, bonus = self._verify(specs, target_probs)
        # the round's one device-to-host copy: accepted counts and bonus tokens (a no-op on the CPU)
        num_accepted, bonus = torch.stack([num_accepted, bonus]).cpu().unbind(0)
        deltas, lookups = self._commit(specs, num_accepted, bonus, logprobs)
        t2 = time.perf_counter()
        hits = lookups.count(SpecSource.CACHE_HIT)
        if self.planner is not None:
            self.planner.observe(num_accepted.tolist(), plan, (t1 - t0) * 1e3, (t0 - ts) * 1e3,
                                 all(sp.source is SpecSource.CACHE_HIT for sp in specs), round_ms=(t2 - ts) * 1e3,
                                 build_wait_ms=(built1 - built0) * 1e3 if None not in (built0, built1) else None,
                                 lookups=len(lookups), hits=hits)
        self.timings.add(target_forward_s=t1 - t0, commit_s=t2 - t1)
        metrics.record_round(num_accepted.tolist(), len(specs[0].tokens), hits=hits,
                             jit=lookups.count(SpecSource.JIT), fast=lookups.count(SpecSource.FAST),
                             phase_seconds={"speculate": t0 - ts, "verify": t1 - t0, "commit": t2 - t1, "round": t2 - ts})
        return ready + deltas

    # -- phases ------------------------------------------------------------------------------
    def _replan(self) -> RoundPlan:
        choice = None
        if self.planner is not None:
            sampled = any(not seq.req.params.greedy for seq in self.seqs)  # its own plans: see SAMPLED_TREE_BUDGETS
            choice = self.planner.choose(self.spec.mode, len(self.seqs), sampled)
        plan = choice.plan if choice is not None else resolve_plan(self.spec, self.policy, len(self.seqs))
        sp = self._speculator
        if plan.lookahead > 0 and self._factory is not None:
            if sp is None:
                self._switch(plan)
            elif sp.fan_out != plan.fan_out or sp.tree != plan.tree:  # same speculator, its state kept
                log.debug("speculator replan: K=%d fan_out=%s", plan.lookahead, plan.fan_out)
                sp.replan(plan.fan_out)
            self._speculator.backup = plan.backup
        self._plan = plan
        return plan

    def _switch(self, plan: RoundPlan) -> None:
        """Build the speculator (first speculative step; later plan changes are replans)."""
        if self._speculator is not None:
            self._speculator.close()
        log.info("speculator plan: K=%d fan_out=%s tree=%s backup=%s", plan.lookahead, plan.fan_out, plan.tree, plan.backup.value)
        self._speculator = self._factory(plan, self.spec.saguaro_c)
        self._speculator.add([self._start(s) for s in self.seqs])
        self._outcomes = {s.req.seq_id: RoundOutcome.first(s.req.seq_id) for s in self.seqs}

    def _speculate(self, plan: RoundPlan) -> list[Speculation]:
        t0 = time.perf_counter()
        outcomes = [self._outcomes[s.req.seq_id] for s in self.seqs]
        if self._speculator is None:
            specs = [Speculation(s.req.seq_id, s.round + 1, (), None, SpecSource.NONE) for s in self.seqs]
        else:
            specs = self._speculator.propose(outcomes, plan.lookahead)
        specs = [self._local_backup(s, sp, plan.lookahead) for s, sp in zip(self.seqs, specs)]
        self.timings.add(speculate_s=time.perf_counter() - t0)
        return specs

    def _local_backup(self, seq: _Seq, spec: Speculation, lookahead: int) -> Speculation:
        """The target's own fast backup, for a speculation the speculator could not give or that
        fails validation (everything from a draft is untrusted input)."""
        if lookahead == 0:
            return Speculation(seq.req.seq_id, seq.round + 1, (), None, SpecSource.NONE)
        problem = speculation_problem(spec, seq.req.seq_id, seq.round + 1, lookahead, self.target.vocab_size)
        if problem is None:
            return spec
        if spec.source is not SpecSource.NONE:
            metrics.REJECTED_SPECULATIONS.inc()
            log.warning("rejecting speculation for %s: %s; using the fast backup", seq.req.seq_id, problem)
        return Speculation(seq.req.seq_id, seq.round + 1, ngram_guess(seq.tokens, lookahead), None, SpecSource.FAST)

    def _verify_forward(self, specs: list[Speculation]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Processed target distributions [B, K+1, V], and log-probabilities [K+1, V] by batch row
        for the rows whose request asked for them (nobody else pays for them)."""
        lookahead = len(specs[0].tokens)
        tokens = torch.tensor([[s.tokens[-1], *sp.tokens] for s, sp in zip(self.seqs, specs)], dtype=torch.long)
        start = torch.tensor([len(s.tokens) - 1 for s in self.seqs])[:, None]
        pos = start + torch.arange(lookahead + 1)[None, :]
        # sampling and verification stay where the logits are (the GPU: no [B, K+1, V] copy to the
        # host); penalties and logprobs are computed on the CPU
        logits = self.kv.forward(self.target.model, tokens, pos)
        params = [s.req.params for s in self.seqs]
        if all(x.greedy and not x.penalized and x.logprobs is None for x in params):
            return _ArgmaxOnly(logits.float().argmax(dim=-1)), {}  # greedy batch: no probability tensors
        if any(x.penalized or x.logprobs is not None for x in params):
            logits = logits.cpu()
        if any(x.penalized for x in params):
            logits = logits.clone()  # a plain tensor (the forward's may be an inference-mode one)
        for i, (seq, sp) in enumerate(zip(self.seqs, specs)):
            if seq.req.params.penalized:  # position j sees the history plus d_1..d_j, as AR step j would
                logits[i] = penalize(logits[i], seq.req.params, seq.req.prompt_ids,
                                     seq.tokens[len(seq.req.prompt_ids):], sp.tokens)
        flat = logits.reshape(-1, logits.shape[-1])
        p = [s.req.params for s in self.seqs for _ in range(lookahead + 1)]
        probs = process_logits(flat, torch.tensor([x.temperature for x in p]), torch.tensor([x.top_k for x in p]),
                               torch.tensor([x.top_p for x in p])).view(len(self.seqs), lookahead + 1, -1)
        logprobs = {i: position_logprobs(logits[i], probs[i], seq.req.params.greedy)
                    for i, seq in enumerate(self.seqs) if seq.req.params.logprobs is not None}
        return probs, logprobs

    def _verify(self, specs: list[Speculation], target_probs: "torch.Tensor | _ArgmaxOnly"):
        dev = target_probs.device
        if isinstance(target_probs, _ArgmaxOnly):  # every row greedy: the argmax decides (verify_greedy)
            batch, k_plus_1 = target_probs.argmax.shape
            draft_tokens = torch.tensor([sp.tokens for sp in specs], dtype=torch.long).view(batch, k_plus_1 - 1)
            return verify_greedy(draft_tokens.to(dev), target_probs.argmax)
        batch, k_plus_1, vocab = target_probs.shape
        draft_tokens = torch.tensor([sp.tokens for sp in specs], dtype=torch.long).view(batch, k_plus_1 - 1)
        draft_probs = point_mass(draft_tokens, vocab)
        for i, sp in enumerate(specs):
            if sp.draft_probs is not None and sp.q_trusted:  # else: verified against the point mass
                draft_probs[i] = sp.draft_probs
        uniforms, race = draw_noise([s.gen for s in self.seqs], k_plus_1 - 1, vocab)  # per-request CPU streams
        return verify(draft_tokens.to(dev), draft_probs.to(dev), target_probs, uniforms.to(dev), race.to(dev))

    def _commit(self, specs: list[Speculation], num_accepted: torch.Tensor, bonus: torch.Tensor,
                logprobs: dict[int, torch.Tensor]) -> tuple[list[Delta], list[SpecSource]]:
        """Commit the round; returns the deltas and the sources of this round's cache lookups."""
        self.kv.keep(torch.tensor([len(s.tokens) - 1 for s in self.seqs]) + num_accepted)
        self.kv.compact()
        deltas, finished, lookups = [], [], []
        for i, (seq, sp, k, t) in enumerate(zip(self.seqs, specs, num_accepted.tolist(), bonus.tolist())):
            seq.round = sp.round
            lookup = seq.stats.record_round(len(sp.tokens), k, sp.source, self._plan.tree)
            if lookup is not None:
                lookups.append(lookup)
            committed = tuple(sp.tokens[:k]) + (t,)  # the history's one source: the speculator is told, never guesses
            self._outcomes[seq.req.seq_id] = RoundOutcome(seq.req.seq_id, sp.round, k, t, committed)
            first = seq.new == 0
            emitted, reason = self._emit(seq, list(committed))
            # emitted[j] is verified position j's token (a prefix of d_1..d_k, t*): row j scores it
            lps = records(logprobs[i], emitted, seq.req.params.logprobs) if i in logprobs else ()
            seq.logprobs.extend(lps)
            # a finishing sequence's text comes from _retire (cut where a stop string starts)
            text = seq.text.release() if seq.text is not None and reason is None else ""
            deltas.append(Delta(seq.req.seq_id, tuple(emitted), text=text, logprobs=lps,
                                prompt_logprobs=seq.prompt_logprobs if first else ()))
            if reason is not None:
                finished.append((i, reason))
        if finished:
            ended = {r.seq_id: (r, rest) for r, rest in self._retire(finished)}
            deltas = [dataclasses.replace(d, finished=ended[d.seq_id][0], text=d.text + ended[d.seq_id][1])
                      if d.seq_id in ended else d for d in deltas]
        return deltas, lookups

    def _emit(self, seq: _Seq, tokens: list[int]) -> tuple[list[int], str | None]:
        """Commit a round's tokens one position at a time, exactly as AR would one step at a time:
        after each token, EOS ends the sequence ("eos"), then a stop token id or a completed stop
        string ("stop"), then the length limit ("length"); tokens after that position are dropped.
        (vLLM's order; the text of a "stop" ends where the stop string starts.)"""
        params, eos = seq.req.params, self.target.eos_token_ids
        for j, tok in enumerate(tokens):
            seq.tokens.append(tok)
            seq.new += 1
            if seq.text is not None:  # a completed stop string ends the sequence here (below)
                seq.stop_at = seq.text.push(tok)
            if tok in eos and not params.ignore_eos:
                return tokens[: j + 1], "eos"
            if tok in params.stop_token_ids or seq.stop_at is not None:
                return tokens[: j + 1], "stop"
            if seq.new >= seq.limit:
                return tokens[: j + 1], "length"
        return tokens, None

    def _retire(self, finished: list[tuple[int, str]]) -> list[tuple[Result, str]]:
        """Remove finished sequences; each Result with the text it adds after the last release."""
        gone = {i for i, _ in finished}
        results = []
        for i, reason in finished:
            seq = self.seqs[i]
            new_ids = seq.tokens[len(seq.req.prompt_ids):]
            rest = seq.text.finish(seq.stop_at if reason == "stop" else None) if seq.text is not None else ""
            text = seq.text.text if seq.text is not None else ""
            seq.stats.finish(len(new_ids))
            results.append((Result(seq.req.seq_id, tuple(new_ids), text, reason, seq.stats, tuple(seq.logprobs),
                                   seq.prompt_logprobs), rest))
            self._outcomes.pop(seq.req.seq_id, None)
        keep = [i for i in range(len(self.seqs)) if i not in gone]
        if self._speculator is not None:
            self._speculator.remove([self.seqs[i].req.seq_id for i in gone])
        self.seqs = [self.seqs[i] for i in keep]
        self.kv.select_rows(torch.tensor(keep, dtype=torch.long))
        return results

    # -- helpers -----------------------------------------------------------------------------
    def _admit(self, req: Request) -> _Seq:
        if not req.prompt_ids:
            raise InvalidParameter("prompt", req.prompt_ids, "the prompt is empty")
        vocab = self.target.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_ids):
            raise InvalidParameter("prompt_ids", "...", f"token ids must be in [0, {vocab})")
        room = self.target.max_context - len(req.prompt_ids) - 1
        if room < 1:
            raise InvalidParameter("prompt", f"{len(req.prompt_ids)} tokens",
                                   f"longer than the context of {self.target.max_context} tokens")
        seq_id = req.seq_id or f"seq-{next(self._ids)}"
        if any(s.req.seq_id == seq_id for s in self.seqs):
            raise InvalidParameter("seq_id", seq_id, "already active")
        params = req.params
        if params.max_token_id() >= vocab:
            raise InvalidParameter("logit_bias/stop_token_ids", params.max_token_id(), f"token ids must be in [0, {vocab})")
        if params.stop and self.target.tokenizer is None:
            raise InvalidParameter("stop", list(params.stop), "stop strings need a tokenizer")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        req = Request(tuple(req.prompt_ids), params, seq_id)
        # independent streams: target noise from seed, draft sampling from a keyed one-way hash of it
        seq = _Seq(req, list(req.prompt_ids), torch.Generator().manual_seed(seed), RequestStats(),
                   draft_seed=derive_seed(seed, key=self._seed_key))
        if self.target.tokenizer is not None:
            seq.text = TextStream(self.target.tokenizer, params.stop)
        seq.limit = min(params.max_new_tokens, room)
        return seq

    def _start(self, seq: _Seq) -> SeqStart:
        # the speculator derives the stream from (draft_seed, first_round): fresh on every rebuild
        return SeqStart(seq.req.seq_id, tuple(seq.tokens), seq.req.params, seq.draft_seed, first_round=seq.round + 1)

    def _prefill(self, new: list[_Seq], keep: bool = True) -> None:
        """Target KV for all but the last prompt token (it is fed with the first verify pass), and
        the prompt's log-probabilities for the requests that ask (the same forward's logits);
        keep=False: scoring only, the KV is dropped."""
        t0 = time.perf_counter()
        histories = [s.tokens for s in new]
        if keep:  # straight into the batch's KV (free rows of a static cache)
            logits = self.kv.prefill_rows(self.target.model, histories)
        else:
            logits = BatchKV.prefill_logits(self.target.model, histories, self.target.device)[1]
        for i, s in enumerate(new):
            n = s.req.params.prompt_logprobs
            if n is not None and logits is not None:
                prompt = s.req.prompt_ids
                lp = torch.log_softmax(logits[i, : len(prompt) - 1].float().cpu(), dim=-1)
                s.prompt_logprobs = records(lp, prompt[1:], n)
        dt = time.perf_counter() - t0
        self.timings.add(prefill_s=dt)
        for s in new:
            s.stats.prefill_s += dt
        metrics.record_round((), 0, phase_seconds={"prefill": dt})


def _local_factory(draft: LoadedModel) -> SpeculatorFactory:
    def build(plan: RoundPlan, saguaro_c: float) -> Speculator:
        return DraftSpeculator(draft, plan.fan_out, saguaro_c, plan.backup, tree=plan.tree)

    return build
