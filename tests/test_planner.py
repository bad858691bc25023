"""The planner (ssd_core/planner.py): pure choices from given costs, acceptance from live rounds,
and exactness of engines whose K and fan-out it changes mid-generation."""

from __future__ import annotations

from collections import Counter

import pytest

from conftest import hf_greedy, make_pair
from ssd_core.config import BackupKind, Mode, SamplingParams, SpecConfig
from ssd_core.engine import Engine, Request
from ssd_core.plan import RoundPlan
from ssd_core.planner import LinearCost, Planner, calibrate, measured_planner


def test_linear_fit_recovers_a_line_and_clamps_at_zero():
    c = LinearCost.fit([(1, 3.0), (4, 6.0), (8, 10.0)])
    assert c.fixed == pytest.approx(2.0) and c.per_token == pytest.approx(1.0)
    flat = LinearCost.fit([(1, 5.0), (8, 4.0)])  # noise that slopes down: no negative cost per token
    assert flat.per_token == 0.0 and flat.fixed > 0


def _planner(target_fixed, target_tok, draft_fixed, draft_tok, **kw) -> Planner:
    """The model's choices alone (no live trials), unless the test asks for trials."""
    kw.setdefault("trials", False)
    return Planner(LinearCost(target_fixed, target_tok), LinearCost(draft_fixed, draft_tok), **kw)


def test_a_cheap_draft_and_a_bandwidth_bound_target_choose_ssd_with_a_longer_k():
    # GPU-like: verifying 8 tokens costs about what 1 does; a draft step is a twentieth of it
    p = _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.8)
    choice = p.choose(Mode.SSD, 1)
    assert choice.mode is Mode.SSD and choice.plan.tree and choice.plan.lookahead >= 4
    assert choice.tokens_per_s >= max(choice.alternatives["sd"], choice.alternatives["ar"])


def test_an_expensive_draft_falls_back_to_ar_even_in_an_ssd_lane():
    p = _planner(2.0, 0.05, 3.0, 0.5, acceptance_prior=0.3)
    for mode in (Mode.SSD, Mode.SD):
        choice = p.choose(mode, 1)
        assert choice.mode is Mode.AR and choice.plan.lookahead == 0, mode


def test_big_batches_on_a_compute_bound_cpu_stop_speculating():
    p = _planner(5.0, 0.2, 1.0, 0.3, acceptance_prior=0.7)
    small, big = p.choose(Mode.SSD, 1), p.choose(Mode.SSD, 32)
    assert small.plan.lookahead > 0 and big.mode is Mode.AR


def test_an_ssd_plan_prices_its_backup_for_the_rows_that_missed():
    """At batch 8 a round with a miss JIT-drafts for the missed rows only (the runner forwards
    just those): the SSD candidates are priced so, SD keeps drafting for every row."""
    from ssd_core.perfmodel import missed_rows

    p = _planner(5.0, 0.2, 1.0, 0.3, acceptance_prior=0.7)
    t = p._times(8, 3, 16, p_hit=0.8)
    assert t.miss_jit == pytest.approx(3 * p.draft(missed_rows(0.8, 8)) + p.answer_ms)
    assert t.miss_jit < t.jit == pytest.approx(3 * p.draft(8) + p.answer_ms)
    assert p._times(8, 3, 0).miss_jit is None


def test_tokens_per_round_follow_the_acceptance_seen_at_each_position():
    """Rounds of K = 6 that always accept exactly 3: positions 1-3 always accepted, the 4th never.
    The per-position estimate then expects ~4 tokens at K = 3..6 (3 + the bonus) where the i.i.d.
    form at the pooled rate (3/4) says 2.7 at K = 3 and 3.5 at K = 6; with no rounds seen it is the
    i.i.d. form at the prior."""
    from ssd_core.perfmodel import expected_tokens_per_round

    p = _planner(5.0, 0.2, 1.0, 0.3, acceptance_prior=0.7)
    assert p.tokens_per_round(4) == pytest.approx(expected_tokens_per_round(0.7, 4))
    plan = RoundPlan(6, (0,) * 7, False, BackupKind.JIT)
    for _ in range(200):
        p.observe([3], plan, 10.0, 1.0, False)
    assert p.acceptance == pytest.approx(0.75, abs=0.02)
    assert expected_tokens_per_round(p.acceptance, 3) < 2.8 and expected_tokens_per_round(p.acceptance, 6) < 3.6
    for k in (3, 6):
        assert p.tokens_per_round(k) == pytest.approx(4.0, abs=0.45), k
    assert p.tokens_per_round(6) < 4.2  # the 4th position is (almost) never accepted: little past it


def test_acceptance_is_estimated_from_live_rounds_and_replans():
    p = _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.8)
    first = p.choose(Mode.SSD, 1)
    for _ in range(200):  # every draft token rejected: a ~ 0
        p.observe([0], first.plan, 10.0)
    assert p.acceptance < 0.2
    again = p.choose(Mode.SSD, 1)
    assert again.plan.lookahead < first.plan.lookahead or again.mode is not Mode.SSD


def test_calibration_times_real_forwards():
    target, _ = make_pair()
    cost = calibrate(target, ((1, 1), (4, 4)), repeats=2)
    assert cost(1) > 0 and cost(16) >= cost(1)


@pytest.mark.parametrize("mode", [Mode.SD, Mode.SSD])
def test_engines_on_a_measured_planner_equal_the_target_alone(mode):
    target, draft = make_pair()
    planner = measured_planner(target, draft)
    prompts = [[3, 1, 4, 1, 5, 9], [2, 7, 1], [8, 2, 8, 1, 8], [4, 4]]
    engine = Engine(target, draft, SpecConfig(mode=mode), planner=planner)
    # requests join one by one while others run: the batch size (and with it the plan) changes
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    done = {}
    for i, p in enumerate(prompts):
        engine.add([Request(tuple(p), params, f"r{i}")])
        for d in engine.step():
            if d.finished is not None:
                done[d.seq_id] = d.finished
    while engine.seqs:
        done.update({d.seq_id: d.finished for d in engine.step() if d.finished is not None})
    engine.close()
    for i, p in enumerate(prompts):
        assert list(done[f"r{i}"].token_ids) == hf_greedy(target.model, p, 20), i


def test_an_explicit_k_or_fan_out_bypasses_the_planner():
    target, draft = make_pair()
    planner = _planner(10.0, 0.01, 0.5, 0.001)
    assert Engine(target, draft, SpecConfig(mode=Mode.SSD, lookahead=3), planner=planner).planner is None
    assert Engine(target, draft, SpecConfig(mode=Mode.SSD), planner=planner).planner is planner


def test_a_served_target_plans_with_the_costs_its_drafts_report():
    """`ssd serve target`'s default: the target times itself at start-up, each draft reports its own
    forward cost at registration (DraftInfo.step_*), the lanes plan with the slowest live draft;
    output stays the target's greedy output whatever the plan."""
    from client import Client
    from draft_service.config import DraftServerConfig
    from draft_service.server import create_server as create_draft
    from target_service.config import TargetConfig
    from target_service.server import create_server

    target, draft = make_pair()
    server, port = create_server(TargetConfig(model="in-process", port=0, max_tokens=128, planner="measured"),
                                 target=target)
    addr = f"127.0.0.1:{port}"
    drafts, _ = create_draft(DraftServerConfig(port=0, targets=(addr,)), model=draft)
    drafts.start()
    drafts.start_registration().wait_registered(1, 20)
    try:
        (lease,) = server.app.registry.live()
        assert lease.step_cost[0] > 0 or lease.step_cost[1] > 0  # measured by the draft, sent at registration
        with Client(addr, timeout=60, max_retries=0) as c:
            for mode in ("sd", "ssd", "auto"):
                r = c.generate(prompt_ids=[3, 1, 4, 1, 5, 9], max_tokens=16, ignore_eos=True, mode=mode)
                assert list(r.token_ids) == hf_greedy(target.model, [3, 1, 4, 1, 5, 9], 16), mode
                # the plan is visible per request: the kind and K of its last round
                assert r.stats.plan_rounds in ("ar", "sd", "ssd") and (r.stats.plan_lookahead == 0) == (
                    r.stats.plan_rounds == "ar"), r.stats
        lanes = list(server.app.scheduler._lanes.values())
        planners = [lane.engine.planner for lane in lanes if lane.engine.planner is not None]
        assert planners and all(p.draft.fixed + p.draft.per_token > 0 for p in planners)  # the reported cost
    finally:
        drafts.stop(0)
        server.stop(0)


def test_a_draft_slower_than_calibrated_is_seen_in_the_waits_and_replans():
    # calibrated: a cheap draft (SSD pays); live: every all-hit round waits 40 ms for the cache build
    p = _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.8)
    first = p.choose(Mode.SSD, 1)
    assert first.mode is Mode.SSD
    for _ in range(100):
        p.observe([first.plan.lookahead], first.plan, 10.0, wait_ms=40.0, all_hit=True)
    again = p.choose(Mode.SSD, 1)
    assert p.scales(1).tree > 3 and (again.mode is not Mode.SSD or again.plan.lookahead < first.plan.lookahead)
    assert p.scales(1).draft == 1.0  # the JIT's cost is measured by JIT rounds only


def test_slow_jit_rounds_do_not_make_the_cache_build_look_slow():
    """JIT steps pay per-call costs a cache build does not (a round trip, a pipe): SD rounds that
    wait 1.6x the calibrated JIT drafting rescale the JIT's cost only. With one shared scale the
    model priced a 16-branch K = 3 tree at 1.6x its cost and picked 8 branches (measured in
    process, 2026-12-02: JIT 1.5-1.7x its calibration, the 16-branch build at its calibration)."""
    p = _planner(8.9, 0.435, 1.0, 0.0765, acceptance_prior=0.85)
    sd = RoundPlan(3, (0,) * 4, False, BackupKind.JIT)
    for _ in range(60):
        p.observe([2], sd, 10.0, wait_ms=1.6 * p._times(1, 3, 0, unscaled_draft=True).jit)
    assert p.scales(1).draft == pytest.approx(1.6, rel=0.01) and p.scales(1).tree == 1.0

    def widest_k3_tree() -> int:
        p._cache.clear()
        p.choose(Mode.SSD, 1)
        k3 = [c for c in p._scored[(Mode.SSD, 1, False)] if c.plan.tree and c.plan.lookahead == 3
              and c.plan.backup is BackupKind.JIT]
        return sum(max(k3, key=lambda c: c.tokens_per_s).plan.fan_out)

    assert widest_k3_tree() >= 12
    p.scales(1).tree = p.scales(1).draft  # the old reading: one scale for both
    assert widest_k3_tree() <= 8


def test_an_answers_own_latency_is_not_read_as_an_unhidden_cache_build():
    # a remote draft: every all-hit round waits 3 ms for its answer (round trip, lookup); the draft
    # measured its answer waiting 0 ms for the build (hidden by the 10 ms verify)
    def planner() -> Planner:
        return _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.8, transport_ms=1.0)

    told, blind, slow = planner(), planner(), planner()
    plan = told.choose(Mode.SSD, 1).plan
    assert plan.tree
    for _ in range(100):
        told.observe([plan.lookahead], plan, 10.0, wait_ms=3.0, all_hit=True, build_wait_ms=0.0)
        blind.observe([plan.lookahead], plan, 10.0, wait_ms=3.0, all_hit=True)  # not known: the whole wait
        slow.observe([plan.lookahead], plan, 10.0, wait_ms=40.0, all_hit=True, build_wait_ms=38.0)
    assert told.scales(1).tree == pytest.approx(1.0)
    assert blind.scales(1).tree > 2  # the old reading: the round trip taken for a build 3x its size
    assert slow.scales(1).tree > 3  # a build that did outlast the verify still shows


@pytest.mark.parametrize("rate", [0.5, 0.9])
def test_the_miss_law_is_fitted_to_the_hits_the_lane_sees(rate):
    import random

    from ssd_core.perfmodel import hit_rate_from_fanout
    from ssd_core.planner import MISS_OFFSET, MISS_PRIOR

    p = _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.8)
    plan = p.choose(Mode.SSD, 1).plan
    assert plan.tree and p.miss_exponent == MISS_PRIOR
    rng = random.Random(0)
    for _ in range(400):  # one row a round, hit with probability `rate`
        k = min(plan.lookahead, int(rng.expovariate(0.25)))
        p.observe([k], plan, 10.0, lookups=1, hits=int(rng.random() < rate))
    predicted = hit_rate_from_fanout(p.acceptance, plan.fan_out, p.miss_exponent, MISS_OFFSET)
    # the fit follows the last ~100 rounds (HIT_DECAY): ~200 effective draws, sd 0.035 at 0.5;
    # 0.1 is about 3 sd (fixed seed: the outcome is deterministic, the margin is for the law)
    assert predicted == pytest.approx(rate, abs=0.1)


def test_the_miss_law_forgets_fan_outs_not_run_for_long():
    # every round decays every fan-out's counts: one not run for long is dropped, not kept for ever
    p = _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.8)
    plan = p.choose(Mode.SSD, 1).plan
    old = RoundPlan(plan.lookahead, (1,) * (plan.lookahead + 1), True, plan.backup)
    for _ in range(10):
        p.observe([plan.lookahead], old, 10.0, lookups=1, hits=1)
    assert old.fan_out in p._hits
    for _ in range(1000):
        p.observe([plan.lookahead], plan, 10.0, lookups=1, hits=1)
    assert set(p._hits) == {plan.fan_out}


def test_auto_takes_the_fastest_plan_of_any_kind():
    p = _planner(2.0, 0.05, 3.0, 0.5, acceptance_prior=0.3)  # speculation cannot pay here
    assert p.choose(Mode.AUTO, 1).mode is Mode.AR
    q = _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.8)  # ... and here SSD does
    assert q.choose(Mode.AUTO, 1).plan == q.choose(Mode.SSD, 1).plan


def test_a_lane_planned_as_ar_still_probes_its_draft_and_recovers_from_a_bad_calibration():
    # the draft was calibrated 10x too slow (a busy start-up): the plan is AR rounds ...
    p = _planner(10.0, 0.01, 20.0, 0.01, acceptance_prior=0.8)
    assert p.choose(Mode.SSD, 1).mode is Mode.AR
    seen_sd = 0
    for _ in range(400):  # ... but every EXPLORE_EVERY rounds one SD round measures the real draft
        choice = p.choose(Mode.SSD, 1)
        seen_sd += choice.mode is Mode.SD
        if choice.mode is not Mode.AR:  # a speculative round (an SD probe, or SSD once chosen): all accepted
            p.observe([choice.plan.lookahead], choice.plan, 10.0, wait_ms=2.0 * choice.plan.lookahead)
        else:
            p.observe([0], choice.plan, 10.0)
    assert seen_sd >= 2 and p.scales(1).draft < 0.5
    assert p.choose(Mode.SSD, 1).mode is not Mode.AR  # speculation, once the draft is seen to be cheap


def _drive(p: Planner, mode: Mode, rounds: int, true_tokens_per_s, batch: int = 1) -> Counter:
    """Run `rounds` rounds of a lane whose plans really commit at true_tokens_per_s(plan) (every
    round: K accepted tokens + 1, timed to match): which plans ran how often."""
    ran: Counter = Counter()
    for _ in range(rounds):
        choice = p.choose(mode, batch)
        plan = choice.plan
        ran[(choice.mode, plan.lookahead)] += 1
        tokens = (plan.lookahead + 1) * batch
        p.observe([plan.lookahead] * batch, plan, 5.0, round_ms=1e3 * tokens / true_tokens_per_s(choice))
    return ran


def test_live_trials_find_the_fastest_plan_when_the_model_is_wrong():
    # the model (a cheap draft, a bandwidth-bound target) favours SSD at a long K; the deployment
    # really runs SSD at K = 2 fastest (say the draft's per-round overheads were never timed)
    p = _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.95, trials=True)
    first = p.choose(Mode.SSD, 1)
    assert first.mode is Mode.SSD and first.plan.lookahead > 3  # the model's pick runs first

    def truth(c):
        k = c.plan.lookahead
        return {Mode.AR: 120.0, Mode.SD: 150.0 - 10 * abs(k - 3), Mode.SSD: 300.0 - 40 * abs(k - 2)}[c.mode]

    ran = _drive(p, Mode.SSD, 1500, truth)
    assert ran[(Mode.SSD, 2)] >= 0.85 * 1500, ran  # the first pass and the re-checks stay small
    assert len(ran) >= 4  # the shortlist was tried (AR, SD and SSD plans at several K)


def test_live_trials_in_an_sd_lane_find_its_k():
    p = _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.95, trials=True)
    ran = _drive(p, Mode.SD, 1500, lambda c: 120.0 if c.mode is Mode.AR else 300.0 - 40 * abs(c.plan.lookahead - 3))
    assert ran[(Mode.SD, 3)] >= 0.85 * 1500, ran


def test_live_trials_keep_a_speculative_lane_at_least_as_fast_as_ar():
    p = _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.9, trials=True)
    ran = _drive(p, Mode.SSD, 1200, lambda c: 200.0 if c.mode is Mode.AR else 120.0)
    assert ran[(Mode.AR, 0)] >= 0.8 * 1200, ran


def test_live_trials_recheck_the_best_and_follow_a_drift():
    p = _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.9, trials=True)
    fast = {"plan": (Mode.AR, 0)}

    def truth(c):
        return 300.0 if (c.mode, c.plan.lookahead) == fast["plan"] else 150.0

    _drive(p, Mode.SSD, 600, truth)
    assert p.choose(Mode.SSD, 1).mode is Mode.AR
    fast["plan"] = (Mode.SSD, 2)  # the machine changed: SSD at K = 2 is now the fastest
    ran = _drive(p, Mode.SSD, 3000, truth)
    assert ran[(Mode.SSD, 2)] >= 0.5 * 3000, ran


def test_live_trials_are_per_mode_and_batch_bucket():
    from ssd_core.planner import batch_bucket
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    p = _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.9, trials=True)
    # an SD lane never runs SSD rounds, an AR lane never speculates
    assert {m for m, _ in _drive(p, Mode.SD, 200, lambda c: 100.0)} <= {Mode.SD, Mode.AR}


def test_live_trials_try_little_where_the_model_expects_speculation_to_lose():
    p = _planner(5.0, 0.2, 1.0, 0.3, acceptance_prior=0.7, trials=True)  # a compute-bound CPU
    assert p.choose(Mode.SSD, 32).mode is Mode.AR
    ran = _drive(p, Mode.SSD, 400, lambda c: 400.0 if c.mode is Mode.AR else 200.0, batch=32)
    assert len(ran) <= 3 and ran[(Mode.AR, 0)] >= 0.9 * 400, ran  # AR, the best SD and the best SSD plan


def test_live_trials_rank_plans_by_round_time_not_by_a_stints_lucky_accepted_lengths():
    # every round's accepted length is random (per-token acceptance 0.8, seeded); each plan's
    # round time is fixed; the fastest plan is SSD at K = 4. Ranking by a 4-round stint's own
    # accepted lengths follows luck (this lane's realized speed over 600 rounds: 0.91 of the best
    # plan's on average, measured over these seeds); by the measured round time at the pooled
    # acceptance, 0.96
    import random
    import statistics

    from ssd_core.perfmodel import expected_tokens_per_round

    round_ms = {(Mode.AR, 0): 10.0}
    for k in range(1, 9):
        round_ms[(Mode.SD, k)] = 14.0 + 3.0 * k
        round_ms[(Mode.SSD, k)] = 13.0 + (1.0 if k <= 4 else 4.0 * (k - 4))
    rate = {m: expected_tokens_per_round(0.8, m[1]) / ms for m, ms in round_ms.items()}
    assert max(rate, key=rate.get) == (Mode.SSD, 4)

    def efficiency(seed: int, rounds: int = 600) -> float:
        rng = random.Random(seed)
        p = _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.8, trials=True)
        tokens = ms = 0.0
        for _ in range(rounds):
            choice = p.choose(Mode.SSD, 1)
            key = (choice.mode, choice.plan.lookahead)
            n = 0
            while n < key[1] and rng.random() < 0.8:
                n += 1
            tokens, ms = tokens + n + 1, ms + round_ms[key]
            p.observe([n], choice.plan, 5.0, round_ms=round_ms[key])
        return tokens / ms / rate[(Mode.SSD, 4)]

    assert statistics.mean(efficiency(s) for s in range(10)) >= 0.935


def test_an_ssd_lane_reuses_the_plans_an_sd_lane_of_the_same_target_measured():
    # one served target, one planner: the SD lane has measured AR and SD at every K at batch 1;
    # the SSD lane's first pass then tries its own SSD plans only (AR and SD are known: slower)
    p = _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.9, trials=True)

    def truth(c):
        return {Mode.AR: 100.0, Mode.SD: 150.0, Mode.SSD: 200.0 - 10 * abs(c.plan.lookahead - 3)}[c.mode]

    _drive(p, Mode.SD, 300, truth)
    ran = _drive(p, Mode.SSD, 40, truth)
    assert ran[(Mode.AR, 0)] == 0 and sum(n for (m, _), n in ran.items() if m is Mode.SD) == 0, ran
    assert sum(n for (m, _), n in ran.items() if m is Mode.SSD) == 40
    assert "ar-K0-fast" in p.measured(1)  # the arms are the target's, not the lane's


def test_greedy_batches_plan_trees_of_at_least_two_branches_a_depth_sampled_ones_may_go_narrower():
    from ssd_core.planner import SAMPLED_TREE_BUDGETS, TREE_BUDGETS

    assert min(TREE_BUDGETS) == 2 and min(SAMPLED_TREE_BUDGETS) == 1
    p = _planner(8.9, 0.435, 1.0, 0.0765, acceptance_prior=0.85)
    for sampled in (False, True):
        p.choose(Mode.SSD, 1, sampled)
        trees = [c.plan for c in p._scored[(Mode.SSD, 1, sampled)] if c.plan.tree]
        narrowest = min(sum(t.fan_out) / (t.lookahead + 1) for t in trees)
        assert narrowest == (1.0 if sampled else 2.0), (sampled, narrowest)
    # the two kinds of batch are planned apart: neither evicts the other's plan
    assert {(Mode.SSD, 1, False), (Mode.SSD, 1, True)} <= set(p._cache)


def test_scales_are_per_batch_bucket_so_a_burst_does_not_replan_batch_one():
    """A lane's batch moves with its traffic; a batch-32 verify runs 2x what the calibration's
    line predicts where a batch-1 verify runs as predicted. With one scale for all, each burst of
    32 swung it and re-planned batch 1 from batch-32 readings (measured served, 2026-12-02: the
    OpenAI c = 1 SSD/SD was 1.30x alone and 1.12x with c = 8 / 32 cells between its repeats)."""
    p = _planner(10.0, 0.01, 0.5, 0.001, acceptance_prior=0.8)
    for _ in range(3):  # batch 1 as calibrated, every token accepted (till the acceptance settles)
        one = p.choose(Mode.SSD, 1)
        k = one.plan.lookahead
        for _ in range(40):
            p.observe([k], one.plan, p.target(k + 1))
    one = p.choose(Mode.SSD, 1)
    assert (Mode.SSD, 1, False) in p._cache
    big = p.choose(Mode.SSD, 32)
    assert p.scales(32).verify == pytest.approx(p.scales(1).verify)  # a new bucket starts from the nearest
    kb = big.plan.lookahead
    for _ in range(60):  # a burst at 32, verifies at 2x
        p.observe([kb] * 32, big.plan, 2.0 * p.target(32 * (kb + 1)))
    assert p.scales(32).verify == pytest.approx(2.0, rel=0.02)
    assert p.scales(1).verify == pytest.approx(1.0, rel=0.02)
    assert (Mode.SSD, 1, False) in p._cache  # batch 1's plan stands: nothing moved for it
    assert (Mode.SSD, 32, False) not in p._cache  # batch 32's was re-planned from its own readings
    again = p.choose(Mode.SSD, 32)
    assert again.tokens_per_s < big.tokens_per_s  # priced at the verify it measured
    assert p.choose(Mode.SSD, 1) == one
