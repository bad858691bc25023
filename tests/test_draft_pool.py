"""Shared draft pools (issue 17): the draft-side scheduler batching every session's rows into one
step, per-session isolation, the branch cap, eviction of a late session; the load the draft
reports and the targets' routing by it; the load generator. Greedy exactness of two real targets
over one draft (and a draft kill) is in test_exactness_pool.py."""

from __future__ import annotations

import threading

import pytest

from conftest import make_pair
from draft_service.config import SchedulerConfig
from draft_service.scheduler import DraftScheduler, LoadMeter, SessionPlan
from ssd_bench.draft_capacity import Stream, greedy_outcome, record_streams, run_cell
from ssd_core.config import BackupKind, SamplingParams
from ssd_core.types import FIRST_ROUND, RoundOutcome, SeqStart, SpecSource

TARGET, DRAFT = make_pair()
PROMPTS = [(3, 1, 4, 1, 5), (2, 7, 1, 8), (9, 2, 6), (5, 3, 5, 8, 9, 7)]
STREAMS = record_streams(TARGET, PROMPTS, 24)
PLAN = SessionPlan((2, 2, 1), 1.0, BackupKind.JIT)


def _drive(sched: DraftScheduler, sid: str, stream: Stream, rounds: int, seq_id: str = "a",
           hold: threading.Event | None = None) -> list[tuple[int, tuple[int, ...], SpecSource]]:
    """One simulated greedy target with one sequence: (round, tokens, source) of every answer."""
    sched.open(sid, PLAN)
    sched.add(sid, [SeqStart(seq_id, stream.prompt, SamplingParams(), draft_seed=7)])
    out, outcome, pos = [], RoundOutcome.first(seq_id), 0
    for i in range(rounds):
        if hold is not None and i == 3:
            hold.wait(10)
        res = sched.round(sid, [outcome], argmax=True)
        (spec,) = res.specs
        out.append((spec.round, spec.tokens, spec.source))
        k, bonus = greedy_outcome(spec.tokens, stream.continuation, pos)
        pos += k + 1
        outcome = RoundOutcome(seq_id, spec.round, k, bonus)
    sched.close(sid)
    return out


def _run(sched: DraftScheduler, n: int, rounds: int = 10, holds=None) -> list[list]:
    results: list = [None] * n
    holds = holds or [None] * n

    def one(i: int) -> None:
        results[i] = _drive(sched, f"s{i}", STREAMS[i], rounds, hold=holds[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_sessions_share_batched_steps_with_their_own_ids_rounds_and_drafts():
    """Three sessions, all with sequence id 'a': batched, each gets what it gets alone."""
    batched = DraftScheduler(DRAFT, SchedulerConfig(window_ms=1000))
    together = _run(batched, 3)
    rows_per_step = batched.load().rows_per_step  # now: the load window is the last 10 s
    alone = [_run(DraftScheduler(DRAFT, SchedulerConfig(batched=False)), 1)[0] for _ in range(1)]
    per_session = _run(DraftScheduler(DRAFT, SchedulerConfig(batched=False)), 3)
    assert rows_per_step > 1.5  # rows of several sessions in one step
    assert batched.evictions == 0
    for i, res in enumerate(together):
        assert [r for r, _, _ in res] == list(range(10))  # each sequence's own round numbers
        assert [t for _, t, _ in res] == [t for _, t, _ in per_session[i]]  # same drafts as stepped alone
        assert sum(s is SpecSource.CACHE_HIT for _, _, s in res) > 0
    assert [t for _, t, _ in alone[0]] == [t for _, t, _ in together[0]]


def test_branch_cap_splits_a_group_into_shards_and_answers_all():
    sched = DraftScheduler(DRAFT, SchedulerConfig(window_ms=1000, max_branches_per_step=5))  # 1 row per shard
    seen_shards = []
    orig = sched._run_step

    def spy(g, tickets, work, doomed, t0):
        seen_shards.append(len(work))
        return orig(g, tickets, work, doomed, t0)

    sched._run_step = spy
    results = _run(sched, 3, rounds=6)
    assert max(seen_shards) == 3  # 3 rows of 5 branches each: one shard each
    assert all(len(r) == 6 for r in results)


def test_a_late_session_is_evicted_then_served_alone_without_losing_its_place():
    sched = DraftScheduler(DRAFT, SchedulerConfig(window_ms=1))
    hold = threading.Event()
    timer = threading.Timer(0.5, hold.set)
    timer.start()
    results = _run(sched, 2, rounds=8, holds=[None, hold])  # session 1 stalls before its 4th round
    alone = _run(DraftScheduler(DRAFT, SchedulerConfig(batched=False)), 2, rounds=8)
    assert sched.evictions >= 1
    for got, ref in zip(results, alone):  # rows re-added from the tracked history: same drafts, same rounds
        assert [(r, t) for r, t, _ in got] == [(r, t) for r, t, _ in ref]


def test_load_meter_percentiles_utilization_and_saturation():
    now = [0.0]
    meter = LoadMeter(window_s=10, clock=lambda: now[0])
    now[0] = 10.0
    for ms in range(1, 101):
        meter.answer(ms / 1e3)
    meter.step(rows=4, seconds=0.02, busy_s=0.02)
    meter.build(seconds=4.0, branches=24)
    s = meter.snapshot(sequences=4, max_utilization=0.9, max_answer_ms=0)
    assert s.answer_p50_ms == pytest.approx(50, abs=1) and s.answer_p99_ms == pytest.approx(99, abs=1)
    assert s.rows_per_step == 4 and s.branches_per_step == 24 and s.step_ms == pytest.approx(20)
    assert s.utilization == pytest.approx(0.402) and not s.saturated
    assert meter.snapshot(4, 0.9, max_answer_ms=50).saturated  # the latency bound
    meter.build(seconds=6.0, branches=24)
    assert meter.snapshot(4, 0.9, 0).saturated  # busy over the limit
    now[0] = 30.0  # the window moved on: nothing recent
    assert meter.snapshot(0, 0.9, 0).utilization == 0 and meter.snapshot(0, 0.9, 0).answer_p99_ms == 0


def test_greedy_outcome_is_what_greedy_verification_gives():
    cont = (5, 6, 7, 8)
    assert greedy_outcome((5, 6, 9), cont, 0) == (2, 7)
    assert greedy_outcome((1,), cont, 1) == (0, 6)
    assert greedy_outcome((7, 8), cont, 2) == (1, 8)  # the recording's last token is never speculated past
    assert len(STREAMS[0].continuation) == 24


def test_registry_routes_by_expected_answer_latency_and_skips_saturated_drafts(target_identity_info):
    from ssd_protos.ssd.v1 import speculation_pb2 as spb
    from target_service.registry import DraftRegistry

    identity, info = target_identity_info
    reg = DraftRegistry(identity, ttl_s=60)
    fast = reg.register("127.0.0.1:1", "fast", info)
    slow = reg.register("127.0.0.1:2", "slow", info)
    reg.heartbeat(fast.lease_id, load=spb.DraftLoad(answer_p50_ms=5, step_ms=4, rows_per_step=4, active_sequences=4))
    reg.heartbeat(slow.lease_id, load=spb.DraftLoad(answer_p50_ms=40, step_ms=30, rows_per_step=1))
    ids = [fast.lease_id, slow.lease_id]
    picks = [reg.pick(ids) for _ in range(3)]
    assert picks == [fast.lease_id] * 3  # 5 + 1..3 ms beats 40 + 30 ms, whatever the counts
    assert reg.expected_ms(fast.lease_id) == pytest.approx(5 + 1 * 4)  # 3 unreported + 1 at 1 ms a row
    reg.heartbeat(fast.lease_id, load=spb.DraftLoad(answer_p50_ms=5, saturated=True, utilization=float("nan")))
    assert reg.report(fast.lease_id).utilization == 0.0  # untrusted numbers are clamped
    assert reg.pick(ids) == slow.lease_id  # a saturated draft gets no new sequences
    reg.heartbeat(slow.lease_id, load=spb.DraftLoad(saturated=True))
    assert reg.pick(ids) is None  # all full: the fast backup instead of a queue


def test_an_idle_draft_is_priced_like_its_best_measured_peer_not_its_forward_cost(target_identity_info):
    """A draft with no traffic yet (restarted, added) reports no answer latency. Priced at its
    announced forward cost it lost every pick to a busy peer answering from its cache in under
    a millisecond, so at light load it never got a sequence (seen in the e2e cluster's tests)."""
    from ssd_protos.ssd.v1 import speculation_pb2 as spb
    from target_service.registry import DraftRegistry

    identity, base = target_identity_info
    info = spb.DraftInfo()
    info.CopyFrom(base)
    info.model_id, info.step_fixed_ms, info.step_ms_per_token = "draft-a", 1.0, 0.3
    reg = DraftRegistry(identity, ttl_s=60)
    busy = reg.register("127.0.0.1:1", "busy", info)
    fresh = reg.register("127.0.0.1:2", "fresh", info)
    other_info = spb.DraftInfo()
    other_info.CopyFrom(info)
    other_info.model_id = "draft-b"
    other = reg.register("127.0.0.1:3", "other-model", other_info)
    reg.heartbeat(busy.lease_id, load=spb.DraftLoad(answer_p50_ms=0.5, step_ms=3, rows_per_step=6, active_sequences=6))
    reg.heartbeat(fresh.lease_id, load=spb.DraftLoad())  # alive, idle: nothing measured
    assert reg.expected_ms(busy.lease_id) == pytest.approx(0.5 + 0.5)
    assert reg.expected_ms(fresh.lease_id) == pytest.approx(0.5 + 0.5)  # not 1.0 + 0.3 (its forward cost)
    assert reg.expected_ms(other.lease_id) == pytest.approx(1.3)  # another model's numbers are not borrowed
    picks = [reg.pick([busy.lease_id, fresh.lease_id]) for _ in range(4)]
    assert picks.count(fresh.lease_id) == 2 and picks.count(busy.lease_id) == 2  # the load spreads
    assert reg.expected_ms(fresh.lease_id) == pytest.approx(0.5 + 0.5 * 3)  # its own unreported load counts
    reg.heartbeat(fresh.lease_id, load=spb.DraftLoad(answer_p50_ms=9, step_ms=8, rows_per_step=2))
    assert reg.expected_ms(fresh.lease_id) == pytest.approx(9 + 4)  # measured: its own numbers from then on


@pytest.fixture()
def target_identity_info():
    from ssd_core.models import tokenizer_fingerprint
    from ssd_protos.ssd.v1 import speculation_pb2 as spb
    from target_service.registry import TargetIdentity

    fp = tokenizer_fingerprint(TARGET.tokenizer, TARGET.vocab_size)
    return (TargetIdentity("r0", "t", TARGET.vocab_size, fp),
            spb.DraftInfo(vocab_size=TARGET.vocab_size, tokenizer_fingerprint=fp, proto_version=1))


def test_load_generator_over_grpc_and_the_heartbeat_load():
    """R simulated targets against a real draft server; its DraftLoad reports what they did."""
    from draft_service.config import DraftServerConfig
    from draft_service.server import create_server
    from target_service.session import DraftSessionClient

    server, port = create_server(DraftServerConfig(port=0, scheduler=SchedulerConfig(window_ms=1000)), model=DRAFT)
    server.start()
    try:
        res = run_cell(f"127.0.0.1:{port}", STREAMS, 3, seconds=2.0, fan_out=(2, 2, 1),
                       session_client=DraftSessionClient, warmup_s=0.3)
        load = server.servicer.load()
    finally:
        server.stop(0)
    assert res.errors == 0 and res.speculations > 10 and 0 < res.answer_p50_ms <= res.answer_p99_ms
    assert res.hit_rate > 0
    assert load.rows_per_step > 1 and load.step_ms > 0 and load.answer_p99_ms > 0 and 0 < load.utilization <= 1
    assert load.branches_per_step > 0


def test_pool_and_draft_history_is_the_engines_when_the_engine_verifies_its_own_backup(
        monkeypatch, target_identity_info):
    """The engine may verify its own fast backup instead of the draft's answer. The pool and the
    draft then append what the engine says it committed: the engine's history, whichever tokens
    it verified. (Forced here: the engine rejects every other draft speculation and its backup
    is an oracle, so the tokens it verifies are accepted and differ from the draft's.)"""
    from conftest import hf_greedy
    from draft_service.config import DraftServerConfig
    from draft_service.server import create_server
    from ssd_core import engine as engine_mod
    from ssd_core.config import Mode, SpecConfig
    from target_service.draft_pool import PooledSpeculator
    from target_service.registry import DraftRegistry

    target, draft = make_pair(draft_kind="independent")  # its drafts rarely are the target's tokens
    real_problem, calls = engine_mod.speculation_problem, []

    def every_other(spec, *args):
        problem = real_problem(spec, *args)
        if problem is None:
            calls.append(spec.round)
            return "rejected by the test" if len(calls) % 2 == 0 else None
        return problem

    monkeypatch.setattr(engine_mod, "speculation_problem", every_other)
    monkeypatch.setattr(engine_mod, "ngram_guess", lambda tokens, k: tuple(hf_greedy(target.model, list(tokens), k)))
    server, port = create_server(DraftServerConfig(port=0, scheduler=SchedulerConfig(window_ms=1)), model=draft)
    server.start()
    identity, info = target_identity_info
    registry = DraftRegistry(identity, ttl_s=60)
    registry.register(f"127.0.0.1:{port}", "d", info)
    seen = []  # (engine's history, pool's, draft's) each time the pool has answered a round

    def factory(plan, saguaro_c):
        pool = PooledSpeculator(registry, plan, saguaro_c, replica_id="r0", vocab_size=target.vocab_size, timeout_s=30)
        propose = pool.propose

        def watched(outcomes, lookahead=None):
            specs = propose(outcomes, lookahead)
            members = list(server.servicer.scheduler._members.values())
            on_draft = members[0].seqs.get("a") if members else None
            seen.append((list(engine.seqs[0].tokens), list(pool._tracks["a"].tokens),
                         None if on_draft is None else list(on_draft.tokens)))
            return specs

        pool.propose = watched
        return pool

    engine = engine_mod.Engine(target, spec=SpecConfig(mode=Mode.SSD, lookahead=2, fan_out=(1, 1, 1)),
                               speculator_factory=factory)
    prompt = (3, 1, 4, 1, 5)
    try:
        (result,) = engine.generate([engine_mod.Request(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True), "a")])
    finally:
        engine.close()
        server.stop(0)
    assert list(result.token_ids) == hf_greedy(target.model, list(prompt), 24)
    assert len(calls) >= 4  # the draft answered, and the engine used its own tokens in half of those rounds
    for engine_tokens, pool_tokens, draft_tokens in seen:
        assert pool_tokens == engine_tokens
        assert draft_tokens in (None, engine_tokens)
    assert sum(d is not None for _, _, d in seen) >= len(seen) - 2  # the draft kept the sequence (no resync)


def test_capacity_cells_repeat_alternating_and_report_medians(monkeypatch):
    """run_capacity: `repeats` cells per (R, mode), the first mode alternating, medians reported,
    the ratio the median of the per-repeat ratios (a single cell let the machine's drift decide)."""
    from ssd_bench import draft_capacity as dc

    order, rates = [], {"batched": iter([100.0, 50.0, 120.0]), "per_session": iter([40.0, 50.0, 60.0])}

    def cell(endpoint, streams, r, *args, **kw):
        order.append(endpoint)
        return dc.CellResult(r, next(rates[endpoint]), 10.0, 20.0, 0.7, 10, 1.0)

    monkeypatch.setattr(dc, "run_cell", cell)
    (entry,) = dc.run_capacity({"batched": "batched", "per_session": "per_session"}, [], (4,), 1.0, (1, 1),
                               lambda *a: None, repeats=3)
    assert order == ["batched", "per_session", "per_session", "batched", "batched", "per_session"]
    assert entry["batched"]["speculations_per_s"] == 100.0 and entry["per_session"]["speculations_per_s"] == 50.0
    assert entry["throughput_ratio"] == 2.0  # median of 2.5, 1.0, 2.0
    assert entry["batched"]["speculations"] == 30 and len(entry["batched"]["repeats"]) == 3
