"""The `ssd` command of the client distribution, and `ssd client generate|info|abort` (no torch).

ssd-client installs the `ssd` script. With the server distribution (ssd-serve) installed, `ssd`
runs the server's full CLI, found through the `ssd.cli` entry point (the client never imports
the server); without it, `ssd` has only the `client` subcommand and says so for the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

from client.codec import MODES
from client.errors import SSDError
from client.sync_client import Client
from client.types import GenerationResult
from ssd_tls import add_client_tls_arguments, client_credentials

SERVER_CLI_GROUP = "ssd.cli"  # ssd-serve registers its `ssd` main here (its pyproject.toml)


def main(argv: list[str] | None = None) -> int:
    """`ssd ...`: the server's CLI when installed, else the client-only one."""
    argv = sys.argv[1:] if argv is None else argv
    server_main = _server_main()
    if server_main is not None:
        return int(server_main(argv) or 0)
    first = argparse.ArgumentParser(add_help=False)  # only to name a command this install lacks
    first.add_argument("--log-level")
    first.add_argument("command", nargs="?")
    command = first.parse_known_args(argv)[0].command
    if command not in (None, "client"):
        print(f"ssd {command}: not installed: this is the client distribution (ssd-client), which has only "
              f"`ssd client ...`; `ssd {command}` needs the server distribution (ssd-serve)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="ssd", description="SSD client (the ssd-client distribution)",
                                     epilog="generate, serve, bench and the other commands come with the server "
                                            "distribution (ssd-serve)")
    parser.add_argument("--log-level", default="WARNING", help="python logging level (default WARNING)")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:  # bad flags, unreadable TLS files: as the server CLI reports them
        print(f"ssd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _server_main() -> Callable[[list[str]], int] | None:
    found = entry_points(group=SERVER_CLI_GROUP, name="main")
    return next(iter(found)).load() if found else None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("client", help="call a running target service over gRPC")
    commands = parser.add_subparsers(dest="client_command", metavar="CLIENT_COMMAND", required=True)

    gen = commands.add_parser("generate", help="generate from a prompt")
    _add_common(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer on the server)")
    prompt.add_argument("--prompt-ids", type=_int_list, help="prompt token ids, e.g. 1,2,3")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--mode", choices=sorted(MODES), default="ssd")
    gen.add_argument("--lookahead", type=int, default=None, help="K (default: the server's)")
    gen.add_argument("--fan-out", type=_int_list, default=None, help="F_0..F_K, e.g. 4,2,1,1,1")
    gen.add_argument("--saguaro-c", type=float, default=None)
    gen.add_argument("--request-id", default=None)
    gen.add_argument("--stream", action="store_true", help="print text as it arrives")
    gen.add_argument("--json", action="store_true", help="print one JSON object: token_ids, text, finish_reason, stats")
    gen.set_defaults(func=_generate)

    info = commands.add_parser("info", help="print the served model and its limits as JSON")
    _add_common(info)
    info.set_defaults(func=_info)

    abort = commands.add_parser("abort", help="abort an in-flight request by id")
    _add_common(abort)
    abort.add_argument("--request-id", required=True)
    abort.set_defaults(func=_abort)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--addr", required=True, help="target address(es): HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds (default 60)")
    parser.add_argument("--max-retries", type=int, default=3, help="retries on UNAVAILABLE (default 3)")
    add_client_tls_arguments(parser, "the targets")


def _credentials(args: argparse.Namespace):
    """TLS channel credentials when --tls-ca is given, else None (plaintext)."""
    return client_credentials(args)


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.replace(" ", ",").split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _generate(args: argparse.Namespace) -> int:
    kwargs = dict(
        prompt=args.prompt, prompt_ids=args.prompt_ids, max_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
        ignore_eos=args.ignore_eos, mode=args.mode, lookahead=args.lookahead, fan_out=args.fan_out,
        saguaro_c=args.saguaro_c, request_id=args.request_id,
    )  # fmt: skip
    with Client(args.addr, timeout=args.timeout, max_retries=args.max_retries, credentials=_credentials(args)) as client:
        try:
            if args.stream:
                result = _stream(client, kwargs, echo=not args.json)
            else:
                result = client.generate(**kwargs)
        except SSDError as error:
            return _fail(args, error)
    if args.json:
        print(json.dumps(result.to_json_dict()))
    elif not args.stream:
        print(result.text if result.text else " ".join(map(str, result.token_ids)))
    return 0


def _stream(client: Client, kwargs: dict, echo: bool) -> GenerationResult:
    with client.stream(**kwargs) as stream:
        for delta in stream:
            if echo:
                sys.stdout.write(delta.text or "".join(f"{t} " for t in delta.token_ids))
                sys.stdout.flush()
        if echo:
            sys.stdout.write("\n")
        if stream.result is None:  # only after a cancel, which this command never does
            raise RuntimeError("stream ended without a result")
        return stream.result


def _info(args: argparse.Namespace) -> int:
    with Client(args.addr, timeout=args.timeout, max_retries=args.max_retries, credentials=_credentials(args)) as client:
        try:
            info = client.model_info()
        except SSDError as error:
            return _fail(args, error)
    print(json.dumps(info.to_json_dict()))
    return 0


def _abort(args: argparse.Namespace) -> int:
    with Client(args.addr, timeout=args.timeout, max_retries=args.max_retries, credentials=_credentials(args)) as client:
        try:
            found = client.abort(args.request_id, reason="ssd client abort")
        except SSDError as error:
            return _fail(args, error)
    print(json.dumps({"request_id": args.request_id, "found": found}))
    return 0 if found else 1


def _fail(args: argparse.Namespace, error: SSDError) -> int:
    # The message starts with the gRPC status name (e.g. "DEADLINE_EXCEEDED: ...").
    print(f"ssd client {args.client_command}: error: {error} (addr {args.addr})", file=sys.stderr)
    return 1
