"""The ``restune`` command line: HTTP commands of its own, more from plugins.

Own commands (HTTP only, through :mod:`clients.sdk`)::

    restune predict IMAGE... --tasks a,b [--url URL] [--top-k N] [--json]
    restune tuners list [--url URL] [--json]
    restune tuners show NAME [--url URL]
    restune tuners push NAME FILE [--promote | --no-promote] [--url URL] [--token TOKEN]
    restune tuners traffic NAME [VERSION=WEIGHT ...] [--url URL] [--token TOKEN] [--json]
    restune tuners promote NAME VERSION [--url URL] [--token TOKEN]
    restune tuners rm NAME [--version V [--force]] [--url URL] [--token TOKEN]
    restune health [--url URL]

Every verb finds the server the same way: ``--url``, else ``$RESTUNE_URL``, else
http://127.0.0.1:8000. ``predict`` and ``health`` also take the URL as their first argument
(``restune predict http://host:8000 a.png --tasks t``), as earlier releases required. The admin
token defaults to ``$RESTUNE_ADMIN_TOKEN``.

Other subcommands (``serve``, ``train``, ...) come from the ``restune.commands`` entry-point
group: each entry point is a callable ``register(subparsers)`` that adds its parsers and sets
``func`` (``func(args) -> int``) on them. They are loaded only when the command line asks for
something that is not an own command, so ``restune predict`` never imports the server or torch,
and a plugin that fails to load prints a warning without breaking the other commands.

Exit codes, stable for scripts:

====  ===============================================================
0     success (``health``: the server is live and ready)
1     the server answered an error about the request (4xx)
2     usage error (bad arguments, unreadable file)
3     no answer: connection refused, DNS failure, timeout
4     the server failed or is overloaded / not ready (5xx)
====  ===============================================================
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from clients.errors import BadImage, ConnectionFailed, Forbidden, RestuneError, Unauthorized
from clients.sdk import DEFAULT_URL, Client, task_list
from clients.types import Prediction, TaskAnswer, Traffic, TunerInfo

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_SERVER = 4

PLUGIN_GROUP = "restune.commands"
OWN_COMMANDS = ("predict", "tuners", "health")

Handler = Callable[[argparse.Namespace], int]


def exit_code_for(err: RestuneError) -> int:
    """The documented exit code of an SDK error."""
    if isinstance(err, ConnectionFailed):
        return EXIT_CONNECTION
    return EXIT_SERVER if err.server_side else EXIT_API_ERROR


# --- output --------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = [header, *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip()
        for line in lines
    )


def describe_answer(answer: TaskAnswer, top: int = 3) -> str:
    """One readable cell for one task's answer."""
    if answer.error is not None:
        return f"error {answer.error.code}: {answer.error.detail}"
    if answer.labels is not None:
        return ", ".join(f"{label} {score:.3f}" for label, score in answer.labels[:top])
    if answer.values is not None:
        return ", ".join(f"{k}={v:.4g}" for k, v in answer.values.items())
    if answer.embedding is not None:
        head = ", ".join(f"{x:.3f}" for x in answer.embedding[:3])
        return f"embedding dim {len(answer.embedding)} [{head}, ...]"
    return json.dumps(answer.raw)


def prediction_table(prediction: Prediction, names: Sequence[str], top: int) -> str:
    """``IMAGE  TASK  VERSION  ANSWER`` rows, one per image and task."""
    rows = []
    for result in prediction:
        image = names[result.image] if result.image < len(names) else str(result.image)
        for task, answer in result.tasks.items():
            version = "" if answer.version is None else f"v{answer.version}"
            rows.append([image, task, version, describe_answer(answer, top)])
    return _table(["IMAGE", "TASK", "VERSION", "ANSWER"], rows)


def tuners_table(tuners: Sequence[TunerInfo]) -> str:
    """One row per tuner."""
    rows = [
        [
            t.name,
            "" if t.version is None else f"v{t.version}",
            t.kind or "",
            str(len(t.labels)) if t.labels else "",
            "" if t.params is None else f"{t.params:,}",
            "" if t.loaded is None else ("yes" if t.loaded else "no"),
        ]
        for t in tuners
    ]
    return _table(["NAME", "VERSION", "KIND", "LABELS", "PARAMS", "LOADED"], rows)


def _print_error(err: RestuneError, args: argparse.Namespace) -> None:
    print(f"restune: error: {err}", file=sys.stderr)
    if isinstance(err, Unauthorized | Forbidden):
        print(
            "restune: hint: pass the admin token with --token or RESTUNE_ADMIN_TOKEN",
            file=sys.stderr,
        )
    if isinstance(err, BadImage) and err.image is not None:
        images = getattr(args, "images", None) or []
        if err.image < len(images):
            print(f"restune: the bad image is {images[err.image]}", file=sys.stderr)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


# --- commands ------------------------------------------------------------------------------


def _client(args: argparse.Namespace, url: str) -> Client:
    token = getattr(args, "token", None) or os.environ.get("RESTUNE_ADMIN_TOKEN") or None
    return Client(url, admin_token=token, timeout=args.timeout)


def _usage(message: str) -> int:
    print(f"restune: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_predict(args: argparse.Namespace) -> int:
    """``restune predict IMAGE... --tasks a,b``."""
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        return _usage(f"no such file: {', '.join(missing)}")
    tasks = task_list(args.tasks)
    if not tasks:
        return _usage("--tasks needs at least one task name")
    with _client(args, args.url) as client:
        prediction = client.predict(list(args.images), tasks, top_k=args.top_k)
    if args.json:
        _print_json(prediction.raw)
    else:
        print(prediction_table(prediction, [Path(p).name for p in args.images], args.top_k))
    return EXIT_OK


def cmd_tuners_list(args: argparse.Namespace) -> int:
    """``restune tuners list``."""
    with _client(args, args.url) as client:
        tuners = client.list_tuners()
    if args.json:
        _print_json([t.raw for t in tuners])
    elif tuners:
        print(tuners_table(tuners))
    else:
        print("no tuners registered")
    return EXIT_OK


def cmd_tuners_show(args: argparse.Namespace) -> int:
    """``restune tuners show NAME``: the full record as JSON."""
    with _client(args, args.url) as client:
        _print_json(client.get_tuner(args.name).raw)
    return EXIT_OK


def cmd_tuners_push(args: argparse.Namespace) -> int:
    """``restune tuners push NAME FILE [--promote | --no-promote]``."""
    path = Path(args.file)
    if not path.is_file():
        return _usage(f"no such file: {path}")
    with _client(args, args.url) as client:
        result = client.push_tuner(args.name, path, promote=args.promote)
    state = "registered" if result.created else "unchanged (identical bytes already registered)"
    live = "current" if result.current else "not current: promote it or give it traffic"
    print(f"{result.name} v{result.version} sha256 {result.sha256[:12]}: {state}, {live}")
    return EXIT_OK


_DIGITS = re.compile(r"[0-9]{1,9}")


def parse_weights(items: Sequence[str]) -> dict[int, int]:
    """``["3=90", "4=10"]`` -> ``{3: 90, 4: 10}``; raises ValueError naming the bad item."""
    weights: dict[int, int] = {}
    for item in items:
        version, sep, weight = item.partition("=")
        # ASCII digits only: str.isdecimal() takes other scripts' digits too.
        if (
            not sep
            or not _DIGITS.fullmatch(version.strip())
            or not _DIGITS.fullmatch(weight.strip())
        ):
            raise ValueError(f"{item!r}: write VERSION=WEIGHT, e.g. 3=90")
        if int(version) in weights:
            raise ValueError(f"version {int(version)} is given twice")
        weights[int(version)] = int(weight)
    return weights


def traffic_line(traffic: Traffic) -> str:
    """``pets: current v4; v3 90%, v4 10%``."""
    shares = ", ".join(
        f"v{v} {100 * traffic.share(v):.4g}%" for v in sorted(traffic.weights) if traffic.weights[v]
    )
    return f"{traffic.name}: current v{traffic.current}; {shares}"


def cmd_tuners_traffic(args: argparse.Namespace) -> int:
    """``restune tuners traffic NAME [VERSION=WEIGHT ...]``: show, or set, the split."""
    try:
        weights = parse_weights(args.weights)
    except ValueError as exc:
        return _usage(str(exc))
    with _client(args, args.url) as client:
        traffic = client.set_traffic(args.name, weights) if weights else client.traffic(args.name)
    if args.json:
        _print_json(traffic.raw)
    else:
        print(traffic_line(traffic))
    return EXIT_OK


def cmd_tuners_promote(args: argparse.Namespace) -> int:
    """``restune tuners promote NAME VERSION``: all traffic to VERSION, which becomes current."""
    with _client(args, args.url) as client:
        traffic = client.promote(args.name, args.version)
    print(traffic_line(traffic))
    return EXIT_OK


def cmd_tuners_rm(args: argparse.Namespace) -> int:
    """``restune tuners rm NAME [--version V [--force]]``."""
    if args.force and args.version is None:
        return _usage("--force goes with --version (deleting a whole tuner needs no force)")
    with _client(args, args.url) as client:
        if args.version is None:
            client.delete_tuner(args.name)
            print(f"deleted {args.name}")
        else:
            gone = client.delete_version(args.name, args.version, force=args.force)
            print(f"deleted {gone.name} v{gone.version}; current is v{gone.current}")
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    """``restune health``: 0 when live and ready, 4 when live but not ready."""
    with _client(args, args.url) as client:
        health = client.health()
    if args.json:
        _print_json({"live": health.live, "ready": health.ready, **health.detail})
    else:
        print(f"live: yes, ready: {'yes' if health.ready else 'no'}")
        for key, value in health.detail.items():
            shown = value if isinstance(value, str | int | float) else json.dumps(value)
            print(f"  {key}: {shown}")
    return EXIT_OK if health.ready else EXIT_SERVER


# --- parser --------------------------------------------------------------------------------


def _common(json_flag: bool = True) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per HTTP attempt (default 30)"
    )
    if json_flag:
        parent.add_argument("--json", action="store_true", help="print the server's JSON")
    return parent


def _url_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=None,
        help=f"server URL (default $RESTUNE_URL or {DEFAULT_URL})",
    )


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def resolve_url(args: argparse.Namespace) -> None:
    """Fill ``args.url``: ``--url``, a URL given as the first positional argument (predict,
    health), ``$RESTUNE_URL``, then the default."""
    given: str | None = getattr(args, "leading", None)
    images = getattr(args, "images", None)
    if isinstance(images, list) and images and _URL_SCHEME.match(images[0]):
        given = images.pop(0)
    args.url = args.url or given
    if not args.url:
        args.url = os.environ.get("RESTUNE_URL") or DEFAULT_URL


def _token_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", help="admin token (default $RESTUNE_ADMIN_TOKEN)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def register_own(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``predict``, ``tuners`` and ``health``."""
    p = subparsers.add_parser(
        "predict",
        parents=[_common()],
        help="run several tasks on images",
        description="Send images to a server and print every task's answer per image.",
    )
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files (PNG, JPEG, ...); a server URL before them is taken as --url",
    )
    _url_option(p)
    p.add_argument("--tasks", required=True, help="comma-separated task names; name@3 pins v3")
    p.add_argument("--top-k", type=_positive, default=5, help="labels per task (default 5)")
    p.set_defaults(func=cmd_predict, finds_server=True)

    tuners = subparsers.add_parser("tuners", help="list, show, push or remove task tuners")
    sub = tuners.add_subparsers(dest="tuners_command", metavar="ACTION", required=True)
    lst = sub.add_parser("list", parents=[_common()], help="list registered tuners")
    _url_option(lst)
    lst.set_defaults(func=cmd_tuners_list, finds_server=True)
    show = sub.add_parser("show", parents=[_common(False)], help="show one tuner as JSON")
    show.add_argument("name")
    _url_option(show)
    show.set_defaults(func=cmd_tuners_show, finds_server=True)
    push = sub.add_parser("push", parents=[_common(False)], help="register an artifact file")
    push.add_argument("name")
    push.add_argument("file", help="a .safetensors tuner artifact")
    promoting = push.add_mutually_exclusive_group()
    promoting.add_argument(
        "--promote",
        dest="promote",
        action="store_true",
        default=None,
        help="make it current and end any canary split",
    )
    promoting.add_argument(
        "--no-promote",
        dest="promote",
        action="store_false",
        help="store and load it only; it takes traffic once promoted or given weight",
    )
    _url_option(push)
    _token_option(push)
    push.set_defaults(func=cmd_tuners_push, finds_server=True)
    traffic = sub.add_parser(
        "traffic",
        parents=[_common()],
        help="show or set the canary split",
        description="Without weights, show how requests are split between versions; with "
        "them (e.g. 3=90 4=10), set the split. All the weight on one version makes it current.",
    )
    traffic.add_argument("name")
    traffic.add_argument("weights", nargs="*", metavar="VERSION=WEIGHT")
    _url_option(traffic)
    _token_option(traffic)
    traffic.set_defaults(func=cmd_tuners_traffic, finds_server=True)
    promote = sub.add_parser(
        "promote", parents=[_common(False)], help="give one version all the traffic"
    )
    promote.add_argument("name")
    promote.add_argument("version", type=_positive)
    _url_option(promote)
    _token_option(promote)
    promote.set_defaults(func=cmd_tuners_promote, finds_server=True)
    rm = sub.add_parser("rm", parents=[_common(False)], help="delete a tuner or one version")
    rm.add_argument("name")
    rm.add_argument("--version", type=_positive, help="delete only this version")
    rm.add_argument(
        "--force",
        action="store_true",
        help="with --version: also if it is current or takes canary traffic",
    )
    _url_option(rm)
    _token_option(rm)
    rm.set_defaults(func=cmd_tuners_rm, finds_server=True)

    h = subparsers.add_parser(
        "health", parents=[_common()], help="check that a server is live and ready"
    )
    h.add_argument("leading", nargs="?", metavar="URL", help="server URL (same as --url)")
    _url_option(h)
    h.set_defaults(func=cmd_health, finds_server=True)


def _plugins() -> list[EntryPoint]:
    return sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name)


def register_plugins(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> list[str]:
    """Call every plugin's ``register(subparsers)``; return warnings for the broken ones."""
    warnings = []
    for ep in _plugins():
        try:
            register = ep.load()
            register(subparsers)
        except Exception as exc:  # a broken plugin must not break the other commands
            warnings.append(f"commands from {ep.value!r} unavailable: {type(exc).__name__}: {exc}")
    return warnings


def build_parser(*, plugins: bool = True) -> tuple[argparse.ArgumentParser, list[str]]:
    """The full parser, and warnings about plugins that failed to load."""
    parser = argparse.ArgumentParser(
        prog="restune",
        description="restune: multi-task vision inference with Res-Tuning bypass tuners.",
        epilog="exit codes: 0 ok, 1 request refused (4xx), 2 usage, 3 no connection, "
        "4 server error or overloaded (5xx)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_own(subparsers)
    warnings = register_plugins(subparsers) if plugins else []
    return parser, warnings


def _first_command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``restune`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Own commands never need the plugins (they import the server, torch...).
    parser, warnings = build_parser(plugins=_first_command(args_list) not in OWN_COMMANDS)
    for warning in warnings:
        print(f"restune: warning: {warning}", file=sys.stderr)
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse: 0 for --help, 2 for usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "finds_server", False):
        resolve_url(args)
    handler: Handler | None = getattr(args, "func", None)
    if handler is None:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    try:
        code = handler(args)
    except RestuneError as err:
        _print_error(err, args)
        return exit_code_for(err)
    except KeyboardInterrupt:
        return 130
    return EXIT_OK if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
