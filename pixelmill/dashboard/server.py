"""The dashboard's web server (tornado): the page, its static files, the JSON API under /api,
thumbnails and /metrics.

- Every route, /metrics and /api included, asks for HTTP basic auth when credentials are
  given; without them the server listens on loopback only (the command refuses any other
  address) and answers only requests whose Host is a loopback name (no DNS rebinding).
- Every POST carries tornado's XSRF token (the ``_xsrf`` cookie and the ``X-XSRFToken``
  header): a page elsewhere cannot make a browser pause or cancel a batch.
- Every read runs in a thread pool (``IOLoop.run_in_executor``), never on the event loop.
- Every JSON body is masked once more on its way out (the database and broker passwords, the
  S3 secret, any URL's password): no secret is ever sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.ioloop import IOLoop

from pixelmill.dashboard.data import ACTIONS, Reader, placeholder
from pixelmill.errors import InputError, ServiceUnavailable, UnknownBatch
from pixelmill.settings import Settings

HERE = Path(__file__).resolve().parent
LOOPBACK = ("127.0.0.1", "::1", "localhost")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "[::1]", "localhost"})
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
BATCH_ID = r"([0-9A-Za-z-]{1,64})"
T = TypeVar("T")
log = logging.getLogger("pixelmill.dashboard")


def parse_credentials(value: str | None) -> list[tuple[str, str]] | None:
    """``user:password`` (several separated by commas) as pairs; None when unset. InputError
    when one has no user or no password."""
    if value is None or value == "":
        return None
    pairs = []
    for credential in value.split(","):
        user, colon, password = credential.partition(":")
        if not (colon and user and password):
            raise InputError(
                "PIXELMILL_DASHBOARD_BASIC_AUTH must be user:password with a non-empty user and "
                "password (several separated by commas)"
            )
        pairs.append((user, password))
    return pairs


def is_loopback(address: str) -> bool:
    return address in LOOPBACK


class Base(tornado.web.RequestHandler):
    """Auth, the Host check and the security headers for every route; JSON errors."""

    @property
    def reader(self) -> Reader:
        return self.application.settings["reader"]  # type: ignore[no-any-return]

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        check_access(self)

    def check_xsrf_cookie(self) -> None:
        """Credentials first (401), then the XSRF token (403): tornado checks the token
        before ``prepare``."""
        check_access(self)
        super().check_xsrf_cookie()

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the thread pool."""
        executor = self.application.settings["executor"]
        return await IOLoop.current().run_in_executor(executor, fn, *args)

    def send_json(self, data: Any) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(self.reader.mask_data(data), ensure_ascii=False))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish(error_body(self, status_code, mask=self.reader.mask, **kwargs))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, tornado.web.HTTPError):
            return
        log.error("dashboard: %s %s: %s", self.request.method, self.request.path,
                  self.reader.mask(repr(value)))  # fmt: skip

    async def guarded(self, fn: Callable[..., T], *args: Any) -> T:
        """``blocking``, with pixelmill's errors as HTTP statuses: an unknown batch 404, a bad
        request 400, a service away 503."""
        try:
            return await self.blocking(fn, *args)
        except UnknownBatch as exc:
            raise tornado.web.HTTPError(404, "%s", str(exc)) from None
        except InputError as exc:
            raise tornado.web.HTTPError(400, "%s", str(exc)) from None
        except ServiceUnavailable as exc:
            raise tornado.web.HTTPError(503, "%s", str(exc)) from None


def check_access(handler: tornado.web.RequestHandler) -> None:
    """Basic auth when credentials are set; otherwise a loopback Host only."""
    credentials = handler.application.settings["credentials"]
    if credentials is None:
        host = handler.request.host_name.lower()
        if host not in LOOPBACK_HOSTS:
            raise tornado.web.HTTPError(403, "%s", "a loopback host name only")
        return
    header = handler.request.headers.get("Authorization", "")
    if header.startswith("Basic "):
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user = password = ""
        ok = False
        for u, p in credentials:  # compare with every one: no early exit
            same = hmac.compare_digest(user.encode(), u.encode())
            same &= hmac.compare_digest(password.encode(), p.encode())
            ok |= same
        if ok:
            return
    raise tornado.web.HTTPError(401, "%s", "authentication required")


def error_body(
    handler: tornado.web.RequestHandler,
    status_code: int,
    mask: Callable[[str], str] = lambda text: text,
    **kwargs: Any,
) -> str:
    """The JSON of an error response, its message ``mask``ed (and the basic-auth challenge for
    a 401: ``send_error`` cleared every header set before)."""
    if status_code == 401:
        handler.set_header("WWW-Authenticate", 'Basic realm="pixelmill", charset="UTF-8"')
    exc = kwargs.get("exc_info", (None, None, None))[1]
    if isinstance(exc, tornado.web.HTTPError) and exc.log_message:
        message = exc.log_message % exc.args if exc.args else exc.log_message
    else:
        message = handler._reason
    handler.set_header("Content-Type", "application/json; charset=utf-8")
    return json.dumps({"error": mask(str(message)), "status": status_code})


class Page(Base):
    def get(self) -> None:
        self.render("index.html", xsrf=self.xsrf_token.decode())


class Static(tornado.web.StaticFileHandler):
    def prepare(self) -> Any:
        check_access(self)
        return super().prepare()

    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Content-Security-Policy", CSP)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish(error_body(self, status_code, **kwargs))


class Xsrf(Base):
    """The XSRF token for a script that uses the API (sets the ``_xsrf`` cookie too)."""

    def get(self) -> None:
        self.send_json({"xsrf": self.xsrf_token.decode()})


class Fleet(Base):
    async def get(self) -> None:
        self.send_json(await self.guarded(self.reader.fleet))


class Batches(Base):
    async def get(self) -> None:
        limit = _int(self.get_query_argument("limit", "50"), 50, 1, 500)
        match = self.get_query_argument("q", "")
        self.send_json(await self.guarded(self.reader.batches, limit, match))


class BatchView(Base):
    async def get(self, batch_id: str) -> None:
        self.send_json(await self.guarded(self.reader.batch, batch_id))


class Jobs(Base):
    async def get(self, batch_id: str) -> None:
        offset = _int(self.get_query_argument("offset", "0"), 0, 0, 10**12)
        limit = _int(self.get_query_argument("limit", "60"), 60, 1, 500)
        status = self.get_query_argument("status", "") or None
        after, before = (self.get_query_argument(k, "") for k in ("after", "before"))
        cursors = {
            k: _int(v, 0, -1, 10**12) for k, v in (("after", after), ("before", before)) if v
        }

        def read() -> Any:
            return self.reader.jobs(batch_id, offset=offset, limit=limit, status=status, **cursors)

        self.send_json(await self.guarded(read))


class Search(Base):
    async def get(self) -> None:
        query = self.get_query_argument("q", "")
        batch = self.get_query_argument("batch", "") or None
        source = self.get_query_argument("source", "") or None
        limit = _int(self.get_query_argument("limit", "48"), 48, 1, 200)
        self.send_json(await self.guarded(self.reader.search, query, batch, source, limit))


class Act(Base):
    async def post(self, batch_id: str, action: str) -> None:
        if action not in ACTIONS:
            raise tornado.web.HTTPError(404, "%s", f"unknown action {action!r}")
        priority = self.get_argument("priority", None)
        if priority is None and self.request.body:
            with contextlib.suppress(ValueError, AttributeError):
                priority = json.loads(self.request.body).get("priority")
        self.send_json(await self.guarded(self.reader.act, batch_id, action, priority))


class Export(Base):
    async def get(self, batch_id: str) -> None:
        fmt = self.get_query_argument("format", "jsonl")
        path = await self.guarded(self.reader.export, batch_id, fmt)
        try:
            kinds = {"jsonl": "application/x-ndjson", "csv": "text/csv",
                     "parquet": "application/vnd.apache.parquet"}  # fmt: skip
            self.set_header("Content-Type", kinds.get(fmt, "application/octet-stream"))
            self.set_header(
                "Content-Disposition", f'attachment; filename="pixelmill-{batch_id}.{fmt}"'
            )
            with open(path, "rb") as f:
                while chunk := await self.blocking(f.read, 1 << 20):
                    self.write(chunk)
                    await self.flush()
            self.finish()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)


class Thumb(Base):
    async def get(self, job_id: str) -> None:
        kind = self.get_query_argument("kind", "auto")
        if kind not in ("auto", "input", "artifact"):
            kind = "auto"
        try:
            data = await self.blocking(self.reader.thumbnail, job_id, kind)
        except Exception:  # noqa: BLE001 - the database away, anything: never a 500 here
            data = None
        self.set_header("Content-Type", "image/jpeg")
        if data is None:
            self.set_header("Cache-Control", "no-store")
            self.set_header("X-Pixelmill-Placeholder", "1")
            self.finish(placeholder())
            return
        self.set_header("Cache-Control", "private, max-age=300")
        self.finish(data)


class Metrics(Base):
    async def get(self) -> None:
        from pixelmill.dashboard.prometheus import exposition

        reader = self.reader
        body, content_type = await self.blocking(
            exposition, reader.settings, reader.client.sessions, reader.client.app
        )
        self.set_header("Content-Type", content_type)
        self.finish(body)  # names and labels only: no text a secret could be in


def _int(text: str, default: int, low: int, high: int) -> int:
    try:
        return max(low, min(high, int(text)))
    except ValueError:
        return default


def make_app(
    reader: Reader,
    *,
    credentials: list[tuple[str, str]] | None,
    executor: ThreadPoolExecutor,
) -> tornado.web.Application:
    routes: list[Any] = [
        (r"/", Page),
        (r"/metrics", Metrics),
        (r"/api/xsrf", Xsrf),
        (r"/api/fleet", Fleet),
        (r"/api/batches", Batches),
        (r"/api/search", Search),
        (rf"/api/batches/{BATCH_ID}", BatchView),
        (rf"/api/batches/{BATCH_ID}/jobs", Jobs),
        (rf"/api/batches/{BATCH_ID}/export", Export),
        (rf"/api/batches/{BATCH_ID}/(\w+)", Act),
        (r"/thumb/([0-9A-Za-z-]{1,64})", Thumb),
    ]
    return tornado.web.Application(
        routes,
        template_path=str(HERE / "templates"),
        static_path=str(HERE / "static"),
        static_handler_class=Static,
        autoescape="xhtml_escape",
        xsrf_cookies=True,
        xsrf_cookie_kwargs={"httponly": True, "samesite": "Strict"},
        reader=reader,
        credentials=credentials,
        executor=executor,
        default_handler_class=NotFound,
    )


class NotFound(Base):
    def prepare(self) -> None:
        check_access(self)
        raise tornado.web.HTTPError(404, "%s", "not found")


class Dashboard:
    """The dashboard served on ``address:port`` (port 0: any free one) by its own thread and
    event loop, until ``stop``; ``url`` says where."""

    def __init__(
        self,
        settings: Settings,
        *,
        address: str = "127.0.0.1",
        port: int = 8080,
        credentials: list[tuple[str, str]] | None = None,
        reader: Reader | None = None,
    ) -> None:
        if credentials is None and not is_loopback(address):
            raise InputError(
                "refusing to serve the dashboard on a non-loopback address without "
                "authentication: set PIXELMILL_DASHBOARD_BASIC_AUTH=user:password"
            )
        self.settings = settings
        self.address = address
        self.reader = reader or Reader(settings)
        self.executor = ThreadPoolExecutor(4, thread_name_prefix="dashboard")
        self.app = make_app(self.reader, credentials=credentials, executor=self.executor)
        family = socket.AF_INET6 if ":" in address else socket.AF_UNSPEC
        self.sockets = tornado.netutil.bind_sockets(port, address, family=family)
        self.port = int(self.sockets[0].getsockname()[1])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: tornado.httpserver.HTTPServer | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        host = self.address
        if host in ("", "0.0.0.0", "::"):  # every address: name this host's loopback one
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def start(self) -> Dashboard:
        self._thread = threading.Thread(target=self._serve, name="dashboard", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        return self

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._server = tornado.httpserver.HTTPServer(self.app, xheaders=False)
        self._server.add_sockets(self.sockets)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def serving(self) -> bool:
        """Whether the server's thread still runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():

            def halt() -> None:
                if self._server is not None:
                    self._server.stop()
                loop.stop()

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(halt)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        self.executor.shutdown(wait=False, cancel_futures=True)
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.reader.close()

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
