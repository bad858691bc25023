"""`--threads` / `--cpus` of `ssd serve target|draft`: defaults that do not oversubscribe, clear errors."""

from __future__ import annotations

import os

import pytest

from ssd_cli.main import main
from ssd_core.cpu_placement import CpuPlacement, choose_placement, parse_cpus


def test_default_is_one_thread_unpinned():
    assert choose_placement(0, "") == CpuPlacement(threads=1, cpus=None)


def test_cpus_pin_and_give_one_thread_per_core():
    core = min(os.sched_getaffinity(0))
    assert choose_placement(0, str(core)) == CpuPlacement(threads=1, cpus=frozenset({core}))
    assert choose_placement(3, str(core)).threads == 3  # an explicit --threads wins


def test_parse_cpus_lists_and_ranges():
    assert parse_cpus("0,2-4, 7") == frozenset({0, 2, 3, 4, 7})
    assert parse_cpus(" ") is None


@pytest.mark.parametrize("text", ["a", "3-1", "-1", "1,,x"])
def test_parse_cpus_refuses_malformed_lists_naming_the_flag(text):
    with pytest.raises(ValueError, match="--cpus"):
        parse_cpus(text)


def test_unavailable_cores_and_negative_threads_are_refused():
    with pytest.raises(ValueError, match="--cpus.*not available"):
        choose_placement(0, "100000")
    with pytest.raises(ValueError, match="--threads"):
        choose_placement(-1, "")


@pytest.mark.parametrize("kind", ["target", "draft"])
def test_serve_refuses_bad_cpus_before_loading_a_model(kind, tmp_path, caplog):
    assert main(["serve", kind, "--model", str(tmp_path / "none"), "--port", "0", "--cpus", "100000"]) == 2
    assert "--cpus" in caplog.text
