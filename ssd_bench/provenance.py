"""What every bench report records about where it came from: the command, the commit, the date."""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


def git_state(repo: Path = REPO) -> dict:
    """{"commit": sha, "dirty": tracked files modified, "dirty_files"} of the checkout the bench runs from;
    commit None (with the reason) when it is not a git checkout (an installed wheel)."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout  # " M path" lines
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("no git commit for the report: %s", exc)
        return {"commit": None, "dirty": None, "why": str(exc)[:200]}
    files = [line[3:] for line in dirty.splitlines() if line.strip()]
    return {"commit": sha, "dirty": bool(files), "dirty_files": files}  # what differs from the commit


def provenance(command: str) -> dict:
    """The report's header: command, git state, UTC date."""
    return {"command": command, "git": git_state(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
