"""`ssd bench` smoke test on tiny random models: it runs, writes JSON and plots, outputs agree.
No speed assertion (timings are not tested)."""

from __future__ import annotations

import json

import pytest

from conftest import save_tiny_pair
from ssd_cli.main import main


@pytest.mark.slow
def test_bench_runs_all_in_process_modes_and_outputs_agree(tmp_path, capsys):
    target, draft = save_tiny_pair(tmp_path)
    out = tmp_path / "bench.json"
    rc = main(["bench", "--target", str(target), "--draft", str(draft), "--num-prompts", "2", "--max-new-tokens", "8",
               "--modes", "ar,sd,ssd,hf-assisted", "--batch-sizes", "1,2", "--lookahead", "3", "--json", str(out),
               "--plots", str(tmp_path / "plots")])
    assert rc == 0, capsys.readouterr().err[-4000:]  # a str: pytest shows it whole, not a clipped repr
    rep = json.loads(out.read_text())
    assert rep["outputs_identical"] is True
    for mode in ("ar", "sd", "ssd", "hf-assisted"):
        m = rep["modes"][mode]
        assert m["tokens_per_s"] > 0 and "round_breakdown_ms" in m and "cache_hit_rate" in m
    assert set(rep["modes"]["ssd"]["by_batch"]) == {"1", "2"}
    # the warm-up pass (default: as many prompts as are measured) ran first, unmeasured, at each size
    assert rep["config"]["warmup_prompts"] == 2
    for mode in ("ar", "sd", "ssd"):
        for b, prompts in (("1", 2), ("2", 2)):
            warm = rep["modes"][mode]["by_batch"][b]["warmup"]
            assert warm["prompts"] == prompts and warm["rounds"] > 0 and warm["tokens_per_s"] > 0
    assert "warmup" not in rep["modes"]["hf-assisted"]
    assert rep["hardware"]["cores"] >= 1 and rep["date"] and rep["config"]["lookahead"] == 3
    assert (tmp_path / "plots" / "tokens_per_s_by_mode.png").stat().st_size > 0
    assert "ssd/sd" in rep["ratios"]


def test_load_prompts_offset_gives_the_next_prompts_and_cycles(tmp_path):
    from ssd_bench.bench import load_prompts

    class Chars:  # a tokenizer: one id per character
        def encode(self, text):
            return [ord(c) for c in text]

    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ("a", "b", "c")))
    ids = lambda ps: ["".join(map(chr, p)) for p in ps]  # noqa: E731
    assert ids(load_prompts(str(src), Chars(), 2, 100, 100)) == ["a", "b"]
    assert ids(load_prompts(str(src), Chars(), 2, 100, 100, offset=2)) == ["c", "a"]  # warm-up: after the measured
    assert ids(load_prompts(str(src), Chars(), 1, 100, 100, offset=1)) == ["b"]


def test_bench_rejects_unknown_modes(tmp_path, capsys):
    target, draft = save_tiny_pair(tmp_path)
    assert main(["bench", "--target", str(target), "--draft", str(draft), "--modes", "ar,warp"]) != 0
    assert "warp" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_ssd_grpc_mode_runs_services_and_agrees(tmp_path, capsys, monkeypatch):
    target, draft = save_tiny_pair(tmp_path)
    monkeypatch.setenv("SSD_BENCH_LOG_DIR", str(tmp_path / "logs"))
    out = tmp_path / "bench.json"
    rc = main(["bench", "--target", str(target), "--draft", str(draft), "--num-prompts", "2", "--max-new-tokens", "8",
               "--modes", "ar,ssd,ssd-grpc", "--lookahead", "3", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err[-4000:]  # a str: pytest shows it whole, not a clipped repr
    rep = json.loads(out.read_text())
    assert rep["outputs_identical"] is True
    assert rep["modes"]["ssd-grpc"]["rounds"] > 0
    assert rep["grpc_control_overhead_ms_per_round"] is not None


@pytest.mark.slow
def test_bench_served_mode_streams_openai_and_grpc_and_outputs_agree(tmp_path, capsys, monkeypatch):
    target, draft = save_tiny_pair(tmp_path)
    monkeypatch.setenv("SSD_BENCH_LOG_DIR", str(tmp_path / "logs"))
    out = tmp_path / "bench.json"
    rc = main(["bench", "--target", str(target), "--draft", str(draft), "--num-prompts", "2", "--max-new-tokens", "8",
               "--modes", "ar,ssd", "--served", "1:8,3:4", "--served-repeats", "2", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err[-4000:]  # a str: pytest shows it whole, not a clipped repr
    rep = json.loads(out.read_text())
    assert rep["command"].startswith("ssd bench ") and "--served" in rep["command"]
    assert rep["git"]["commit"] and rep["hardware"]["cpu"] and rep["hardware"]["cores"] >= 1 and rep["date"]
    served = rep["served"]
    assert served["outputs_identical"] is True and rep["outputs_identical"] is True, served["problems"]
    assert served["config"]["repeats"] == 2 and served["config"]["levels"] == [[1, 8], [3, 4]]
    assert served["config"]["warmup_passes"] == 1  # the default: one unmeasured pass first
    for api in ("openai", "grpc"):
        for mode in ("ar", "sd", "ssd"):
            for c, tokens, requests in (("1", 8, 2), ("3", 4, 3)):
                cell = served["results"][api][mode][c]
                assert cell["max_new_tokens"] == tokens and cell["requests"] == requests
                assert len(cell["repeats"]) == 2 and all(r["tokens"] == tokens * requests for r in cell["repeats"])
                assert cell["per_user_tokens_per_s"] > 0 and set(cell["ttft_ms"]) == set(cell["itl_ms"]) == {"p50", "p90", "p99"}
        assert {"ssd/sd", "ssd/ar", "sd/ar"} <= set(served["ratios"][f"{api} c=1"])
    assert "served" in capsys.readouterr().out
