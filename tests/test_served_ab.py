"""scripts/served_ab.py's arm syntax (the A/B itself starts services: it is a benchmark, not a test)."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("served_ab", Path(__file__).parent.parent / "scripts" / "served_ab.py")
served_ab = sys.modules["served_ab"] = importlib.util.module_from_spec(_SPEC)  # dataclasses look it up
_SPEC.loader.exec_module(served_ab)


def test_an_arm_names_a_checkout_and_its_target_arguments():
    assert served_ab.Arm.parse("new") == served_ab.Arm("new", None, ())
    assert served_ab.Arm.parse("old@c89e33a") == served_ab.Arm("old", "c89e33a", ())
    assert served_ab.Arm.parse("off:--cache-offers off --threads 1") == served_ab.Arm(
        "off", None, ("--cache-offers", "off", "--threads", "1"))
    assert served_ab.Arm.parse("x@HEAD~1:--cache-offers off").rev == "HEAD~1"
    with pytest.raises(argparse.ArgumentTypeError):
        served_ab.Arm.parse("@HEAD")


def test_the_ab_refuses_fewer_than_two_distinct_arms():
    args = served_ab.parser().parse_args(["--arm", "a", "--arm", "a"])
    with pytest.raises(SystemExit, match="two --arm"):
        served_ab.run(args, "test")
