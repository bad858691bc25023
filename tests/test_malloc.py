"""ssd_core.malloc: the thresholds reach this process (glibc) and its children, and can be turned off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = """
import os, sys
from ssd_core import malloc
ok = malloc.tune()
print(ok, os.environ.get("MALLOC_MMAP_THRESHOLD_"), os.environ.get("MALLOC_TRIM_THRESHOLD_"))
"""


def _run(env: dict) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_tune_applies_and_exports_the_thresholds():
    from ssd_core import malloc

    env = {"SSD_MALLOC_TUNING": None, "MALLOC_MMAP_THRESHOLD_": None, "MALLOC_TRIM_THRESHOLD_": None}
    ok, mmap, trim = _run(env)
    assert ok == "True"  # glibc accepted both (mallopt returns 1)
    assert (int(mmap), int(trim)) == (malloc.MMAP_THRESHOLD, malloc.TRIM_THRESHOLD)


def test_tune_can_be_turned_off_and_respects_given_values():
    ok, mmap, _ = _run({"SSD_MALLOC_TUNING": "0", "MALLOC_MMAP_THRESHOLD_": None})
    assert (ok, mmap) == ("False", "None")
    ok, mmap, _ = _run({"SSD_MALLOC_TUNING": None, "MALLOC_MMAP_THRESHOLD_": "1048576"})
    assert mmap == "1048576"
