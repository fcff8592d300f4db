"""`sfllava serve --model DST`: an OpenAI-compatible local server for video chat (design.md §7).

    sfllava serve --model DST [--host 127.0.0.1] [--port 8080] [--api-key KEY]
                  [--media-dir DIR ...] [--max-upload-mb 512] [--max-conversations 4]
                  [--decode-concurrency 8] [generate's model options]

The parts: `request.py` (what a request asks for), `media.py` (the body and the media it
may read), `worker.py` (the model's worker thread, its queue and its round of steps),
`answer.py` (one request's steps), `held.py` (the conversations held in memory), `api.py`
(FastAPI routes, streaming, errors, the key), `page.py` and `page/` (the page at `/`,
design.md §7.6). This
module checks the options, loads the model, binds the socket and runs uvicorn.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import sys
import tempfile

from sfllava_mlx.errors import UserError

from ..options import (
    add_decode_concurrency_argument,
    add_generation_arguments,
    add_model_argument,
    check_decode_concurrency,
    checked_options,
)


def add_arguments(p) -> None:
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs --api-key)")
    p.add_argument("--port", type=int, default=8080, help="port (0: a free one, printed)")
    p.add_argument("--api-key", default=os.environ.get("SFLLAVA_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $SFLLAVA_API_KEY)")
    p.add_argument("--media-dir", action="append", default=None, metavar="DIR",
                   help="a directory whose videos requests may name by path (repeatable; "
                        "default: the current directory)")
    p.add_argument("--max-upload-mb", type=float, default=512,
                   help="largest video sent in a request as a data: URL (413 above)")
    p.add_argument("--max-conversations", type=int, default=4,
                   help="conversations held in memory for follow-ups (least recently used "
                        "dropped)")
    add_decode_concurrency_argument(p, "answers to concurrent requests")
    add_generation_arguments(p)


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback one."""
    name = host.strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback
                               for i in infos)


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def check_options(args) -> list:
    """Refuse what design.md §7 refuses, before the model is loaded; returns the media dirs."""
    if not is_loopback(args.host) and not args.api_key:
        raise UserError(f"refusing to listen on {args.host} without --api-key: a non-loopback "
                        "address is reachable from other machines")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key must not be empty")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, not {args.port}")
    if not args.max_upload_mb > 0:
        raise UserError("--max-upload-mb must be positive")
    if args.max_conversations < 1:
        raise UserError("--max-conversations must be at least 1")
    check_decode_concurrency(args)
    checked_options(args)  # the requests' defaults (a bad --start, ...) and the model
    dirs = args.media_dir or [os.getcwd()]
    for d in dirs:
        if not os.path.isdir(d):
            raise UserError(f"--media-dir {d} is not a directory")
    return [os.path.realpath(d) for d in dirs]


def main(args) -> int:
    dirs = check_options(args)  # before anything heavy is imported
    import uvicorn

    from sfllava_mlx.engine import model_name

    from .api import create_app
    from .log import log
    from .media import Media
    from .worker import Worker

    sock = bind(args.host, args.port)  # before loading: a busy port fails at once
    upload_dir = tempfile.mkdtemp(prefix="sfllava-serve-")  # mode 0700: this user only
    worker = Worker(args)
    try:
        worker.start()  # loads the model on its worker thread
        media = Media(dirs, upload_dir, int(args.max_upload_mb * 2**20))
        mid = model_name(args.model)
        app = create_app(worker, media, model_id=mid, model_arg=args.model,
                         api_key=args.api_key, host=args.host)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        log(f"{mid} on http://{shown}:{port}/v1 (media: {', '.join(dirs)}; "
            f"key {'required' if args.api_key else 'off'})")
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3, timeout_keep_alive=30)
        server = uvicorn.Server(config)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again:
        # SIGTERM then ends the process here, through the clean-up below, with status 0.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        server.run(sockets=[sock])
    finally:
        worker.stop()
        shutil.rmtree(upload_dir, ignore_errors=True)
        sock.close()
    return 0

