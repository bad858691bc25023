"""Optional extras of ssd-serve: a missing one is named, with the pip command that installs it."""

from __future__ import annotations

import importlib.util


class MissingExtra(Exception):
    """A subcommand needs a package of an extra that is not installed."""


def require(extra: str, modules: tuple[str, ...], needed_for: str) -> None:
    """MissingExtra naming `extra` unless every module in `modules` can be imported."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtra(f"{needed_for} needs the `{extra}` extra ({', '.join(missing)} not installed): "
                           f"pip install 'ssd-serve[{extra}]' (from a checkout: pip install -e '.[{extra}]')")
