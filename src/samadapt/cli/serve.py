"""``samadapt serve``: start the app (uvicorn) on 127.0.0.1 by default; another address needs a token."""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import sys
from pathlib import Path

from samadapt.cli.options import DEVICE_HELP


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from samadapt.runs import load_run
    from samadapt.serve.app import create_app
    from samadapt.serve.session import Workspace

    token = args.token
    if not _loopback(args.host) and not token:
        token = secrets.token_urlsafe(16)
    demo = None
    if not args.root or args.demo:
        from samadapt.data.demo import fetch_demo

        demo = fetch_demo()
    run = load_run(args.run, device=args.device)
    workspace = Workspace(
        run, roots=[Path(r) for r in args.root or []], demo=demo, labels_dir=args.labels, device=args.device
    )
    app = create_app(workspace, token=token)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    query = f"/?token={token}" if token else "/"
    print(f"samadapt serve: {run.label} on http://{shown}:{args.port}{query}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        workspace.close()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="interactive segmentation in the browser (docs/app.md)")
    parser.add_argument("--run", default="lite_medsam", help="run directory or model name (default lite_medsam)")
    parser.add_argument(
        "--root", action="append", help="a folder whose images and datasets may be opened and written (repeatable)"
    )
    parser.add_argument(
        "--demo", action="store_true", help="offer the demo datasets too (default: only without --root)"
    )
    parser.add_argument("--labels", help="where saved label files go by default (default: ROOT/labels)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need a token)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", help="required on every request (generated when binding beyond loopback)")
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument("--log-level", default="warning")
    parser.set_defaults(func=serve_command)
