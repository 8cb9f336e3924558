"""`gaussad serve` and `gaussad history`: their options and handlers, registered by the CLI's parser.

Imports nothing heavy at module level (the CLI's help answers without torch); the handlers import the
service when they run (which imports torch only for model folders, not for exported .onnx files).
Mistakes (a model folder that fails its checksums, a port in use, an unreachable audit store) raise
`GaussADError`, which the CLI prints as one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gaussad.config import DEFAULT_WORKERS
from gaussad.errors import GaussADError
from gaussad.serve import defaults

GRACEFUL_SHUTDOWN_SECONDS = 30


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `serve` and `history` on the CLI's subcommands."""
    serve = commands.add_parser(
        "serve", help="serve models over HTTP: inspection, audit trail, metrics and a review page"
    )
    serve.add_argument(
        "model_dirs",
        nargs="+",
        metavar="MODEL",
        help="model folders (by `gaussad fit`) or .onnx files (by `gaussad export`), served by name: a "
        "folder's name, a file's name without .onnx",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument(
        "--port", type=int, default=8000, help="port; 0 picks a free one (default: %(default)s)"
    )
    serve.add_argument(
        "--max-batch-size",
        type=int,
        default=defaults.MAX_BATCH_SIZE,
        help="images per forward pass at most (default: %(default)s)",
    )
    serve.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=defaults.MAX_QUEUE_DELAY_MS,
        help="how long the first image of a batch waits for others (default: %(default)s)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=defaults.MAX_QUEUE,
        help="images in the service at once; more are answered 503 (default: %(default)s)",
    )
    serve.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="accepted API keys, one per line: requests need Authorization: Bearer KEY",
    )
    serve.add_argument(
        "--audit",
        default=defaults.DEFAULT_AUDIT,
        metavar="URL",
        help="audit trail: a SQLite file, or postgresql://USER@HOST/DB (default: %(default)s)",
    )
    serve.add_argument(
        "--keep-images", metavar="DIR", help="keep every image inspected here, named by SHA-256"
    )
    serve.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help="threads decoding images (default: %(default)s)"
    )
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.MAX_BODY_BYTES,
        help="request body limit (default: %(default)s, 32 MiB)",
    )
    serve.add_argument(
        "--max-pixels",
        type=int,
        default=defaults.MAX_PIXELS,
        help="images whose header declares more pixels are refused (default: %(default)s)",
    )
    serve.add_argument(
        "--drift-window",
        type=int,
        default=defaults.DRIFT_WINDOW,
        help="recent images per model for drift (default: %(default)s)",
    )
    serve.set_defaults(handler=run_serve)

    history = commands.add_parser("history", help="list decisions from the audit trail")
    history.add_argument(
        "--audit",
        default=defaults.DEFAULT_AUDIT,
        metavar="URL",
        help="the audit trail (default: %(default)s)",
    )
    history.add_argument("--since", help="from a time ago (30m, 12h, 7d) or an ISO time (UTC unless given)")
    history.add_argument("--model", help="only this model's decisions")
    history.add_argument("--anomalous", action="store_true", help="only decisions that flagged the image")
    history.add_argument("--limit", type=int, help="only the latest N decisions")
    history.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="(default: table)"
    )
    history.set_defaults(handler=run_history)


def run_serve(args: argparse.Namespace) -> None:
    """Load the models, open the audit trail, and serve until SIGTERM or Ctrl-C (drains requests first)."""
    import socket

    from gaussad.serve.settings import ServeSettings, check_model_path, read_api_keys

    settings = ServeSettings(
        model_dirs=tuple(Path(path) for path in args.model_dirs),
        audit=args.audit,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        max_queue=args.max_queue,
        api_keys=read_api_keys(args.api_key_file) if args.api_key_file else (),
        keep_images=Path(args.keep_images) if args.keep_images else None,
        workers=args.workers,
        device=args.device,
        max_body_bytes=args.max_body_bytes,
        max_pixels=args.max_pixels,
        drift_window=args.drift_window,
    )
    for path in settings.model_dirs:  # a wrong path is said before the service's libraries load (seconds)
        check_model_path(path)
    import uvicorn

    from gaussad.serve.app import create_app

    app = create_app(settings)
    try:
        listener = socket.create_server(
            (args.host, args.port), family=socket.AF_INET6 if ":" in args.host else socket.AF_INET
        )
    except OSError as error:
        raise GaussADError(f"cannot listen on {args.host}:{args.port} ({error.strerror or error})") from None
    host, port = listener.getsockname()[:2]
    print(f"gaussad: serving {', '.join(settings.names)} on http://{host}:{port}", flush=True)
    config = uvicorn.Config(
        app, log_level="info", access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS
    )
    uvicorn.Server(config).run(sockets=[listener])


def run_history(args: argparse.Namespace) -> None:
    """Print decisions from the audit trail, oldest first."""
    from gaussad.serve.audit import AuditStore, audit_url
    from gaussad.serve.history import format_rows, parse_since

    url = audit_url(args.audit)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise GaussADError(f"no audit trail at {args.audit}")
    since = parse_since(args.since) if args.since else None
    store = AuditStore(url)
    try:
        rows = store.query(since=since, model=args.model, anomalous=args.anomalous, limit=args.limit)
    finally:
        store.close()
    print(format_rows(rows[::-1], args.format))
