"""deploy/k8s rendered as an operator would: a copy of the tree with made-up credentials in every
overlay's secrets/ (the files its secretGenerator names; the repository holds none)."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "deploy" / "k8s"
_TREE: tuple[Path, dict[str, str]] | None = None


def operator_tree() -> tuple[Path, dict[str, str]]:
    """(the copied deploy/k8s with credentials, {file name: its content}); made once per process."""
    global _TREE
    if _TREE is None:
        tree = Path(tempfile.mkdtemp(prefix="ssd-k8s-")) / "k8s"
        shutil.copytree(SOURCE, tree, ignore=shutil.ignore_patterns("secrets"))
        values: dict[str, str] = {}
        for kustomization in tree.glob("overlays/*/kustomization.yaml"):
            doc = yaml.safe_load(kustomization.read_text())
            for gen in doc.get("secretGenerator", []):
                for entry in gen.get("files", []):
                    rel = entry.partition("=")[2] or entry
                    value = values.setdefault(rel, f"test-{Path(rel).name}-{secrets.token_hex(16)}\n")
                    (kustomization.parent / rel).parent.mkdir(parents=True, exist_ok=True)
                    (kustomization.parent / rel).write_text(value)
        _TREE = tree, values
    return _TREE
