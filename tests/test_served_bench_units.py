"""The served bench's pure parts: levels, percentiles, medians and ratios over repeats, output checks."""

from __future__ import annotations

import numpy as np
import pytest

from ssd_bench.latency import percentile, percentiles
from ssd_bench.served import Level, ServedConfig, parse_levels
from ssd_bench.served_run import aggregate, check_outputs


def test_parse_levels_and_errors_name_the_flag():
    assert parse_levels("1:96, 8:48,32:24") == (Level(1, 96), Level(8, 48), Level(32, 24))
    for bad in ("8", "0:4", "a:b", "4:0"):
        with pytest.raises(ValueError, match="--served"):
            parse_levels(bad)


def test_config_refuses_unknown_apis_and_modes():
    with pytest.raises(ValueError, match="--served-apis"):
        ServedConfig(levels=(Level(1, 4),), apis=("http",))
    with pytest.raises(ValueError, match="served modes"):
        ServedConfig(levels=(Level(1, 4),), modes=("ar", "warp"))
    with pytest.raises(ValueError, match="--served-repeats"):
        ServedConfig(levels=(Level(1, 4),), repeats=0)
    with pytest.raises(ValueError, match="--served-warmup"):
        ServedConfig(levels=(Level(1, 4),), warmup_passes=-1)


def test_percentiles_match_numpy():
    xs = [5.0, 1.0, 9.0, 2.5, 7.0, 3.0]
    for q in (0, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0}


def _cell(repeat, mode, speed, outputs=(("ab", (1, 2)),)):
    lat = {"p50": 1.0, "p90": 2.0, "p99": 3.0}
    summary = {"per_user_tokens_per_s": speed, "ttft_ms": lat, "itl_ms": lat, "tpot_ms": 1.0,
               "throughput_tokens_per_s": speed, "chunks_per_request": 1.0, "requests": 1, "tokens": 2}
    return {"repeat": repeat, "api": "grpc", "mode": mode, "concurrency": 1, "max_new_tokens": 2,
            "summary": summary, "outputs": list(outputs)}


def test_aggregate_takes_medians_and_per_repeat_ratios():
    cfg = ServedConfig(levels=(Level(1, 2),), apis=("grpc",), repeats=3)
    # drift: repeat 2 is twice as fast for both modes; the per-repeat ratio stays 1.5
    cells = [_cell(r, m, s * (2 if r == 2 else 1)) for r in range(3) for m, s in (("sd", 100.0), ("ssd", 150.0))]
    section = aggregate(cells, cfg)
    assert section["results"]["grpc"]["ssd"]["1"]["per_user_tokens_per_s"] == 150.0
    assert section["ratios"]["grpc c=1"] == {"ssd/sd": 1.5}


def test_check_outputs_finds_a_differing_mode_and_a_reference_mismatch():
    same = [_cell(0, "ar", 1.0), _cell(0, "ssd", 1.0)]
    assert check_outputs(same, 1, [(1, 2, 3)], 0.0) == []
    differ = [_cell(0, "ar", 1.0), _cell(0, "ssd", 1.0, outputs=(("ab", (1, 5)),))]
    assert any("ssd" in p for p in check_outputs(differ, 1, None, 0.0))
    assert any("in-process" in p for p in check_outputs(same, 1, [(1, 9)], 0.0))
    assert check_outputs(differ, 1, None, 1.0) == []  # sampled: modes may differ
