"""The performance model (ssd_core.perfmodel): it reduces to the paper's closed forms, its batch
form, and `ssd simulate` end to end on tiny models (no timing assertions: only that it measures,
predicts and reports)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import save_tiny_pair
from ssd_cli.main import main
from ssd_core.perfmodel import (ComponentTimes, RequestCounts, expected_round_ms, expected_tokens_per_round,
                                expected_tokens_per_s, hit_rate_from_fanout, missed_rows, paper_speedup_sd, paper_speedup_ssd,
                                predict_requests, request_ms)


def _times(**kw) -> ComponentTimes:
    base = dict(lookahead=4, ar_step=1.0, verify=1.0, commit=0.0, jit=0.6, answer=0.0, tree_build=0.8, transport=0.0)
    base.update(kw)
    return ComponentTimes(**base)


@pytest.mark.parametrize("t_p,t_b,p_hit", [(0.8, 0.6, 0.9), (0.5, 1.5, 0.3), (1.0, 0.2, 0.0), (0.99, 0.4, 1.0)])
def test_reduces_to_theorem_7_without_overheads(t_p, t_b, p_hit):
    t = _times(tree_build=t_p, jit=t_b)
    e = expected_tokens_per_round(0.8, 4)
    ssd_over_ar = expected_tokens_per_s(t, "ssd", e, p_hit=p_hit) / expected_tokens_per_s(t, "ar", e)
    assert ssd_over_ar == pytest.approx(paper_speedup_ssd(p_hit, e, e, t_p, t_b))


def test_sd_matches_the_paper_form():
    t = _times(jit=0.7)
    e = expected_tokens_per_round(0.7, 4)
    assert expected_tokens_per_s(t, "sd", e) / expected_tokens_per_s(t, "ar", e) == pytest.approx(paper_speedup_sd(0.7, 4, 0.7))


def test_tokens_per_round_limits():
    assert expected_tokens_per_round(0.0, 5) == pytest.approx(1.0)
    assert expected_tokens_per_round(1.0, 5) == pytest.approx(6.0)
    assert expected_tokens_per_round(0.5, 1) == pytest.approx(1.5)


def test_slow_tree_build_shows_as_the_round_time():
    fast, slow = _times(tree_build=0.5), _times(tree_build=2.0)
    assert expected_round_ms(fast, "ssd", 1.0) == pytest.approx(1.0)
    assert expected_round_ms(slow, "ssd", 1.0) == pytest.approx(2.0)  # T_p > T_v: the target waits
    beside = _times(tree_build=0.9, tree_slowdown=1.5)
    assert expected_round_ms(beside, "ssd", 1.0) == pytest.approx(1.35)


def test_batch_form_any_miss_stalls_the_batch():
    t = _times(jit=1.0)
    one = expected_round_ms(t, "ssd", 0.9, batch=1)
    many = expected_round_ms(t, "ssd", 0.9, batch=16)
    assert one == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    assert many == pytest.approx(0.9 ** 16 * 1.0 + (1 - 0.9 ** 16) * 2.0)
    assert many > one


def test_a_batch_miss_drafts_for_the_rows_that_missed():
    """The JIT backup forwards only the rows that missed: E[missed | >= 1 missed] rows of a batch,
    whose drafting (miss_jit) is what a round with a miss waits for, not a whole-batch JIT."""
    assert missed_rows(0.9, 1) == 1.0 and missed_rows(0.0, 8) == 8.0 and missed_rows(1.0, 8) == 1.0
    for p, b in ((0.74, 4), (0.5, 8), (0.9, 32)):  # E[missed] = P(any miss) * E[missed | any]
        assert (1 - p ** b) * missed_rows(p, b) == pytest.approx(b * (1 - p))
        assert 1.0 <= missed_rows(p, b) <= b
    whole, subset = _times(jit=1.0), _times(jit=1.0, miss_jit=0.25)
    assert expected_round_ms(subset, "ssd", 0.9, batch=16) == pytest.approx(0.9 ** 16 * 1.0 + (1 - 0.9 ** 16) * 1.25)
    assert expected_round_ms(subset, "ssd", 0.9, batch=16) < expected_round_ms(whole, "ssd", 0.9, batch=16)
    assert expected_round_ms(subset, "sd") == expected_round_ms(whole, "sd")  # SD drafts for every row


def test_hit_rate_from_fanout():
    assert hit_rate_from_fanout(0.8, (0, 0, 0)) == 0.0
    assert hit_rate_from_fanout(0.8, (1, 1, 1)) == 0.0  # F = 1 misses always under F^-r with r = 1 ... F^-1 = 1
    big = hit_rate_from_fanout(0.8, (10**6,) * 4)
    assert big == pytest.approx(1.0, abs=1e-5)
    mid = hit_rate_from_fanout(0.8, (4, 4, 4, 4), r=1.0)
    assert mid == pytest.approx(0.75)


def test_request_time_counts_hits_and_misses():
    t = _times(transport=0.1, answer=0.05, commit=0.2, prefill_target=(1.0, 0.1), prefill_draft=(0.5, 0.01))
    c = RequestCounts(prompt_tokens=10, new_tokens=20, rounds=5, hits=3)
    hit = 0.05 + max(0.1 + 1.0 + 0.2, 0.8)
    miss = 0.6 + max(0.1 + 1.0 + 0.2, 0.8)
    prefill = (1.0 + 1.0) + 0.1 + (0.5 + 0.1)
    assert request_ms(t, "ssd", c) == pytest.approx(prefill + 3 * hit + 2 * miss)
    assert request_ms(t, "sd", c) == pytest.approx(prefill + 5 * (0.1 + 0.6 + 1.0 + 0.2))
    assert request_ms(t, "ar", c) == pytest.approx(2.0 + 5 * 1.0)
    (tps,) = predict_requests(t, "ar", [c])
    assert tps == pytest.approx(20 / 0.007)
    with pytest.raises(ValueError):
        request_ms(t, "warp", c)


def test_paper_scenario_predicts_the_papers_ssd_from_its_ar_and_sd(tmp_path, capsys):
    out = tmp_path / "paper.json"
    assert main(["simulate", "--scenario", "paper-70b-1b", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["best"]["1"]["tokens_per_s"]
    assert res["ar"] == pytest.approx(54.7, rel=0.01) and res["sd"] == pytest.approx(176, rel=0.01)
    assert res["ssd"] == pytest.approx(283, rel=0.05)  # the paper's HumanEval SSD, not an input
    assert "SSD/SD" in capsys.readouterr().out


def test_one_gpu_scenario_prefers_sd():
    """Issue 8's one-GPU measurements: sharing bandwidth, SSD is no faster than SD."""
    from ssd_bench.simulate import SCENARIOS_DIR, load_scenario, sweep

    two = sweep(load_scenario(SCENARIOS_DIR / "h100-2gpu-8b-1b.json"))["best"]["1"]
    one = sweep(load_scenario(SCENARIOS_DIR / "h100-1gpu-mps-8b-1b.json"))["best"]["1"]
    assert two["ssd/sd"] > 1.0 > one["ssd/sd"]
    assert two["recommend"] == {"mode": "ssd", "lookahead": two["best_k"]["ssd"]}
    assert one["recommend"]["mode"] == "sd"  # the placement policy picks SD on one GPU


@pytest.mark.slow  # ~70 s on 2 vCPUs: components, calibration and two bench repeats
def test_simulate_measures_predicts_and_reports_on_tiny_models(tmp_path, capsys):
    target, draft = save_tiny_pair(tmp_path)
    out = tmp_path / "sim.json"
    rc = main(["simulate", "--target", str(target), "--draft", str(draft), "--num-prompts", "2", "--calib-prompts", "1",
               "--max-new-tokens", "12", "--reps", "3", "--repeats", "2", "--json", str(out),
               # tiny models on a shared CPU: the 15% bar is for real runs; this checks the pipeline
               "--tolerance", "1000"])
    assert rc == 0, capsys.readouterr().err[-4000:]  # a str: pytest shows it whole, not a clipped repr
    res = json.loads(out.read_text())
    assert res["outputs_identical"] is True
    comp = res["components_ms"]
    for key in ("ar_step", "verify", "commit", "jit", "answer", "tree_build", "transport"):
        assert comp[key] > 0, key
    assert comp["verify_slowdown"] >= 1.0 and comp["tree_slowdown"] >= 1.0
    for mode in ("ar", "sd", "ssd"):
        row = res["modes"][mode]
        assert row["measured_tokens_per_s"] > 0 and math.isfinite(row["predicted_tokens_per_s"]) and row["predicted_tokens_per_s"] > 0
    assert res["modes"]["ssd"]["hits"] <= res["modes"]["ssd"]["rounds"]
    assert res["within_tolerance"] is True and res["tolerance"] == 1000


def test_simulate_exits_1_when_a_prediction_is_off(tmp_path, monkeypatch, capsys):
    from ssd_bench import simulate

    target, draft = save_tiny_pair(tmp_path)
    seen = {}

    def off_by_much(*args):
        seen["tolerance"] = args[-1]
        return {"within_tolerance": False, "outputs_identical": True}

    monkeypatch.setattr(simulate, "validate", off_by_much)
    monkeypatch.setattr(simulate, "format_validation", lambda res: "")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"def f{i}(x):"}) + "\n" for i in range(3)))
    rc = main(["simulate", "--target", str(target), "--draft", str(draft), "--prompts", str(prompts),
               "--num-prompts", "2", "--calib-prompts", "1"])
    assert rc == 1 and seen == {"tolerance": 0.15}


def test_pool_prediction_reduces_to_one_pair_and_batching_beats_per_session():
    from ssd_core.perfmodel import ComponentTimes, expected_round_ms, pool_prediction

    def step(tokens: int) -> float:  # a draft forward: 1 ms fixed + 0.01 ms per query token
        return 1.0 + 0.01 * tokens

    k, branches = 3, 8
    t = ComponentTimes(lookahead=k, ar_step=10, verify=10, commit=0.2, jit=k * step(1) + 0.1, answer=0.1,
                       tree_build=step(k + 1) + k * step(branches), transport=0.3)
    one = pool_prediction(t, step, targets=1, branches_per_row=branches, e_hit=3.0, p_hit=0.8)
    assert one.round_ms == pytest.approx(expected_round_ms(t, "ssd", p_hit=0.8))  # R = 1: the pair's own round
    assert one.tokens_per_s_per_target == pytest.approx(3.0 / (one.round_ms / 1000))
    for r in (4, 8):  # at R = 2 a fast draft keeps up either way (and a miss delays both rows when batched)
        b = pool_prediction(t, step, targets=r, branches_per_row=branches, e_hit=3.0, p_hit=0.8)
        s = pool_prediction(t, step, targets=r, branches_per_row=branches, e_hit=3.0, p_hit=0.8, batched=False)
        assert b.rows_per_step == r and s.rows_per_step == 1
        assert b.tokens_per_s_per_target > s.tokens_per_s_per_target
        assert 0 < b.draft_utilization <= 1 and s.draft_utilization <= 1
    eight = pool_prediction(t, step, targets=8, branches_per_row=branches, e_hit=3.0, p_hit=0.8, batched=False)
    assert eight.draft_utilization == 1.0  # 8 sessions stepped one by one: the draft paces them
    assert pool_prediction(t, step, targets=8, drafts=4, branches_per_row=branches, e_hit=3.0,
                           p_hit=0.8).rows_per_step == 2  # R:D = 2
    with pytest.raises(ValueError):
        pool_prediction(t, step, targets=0)
