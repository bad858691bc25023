"""The allowed imports between the top-level packages, checked on every import in the source.

Read from the files with `ast`, so lazy imports inside functions and `importlib.import_module("...")`
with a literal name count too. The rules (docs/design.md, "Layers"):

- the core (ssd_core) imports no service, CLI, bench or gateway; only the generated protos;
- the services (target_service, draft_service) import the core, the protos and ssd_tls: never each
  other, the client, the gateway or the CLI;
- the client distribution (client, ssd_protos, ssd_tls) imports only itself, the standard library,
  grpc and protobuf: neither torch nor the core (it installs without them);
- the bench imports neither the CLI nor a service; only ssd_cli composes everything.
"""

from __future__ import annotations

import ast
import pathlib
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCE_ROOTS = (REPO, REPO / "ssd-client")  # where the top-level packages live (ssd-client: its distribution)

CLIENT_DISTRIBUTION = frozenset({"client", "ssd_protos", "ssd_tls"})
CORE, SERVICE_BASE = frozenset({"ssd_core", "ssd_protos"}), frozenset({"ssd_core", "ssd_protos", "ssd_tls"})

# package -> the project packages it may import (besides itself)
ALLOWED: dict[str, frozenset[str]] = {
    "ssd_protos": frozenset(),
    "ssd_tls": frozenset(),
    "client": frozenset({"ssd_protos", "ssd_tls"}),
    "ssd_core": frozenset({"ssd_protos"}),
    "ssd_train": CORE,
    "target_service": SERVICE_BASE,
    "draft_service": SERVICE_BASE,
    "openai_gateway": frozenset({"client", "ssd_tls"}) | CORE,
    "ssd_bench": frozenset({"client", "ssd_train"}) | CORE,
    "k8s_autoscaler": frozenset(),
    "ssd_cli": frozenset({"client", "ssd_tls", "ssd_train", "ssd_bench", "target_service", "draft_service",
                          "openai_gateway", "k8s_autoscaler"}) | CORE,
}
# third-party imports the client distribution may use: its only dependencies are grpcio and protobuf
CLIENT_THIRD_PARTY = frozenset({"grpc", "google"})


def imported_modules(source: str) -> set[str]:
    """Absolute names of every module `source` imports (relative imports stay inside the package)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def top_level_packages(roots: tuple[pathlib.Path, ...]) -> dict[str, list[pathlib.Path]]:
    """Each top-level package (a directory with __init__.py, or a module in the ssd-client root) -> its files."""
    found: dict[str, list[pathlib.Path]] = {}
    for root in roots:
        for init in sorted(root.glob("*/__init__.py")):
            found[init.parent.name] = sorted(init.parent.rglob("*.py"))
        if root != REPO:
            for module in sorted(root.glob("*.py")):
                found[module.stem] = [module]
    return found


def violations(packages: dict[str, list[pathlib.Path]], allowed: dict[str, frozenset[str]]) -> list[str]:
    """One line per forbidden import: 'file: package imports module'."""
    project = set(packages)
    stdlib = set(sys.stdlib_module_names)
    found = []
    for package, files in sorted(packages.items()):
        if package not in allowed:
            found.append(f"{package}: no layering rule (add it to ALLOWED in tests/test_layering.py)")
            continue
        for path in files:
            for module in sorted(imported_modules(path.read_text())):
                top = module.split(".")[0]
                if top == package:
                    continue
                forbidden_project = top in project and top not in allowed[package]
                # the client distribution installs with grpcio and protobuf only
                forbidden_third_party = (package in CLIENT_DISTRIBUTION and top not in project
                                         and top not in stdlib and top not in CLIENT_THIRD_PARTY)
                if forbidden_project or forbidden_third_party:
                    found.append(f"{path}: {package} imports {module}")
    return found


def test_main_has_no_forbidden_import() -> None:
    packages = top_level_packages(SOURCE_ROOTS)
    assert {"ssd_core", "target_service", "draft_service", "client", "ssd_cli", "ssd_bench"} <= set(packages)
    assert violations(packages, ALLOWED) == []


def _fake_tree(root: pathlib.Path, files: dict[str, str]) -> dict[str, list[pathlib.Path]]:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    for package in {name.split("/")[0] for name in files}:
        (root / package / "__init__.py").touch()
    return top_level_packages((root,))


def test_a_forbidden_import_is_reported(tmp_path: pathlib.Path) -> None:
    packages = _fake_tree(tmp_path, {
        "ssd_core/engine.py": "import torch\nfrom ssd_protos.ssd.v1 import speculation_pb2\n",  # allowed
        "ssd_core/bad.py": "def f():\n    from target_service.server import create_server\n",  # lazy: still counts
        "target_service/server.py": "import importlib\nimportlib.import_module('openai_gateway.server')\n",
        "draft_service/session.py": "from client.retry import parse_addresses\nimport ssd_tls\n",
        "client/codec.py": "import torch\nimport grpc\nfrom google.protobuf import message\n",
        "ssd_bench/grpc_mode.py": "from ssd_cli.local_services import service_pair\n",
        "ssd_protos/x.py": "", "ssd_tls/__init__.py": "", "openai_gateway/server.py": "", "ssd_cli/main.py": "",
    })  # fmt: skip
    found = violations(packages, ALLOWED)
    assert [line.split(": ", 1)[1] for line in found] == [
        "client imports torch",
        "draft_service imports client.retry",
        "ssd_bench imports ssd_cli.local_services",
        "ssd_core imports target_service.server",
        "target_service imports openai_gateway.server",
    ]


def test_a_package_without_a_rule_is_reported(tmp_path: pathlib.Path) -> None:
    packages = _fake_tree(tmp_path, {"ssd_new/thing.py": "import ssd_core\n", "ssd_core/x.py": ""})
    assert violations(packages, ALLOWED) == ["ssd_new: no layering rule (add it to ALLOWED in tests/test_layering.py)"]
