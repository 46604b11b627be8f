"""``samadapt serve``: start the app (uvicorn) on 127.0.0.1 by default, with a fresh token in the printed address."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import secrets
import socket
import sys
from pathlib import Path

from samadapt.cli.options import DEVICE_HELP, KEEP_COMPONENTS_HELP
from samadapt.errors import ConfigError


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


WILDCARD = ("0.0.0.0", "::", "")


def _names_of(host: str) -> list[str]:
    """The names a browser reaches ``--host`` by: itself, or for an all-interfaces bind this machine's names and
    addresses (others with --allow-host)."""
    if host not in WILDCARD:
        return [host]
    names = {socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(OSError):  # a machine whose name does not resolve: its names only
        names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    return sorted(names)


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from samadapt.inference import load_predictor
    from samadapt.serve.app import create_app
    from samadapt.serve.session import Workspace

    if args.no_token and (args.token or not _loopback(args.host)):
        raise ConfigError("--no-token: only on a loopback address (127.0.0.1, localhost, ::1), and without --token")
    token = None if args.no_token else args.token or secrets.token_urlsafe(16)
    hosts = [*(args.allow_host or []), *_names_of(args.host)]
    demo = None
    if not args.root or args.demo:
        from samadapt.data.demo import fetch_demo

        demo = fetch_demo()
    predictor = load_predictor(args.run, device=args.device, keep_components=args.keep_components)
    run = predictor.run
    workspace = Workspace(
        predictor, roots=[Path(r) for r in args.root or []], demo=demo, labels_dir=args.labels, device=args.device
    )
    app = create_app(workspace, token=token, hosts=hosts)
    shown = "127.0.0.1" if args.host in WILDCARD else f"[{args.host}]" if ":" in args.host else args.host
    query = f"/?token={token}" if token else "/"
    print(f"samadapt serve: {run.label} on http://{shown}:{args.port}{query}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        workspace.close()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from samadapt.components import KEEP_COMPONENTS

    parser = subparsers.add_parser("serve", help="interactive segmentation in the browser (docs/app.md)")
    parser.add_argument("--run", default="lite_medsam", help="run directory or model name (default lite_medsam)")
    parser.add_argument(
        "--root", action="append", help="a folder whose images and datasets may be opened and written (repeatable)"
    )
    parser.add_argument(
        "--demo", action="store_true", help="offer the demo datasets too (default: only without --root)"
    )
    parser.add_argument("--labels", help="where saved label files go by default (default: ROOT/labels)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", help="required on every request (default: a fresh one, in the printed address)")
    parser.add_argument(
        "--no-token", action="store_true", help="no token (a trusted single-user machine; loopback addresses only)"
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        help="another name the app is reached by (a reverse proxy, a DNS name of this machine; repeatable); "
        "requests for other names are refused",
    )
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument(
        "--keep-components",
        choices=KEEP_COMPONENTS,
        default="all",
        help=KEEP_COMPONENTS_HELP + " (the page can switch it)",
    )
    parser.add_argument("--log-level", default="warning")
    parser.set_defaults(func=serve_command)
