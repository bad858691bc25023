#!/usr/bin/env python
"""Soak: N concurrent streaming clients for T seconds against real processes (a target + 2 drafts,
as `ssd up` starts them), while a draft is killed with SIGKILL and restarted every few seconds.

    .venv/bin/python scripts/soak.py --clients 16 --duration 300 --kill-every 10

Counts requests, errors, tokens that differ from the target-only greedy output (reference from the
in-process Engine in AR mode), draft kills, and the target's RSS at start and end; prints one JSON
summary line. Tiny random models are made in a temp dir unless --target/--draft are given.
Exit status 0 iff there were no errors and no wrong tokens.

Sampled (--temperature T > 0): every request is one fixed prompt with its own seed and a few new
tokens (--max-tokens, default 3), on a vocabulary-8 tiny pair; the drafts authenticate as d0 / d1
(peers files) and are trusted, so their q is used. At the end the outputs are compared with the
EXACT joint distribution of those tokens under the target alone (tests/exactref.py) by Pearson's
chi-square; exit status 0 iff no errors and p > 1e-3 (the false-alarm rate).

    .venv/bin/python scripts/soak.py --clients 16 --duration 120 --kill-every 10 --temperature 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: the harness below
from ssd_cli.local_services import Services, free_port  # noqa: E402 - after the path

HOST = "127.0.0.1"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def make_tiny_pair(root: Path, vocab: int = 64) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny_pair  # the suite's tiny seeded pair (no downloads)

    return save_tiny_pair(root, vocab=vocab)


class Procs(Services):
    """Target and draft processes of one run (the shared harness), with their logs under `root`."""

    def __init__(self, root: Path, target_dir: Path, draft_dir: Path, n_targets: int = 1, n_drafts: int = 2,
                 draft_timeout_s: float = 2.0, lease_ttl_s: float = 3.0) -> None:
        super().__init__(root, HOST, cwd=ROOT)
        self.root, self.target_dir, self.draft_dir = root, target_dir, draft_dir
        self.n_targets, self.n_drafts = n_targets, n_drafts
        self._write_credentials(n_targets, n_drafts)
        self.t_ports = [free_port(HOST) for _ in range(n_targets)]
        self.draft_timeout_s, self.lease_ttl_s = draft_timeout_s, lease_ttl_s

    @property
    def targets(self) -> list[str]:
        return [f"{HOST}:{p}" for p in self.t_ports]

    def _write_credentials(self, n_targets: int, n_drafts: int) -> None:
        """Each process authenticates as itself (peers files); the drafts d0.. are trusted (their q is used)."""
        import secrets

        self.tokens = {name: secrets.token_hex(16) for name in [f"r{i}" for i in range(n_targets)] +
                       [f"d{i}" for i in range(n_drafts)]}
        for name, token in self.tokens.items():
            (self.root / f"{name}.token").write_text(token)
        (self.root / "target-peers").write_text("".join(f"{n}:draft:{t}\n" for n, t in self.tokens.items() if n[0] == "d"))
        (self.root / "draft-peers").write_text("".join(f"{n}:target:{t}\n" for n, t in self.tokens.items() if n[0] == "r"))
        self.draft_ids = [f"d{i}" for i in range(n_drafts)]

    def start_replica(self, i: int) -> subprocess.Popen:
        trusted = [arg for d in self.draft_ids for arg in ("--trusted-draft", d)]
        # --planner table: the tiny pair's draft costs as much as its target, so a measured plan would be
        # AR rounds and the soak would not exercise the drafts at all
        self.start_target(f"target{i}", self.target_dir, "--planner", "table", "--replica-id", f"r{i}",
                          "--threads", "1", "--draft-timeout-s", str(self.draft_timeout_s), "--lease-ttl-s",
                          str(self.lease_ttl_s), "--grace-s", "2", "--auth-token-file", str(self.root / f"r{i}.token"),
                          "--peers-file", str(self.root / "target-peers"), *trusted, port=self.t_ports[i])
        return self.procs[f"target{i}"]

    def start_draft_endpoint(self, i: int) -> subprocess.Popen:
        # GetInfo (readiness) is for targets: probe with target r0's credential
        self.start_draft(f"draft{i}", self.draft_dir, self.targets, "--threads", "1", "--draft-id", f"d{i}",
                         "--grace", "1", "--auth-token-file", str(self.root / f"d{i}.token"),
                         "--peers-file", str(self.root / "draft-peers"), probe_token=self.tokens["r0"])
        return self.procs[f"draft{i}"]

    def start_all(self, timeout_s: float = 120.0) -> None:
        """Every target, then every draft; returns once all are ready (gRPC health, ModelInfo, GetInfo)."""
        for i in range(self.n_targets):
            self.start_replica(i)
        for i in range(self.n_drafts):
            self.start_draft_endpoint(i)
        self.wait_all(timeout_s)


def reference(target_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Target-only greedy output from the in-process Engine in AR mode."""
    import torch

    from ssd_core.config import Mode, SamplingParams, SpecConfig
    from ssd_core.engine import Engine, Request
    from ssd_core.models import load_model

    torch.set_num_threads(1)
    engine = Engine(load_model(str(target_dir), "cpu", "float32"), spec=SpecConfig(mode=Mode.AR))
    params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
    results = engine.generate([Request(tuple(p), params, f"ref{i}") for i, p in enumerate(prompts)])
    return [list(r.token_ids) for r in results]


def prompts_for(n: int, vocab: int = 64) -> list[list[int]]:
    return [[(7 * i + 3 * j) % (vocab - 1) + 1 for j in range(4 + i % 5)] for i in range(n)]


def run_load(targets: list[str], prompts: list[list[int]], expected: list[list[int]], clients: int,
             duration_s: float, max_tokens: int, stats: dict, stop: threading.Event | None = None) -> None:
    """`clients` threads streaming greedy SSD/SD requests until `duration_s` passes; fills `stats`."""
    from client import Client

    lock = threading.Lock()
    end = time.monotonic() + duration_s
    errors: list[str] = []

    def worker(w: int) -> None:
        with Client(targets, timeout=60, max_retries=3) as c:
            i = w
            while time.monotonic() < end and not (stop and stop.is_set()):
                p = i % len(prompts)
                mode = ("ssd", "sd")[i % 2]
                i += clients
                try:
                    stream = c.stream(prompt_ids=prompts[p], max_tokens=max_tokens, ignore_eos=True, mode=mode)
                    tokens = [t for d in stream for t in d.token_ids]
                    wrong = sum(a != b for a, b in zip(tokens, expected[p])) + abs(len(tokens) - len(expected[p]))
                    with lock:
                        stats["requests"] += 1
                        stats["tokens"] += len(tokens)
                        stats["wrong_tokens"] += wrong
                        stats["wrong_requests"] += wrong > 0
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    with lock:
                        stats["requests"] += 1
                        stats["errors"] += 1
                        errors.append(repr(exc)[:300])

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["error_samples"] = errors[:5]


SAMPLED_PROMPT = [1, 4, 2]


def run_sampled_load(targets: list[str], clients: int, duration_s: float, max_tokens: int, temperature: float,
                     stats: dict, samples: list[tuple[int, ...]]) -> None:
    """`clients` threads streaming sampled SSD/SD requests of one prompt (seed = request number)."""
    from client import Client

    lock = threading.Lock()
    end = time.monotonic() + duration_s
    counter = iter(range(10**9))
    errors: list[str] = []

    def worker() -> None:
        with Client(targets, timeout=60, max_retries=3) as c:
            while time.monotonic() < end:
                with lock:
                    i = next(counter)
                try:
                    stream = c.stream(prompt_ids=SAMPLED_PROMPT, max_tokens=max_tokens, ignore_eos=True,
                                      temperature=temperature, seed=i, mode=("ssd", "sd")[i % 2])
                    tokens = tuple(t for d in stream for t in d.token_ids)
                    with lock:
                        stats["requests"] += 1
                        stats["tokens"] += len(tokens)
                        samples.append(tokens)
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    with lock:
                        stats["requests"] += 1
                        stats["errors"] += 1
                        errors.append(repr(exc)[:300])

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["error_samples"] = errors[:5]


def sampled_pvalue(target_dir: Path, samples: list[tuple[int, ...]], max_tokens: int, temperature: float) -> float:
    """Chi-square p-value of the samples against the target-only exact joint distribution."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from exactref import chi_square_pvalue, exact_joint
    from ssd_core.models import load_model

    torch.set_num_threads(1)
    target = load_model(str(target_dir), "cpu", "float32", "hf")
    exact = exact_joint(target.model, tuple(SAMPLED_PROMPT), max_tokens, target.vocab_size, temperature=temperature)
    return chi_square_pvalue(samples, exact)


def kill_drafts(procs: Procs, stats: dict, stop: threading.Event, every_s: float, restart_after_s: float) -> None:
    """Every `every_s`: SIGKILL draft0 / draft1 in turn, restart it `restart_after_s` later (same port, id)."""
    victim = 0
    while every_s > 0 and not stop.wait(every_s):
        procs.kill(f"draft{victim}")
        stats["draft_kills"] += 1
        if stop.wait(restart_after_s):
            return
        procs.restart(f"draft{victim}")  # same port and draft id
        victim = 1 - victim


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    ap.add_argument("--kill-every", type=float, default=10.0, help="SIGKILL a draft this often (0: never)")
    ap.add_argument("--restart-after", type=float, default=1.0, help="seconds before the killed draft restarts")
    ap.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 32; sampled 3)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="> 0: sampled soak, output distribution checked against the target's (chi-square)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--draft-timeout-s", type=float, default=2.0)
    ap.add_argument("--target", default=None, help="target model dir (default: a tiny random pair)")
    ap.add_argument("--draft", default=None)
    ap.add_argument("--log-dir", default=None, help="keep process logs here (default: a temp dir)")
    args = ap.parse_args()

    root = Path(args.log_dir or tempfile.mkdtemp(prefix="ssd-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    sampled = args.temperature > 0
    args.max_tokens = args.max_tokens or (3 if sampled else 32)
    if args.target and args.draft:
        target_dir, draft_dir = Path(args.target), Path(args.draft)
    else:
        target_dir, draft_dir = make_tiny_pair(root, vocab=8 if sampled else 64)
    prompts = prompts_for(args.prompts)
    expected = [] if sampled else reference(target_dir, prompts, args.max_tokens)
    samples: list[tuple[int, ...]] = []

    procs = Procs(root, target_dir, draft_dir, draft_timeout_s=args.draft_timeout_s)
    stats = {"requests": 0, "errors": 0, "tokens": 0, "wrong_tokens": 0, "wrong_requests": 0, "draft_kills": 0}
    try:
        procs.start_all()
        target = procs.procs["target0"]
        rss_start = rss_kib(target.pid)
        stop = threading.Event()

        kt = threading.Thread(target=kill_drafts, args=(procs, stats, stop, args.kill_every, args.restart_after),
                              daemon=True)
        t0 = time.monotonic()
        kt.start()
        if sampled:
            run_sampled_load(procs.targets, args.clients, args.duration, args.max_tokens, args.temperature, stats,
                             samples)
        else:
            run_load(procs.targets, prompts, expected, args.clients, args.duration, args.max_tokens, stats)
        stop.set()
        kt.join()
        elapsed = time.monotonic() - t0
        stats.update(
            seconds=round(elapsed, 1), clients=args.clients, max_tokens=args.max_tokens,
            requests_per_s=round(stats["requests"] / elapsed, 2), tokens_per_s=round(stats["tokens"] / elapsed, 1),
            target_rss_kib_start=rss_start, target_rss_kib_end=rss_kib(target.pid),
            target_alive=target.poll() is None, logs=str(root),
        )  # fmt: skip
    finally:
        procs.stop_all()
    if sampled:
        p = sampled_pvalue(target_dir, samples, args.max_tokens, args.temperature)
        stats.update(temperature=args.temperature, chi_square_p=p, alpha=1e-3, distinct_outputs=len(set(samples)))
        print(json.dumps(stats))
        return 0 if stats["errors"] == 0 and p > 1e-3 else 1
    print(json.dumps(stats))
    return 0 if stats["errors"] == 0 and stats["wrong_tokens"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
