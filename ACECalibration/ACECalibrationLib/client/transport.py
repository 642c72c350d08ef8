# Generated from server/acecal/client/transport.py by ACECalibration/CMake/generate_light_client.py: edit the source.
"""HTTP transport of the client: session, timeouts, safe retries, typed errors, streamed uploads and downloads.

requests + stdlib only. :class:`Transport` knows nothing of the server's resources; :mod:`acecal.client.resources`
builds every endpoint on :meth:`Transport.request`, :meth:`~Transport.get_json`, :meth:`~Transport.post_json`,
:meth:`~Transport.post_multipart` and :meth:`~Transport.download`.

- Explicit timeouts: ``timeout=(connect, read)`` seconds on every call (a dead server never hangs the caller).
- Typed errors: a server reply ``{"error": code, "detail": message}`` becomes the matching class of
  :mod:`acecal.errors` (``ModelNotFoundError``, ``InvalidInputError``, ``ServerBusyError`` with ``retry_after``...)
  carrying the server's message; transport failures become :class:`~acecal.errors.ServerUnreachableError` /
  :class:`~acecal.errors.ServerTimeoutError`, a reply that is not JSON :class:`~acecal.errors.ProtocolError`.
- Retries only where safe: idempotent requests (GET, DELETE) on connection failures, timeouts and 502/503/504; a
  POST only when the connection could not be opened (nothing was sent) or, if ``busy_retries`` > 0, when the server
  answered 503 busy (it refused the job before starting it), waiting ``Retry-After``.
- Progress: ``progress(stage, done_bytes, total_bytes)`` with stage ``"upload"`` or ``"download:<what>"``.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple, TypeVar, Union
from urllib.parse import quote

import requests

from ._acecal import __version__
from .errors import (
    ERRORS_BY_CODE,
    ACECalError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    ProtocolError,
    ServerBusyError,
    ServerTimeoutError,
    ServerUnreachableError,
    StorageError,
    UnauthorizedError,
)

ProgressCallback = Callable[[str, int, Optional[int]], None]
Timeout = Union[float, Tuple[float, float]]
#: a multipart file part: (file name, content in memory or a file streamed from disk)
FilePart = Tuple[str, Union[bytes, Path]]
#: a JSON object as ``json.loads`` returns it
JSONObject = Dict[str, Any]
#: where a download goes: a file path, or a binary file object
DownloadTarget = Union[str, "os.PathLike[str]", BinaryIO, io.RawIOBase]
_T = TypeVar("_T", bound="Transport")

DEFAULT_URL = "http://127.0.0.1:8000"
_CHUNK = 1 << 20
#: the error class of a status whose reply names no known code (a proxy's page, a bare 503)
_BY_STATUS = {
    400: InvalidInputError,
    401: UnauthorizedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: InvalidInputError,
    503: ServerBusyError,
    507: StorageError,
}


def error_from_response(resp: requests.Response) -> ACECalError:
    """The typed error for an error reply (the server's ``{"error", "detail"}``, or the status if it sent none)."""
    code, detail = None, None
    try:
        body = resp.json()
        if isinstance(body, dict):
            code, detail = body.get("error"), body.get("detail")
    except ValueError:
        pass
    if not isinstance(detail, str) or not detail:
        text = (resp.text or "").strip()[:300]
        detail = f"HTTP {resp.status_code} {resp.reason or ''}".strip() + (f": {text}" if text else "")
    cls = ERRORS_BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        cls = _BY_STATUS.get(resp.status_code, ACECalError)
    kwargs: Dict[str, Any] = {"code": code} if isinstance(code, str) else {}
    if issubclass(cls, ServerBusyError):
        kwargs["retry_after"] = _retry_after(resp)
    exc = cls(detail, **kwargs)
    exc.status_code = resp.status_code  # type: ignore[attr-defined]
    return exc


def _retry_after(resp: requests.Response, default: float = 5.0) -> float:
    try:
        return max(0.0, float(resp.headers.get("Retry-After", default)))
    except ValueError:
        return default


def url_segment(s: str) -> str:
    """One URL path segment, quoted (an id can never reach another path)."""
    return quote(str(s), safe="")


# --------------------------------------------------------------------------------------------- upload body
def _quote(name: str) -> str:
    """A file name safe inside a Content-Disposition header (ASCII, no quotes or line breaks)."""
    base = os.path.basename(name.replace("\\", "/")) or "image"
    return "".join(c if (32 <= ord(c) < 127 and c not in '"\\') else "_" for c in base)


class MultipartBody:
    """A ``multipart/form-data`` body streamed from memory or from disk with a known length and upload progress.

    ``fields``: name -> str (sent as text/JSON parts); ``files``: name -> (filename, bytes | path). requests sends an
    object with ``read`` and ``__len__`` as a stream with a ``Content-Length``, so large files are never loaded.
    """

    def __init__(
        self,
        fields: Dict[str, str],
        files: Dict[str, FilePart],
        progress: Optional[ProgressCallback] = None,
        boundary: Optional[str] = None,
    ):
        self.boundary = boundary or uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self._parts: list[Union[bytes, Path]] = []
        for name, value in fields.items():
            self._parts.append(
                (
                    f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'
                    f"Content-Type: application/json\r\n\r\n"
                ).encode()
                + value.encode("utf-8")
                + b"\r\n"
            )
        for name, (filename, content) in files.items():
            self._parts.append(
                (
                    f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                    f'filename="{_quote(filename)}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                ).encode()
            )
            self._parts.append(content if isinstance(content, Path) else bytes(content))
            self._parts.append(b"\r\n")
        self._parts.append(f"--{self.boundary}--\r\n".encode())
        self._len = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in self._parts)
        self._progress = progress
        self._index = 0
        self._offset = 0
        self._fh: Optional[BinaryIO] = None
        self.sent = 0

    def __len__(self) -> int:
        return self._len

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._len
        out = bytearray()
        while len(out) < size and self._index < len(self._parts):
            part = self._parts[self._index]
            if isinstance(part, Path):
                if self._fh is None:
                    self._fh = open(part, "rb")
                b = self._fh.read(size - len(out))
                if not b:
                    self._fh.close()
                    self._fh = None
                    self._index += 1
                    continue
                out += b
            else:
                b = part[self._offset : self._offset + size - len(out)]
                out += b
                self._offset += len(b)
                if self._offset >= len(part):
                    self._index += 1
                    self._offset = 0
        self.sent += len(out)
        if self._progress is not None and out:
            self._progress("upload", self.sent, self._len)
        return bytes(out)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# --------------------------------------------------------------------------------------------- the transport
class Transport:
    """Requests to one ACECalibration server.

    Args:
        server_url: e.g. ``http://127.0.0.1:8000`` (``http://`` is added when no scheme is given).
        api_key: the server's key, sent as ``Authorization: Bearer``; default ``ACECAL_API_KEY`` from the environment.
        timeout: ``(connect, read)`` seconds. The read timeout bounds each wait for data, including the wait for an
            inference reply: raise it for very large volumes on a CPU server.
        retries: attempts after the first for safe requests (see the module docstring).
        backoff_s: the first wait between attempts (doubled each time).
        busy_retries: how many times a POST waits ``Retry-After`` and tries again when the server is busy.
        max_retry_wait_s: no retry starts later than this after the first attempt.
        verify: TLS verification, as in requests.
        session: a ``requests.Session`` to use (a new one by default).
    """

    def __init__(
        self,
        server_url: str = DEFAULT_URL,
        api_key: Optional[str] = None,
        *,
        timeout: Timeout = (5.0, 600.0),
        retries: int = 2,
        backoff_s: float = 0.5,
        busy_retries: int = 0,
        max_retry_wait_s: float = 60.0,
        verify: Union[bool, str] = True,
        session: Optional[requests.Session] = None,
    ):
        url = server_url.strip()
        if "://" not in url:
            url = "http://" + url
        self.base_url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else (os.environ.get("ACECAL_API_KEY") or None)
        self.timeout = timeout if isinstance(timeout, tuple) else (float(timeout), float(timeout))
        self.retries = max(int(retries), 0)
        self.backoff_s = backoff_s
        self.busy_retries = max(int(busy_retries), 0)
        self.max_retry_wait_s = max_retry_wait_s
        self.verify = verify
        self.session = session or requests.Session()
        self.session.headers.setdefault("User-Agent", f"acecal-client/{__version__}")

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.base_url}/{path.lstrip('/')}"

    def _headers(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        h = {"Accept": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        h.update(extra or {})
        return h

    @staticmethod
    def _nothing_sent(exc: requests.RequestException) -> bool:
        """True when the connection was never opened (so a non-idempotent request can be repeated safely)."""
        if isinstance(exc, requests.ConnectTimeout):
            return True
        if isinstance(exc, requests.ConnectionError):
            text = repr(exc)
            return "NewConnectionError" in text or "Connection refused" in text or "NameResolutionError" in text
        return False

    def request(
        self,
        method: str,
        path: str,
        *,
        body_factory: Optional[Callable[[], Any]] = None,
        headers: Optional[Dict[str, str]] = None,
        stream: bool = False,
        timeout: Optional[Timeout] = None,
        busy_retries: Optional[int] = None,
        **kwargs: Any,
    ) -> requests.Response:
        """Send a request with auth, timeouts, safe retries and typed errors; returns a 2xx response.

        ``body_factory`` makes a fresh body per attempt (a streamed body can be sent once only).
        """
        method = method.upper()
        idempotent = method in ("GET", "HEAD", "DELETE", "OPTIONS", "PUT")
        busy_left = self.busy_retries if busy_retries is None else busy_retries
        attempt = 0
        deadline = time.monotonic() + self.max_retry_wait_s
        url = self.url(path)
        if body_factory is None and "data" in kwargs:
            raw = kwargs.pop("data")
            if raw is not None and not isinstance(raw, (bytes, str, dict)):
                raise TypeError("pass a streamed body as body_factory (a body can be sent once only)")
            body_factory = lambda: raw  # noqa: E731
        while True:
            data = body_factory() if body_factory is not None else None
            try:
                resp = self.session.request(
                    method,
                    url,
                    headers=self._headers(headers),
                    data=data,
                    timeout=timeout or self.timeout,
                    stream=stream,
                    verify=self.verify,
                    **kwargs,
                )
            except requests.RequestException as e:
                can_retry = attempt < self.retries and (idempotent or self._nothing_sent(e))
                if can_retry:
                    attempt += 1
                    time.sleep(self.backoff_s * (2 ** (attempt - 1)))
                    continue
                raise self._transport_error(e) from None
            finally:
                close = getattr(data, "close", None)  # a streamed body (MultipartBody) holds open files
                if close is not None:
                    close()
            if resp.status_code < 400:
                return resp
            err = error_from_response(resp)
            resp.close()
            wait = err.retry_after if isinstance(err, ServerBusyError) else self.backoff_s * (2**attempt)
            if resp.status_code in (502, 503, 504) and idempotent and attempt < self.retries:
                attempt += 1
                if time.monotonic() + wait <= deadline:
                    time.sleep(wait)
                    continue
            if (
                isinstance(err, ServerBusyError)
                and not idempotent
                and busy_left > 0
                and time.monotonic() + wait <= deadline
            ):
                busy_left -= 1
                time.sleep(wait)
                continue
            raise err

    def _transport_error(self, e: requests.RequestException) -> ACECalError:
        if isinstance(e, requests.ConnectTimeout):
            return ServerTimeoutError(
                f"could not connect to {self.base_url} within {self.timeout[0]:g} s; "
                "is the server running and the address right?"
            )
        if isinstance(e, requests.Timeout):
            return ServerTimeoutError(
                f"{self.base_url} did not answer within {self.timeout[1]:g} s; the server may "
                "be overloaded or the volume very large (raise the read timeout)"
            )
        if isinstance(e, requests.ConnectionError):
            return ServerUnreachableError(
                f"cannot reach the ACECal server at {self.base_url} ({_short(e)}); start it "
                "with `acecal serve` or check the URL and port"
            )
        return ServerUnreachableError(f"request to {self.base_url} failed: {_short(e)}")

    # --- JSON ---------------------------------------------------------------------------------------------------
    def get_json(self, path: str, **kwargs: Any) -> Any:
        return self._json(self.request("GET", path, **kwargs))

    def post_json(self, path: str, payload: Any = None, **kwargs: Any) -> Any:
        body = json.dumps(payload if payload is not None else {}).encode()
        return self._json(
            self.request(
                "POST", path, body_factory=lambda: body, headers={"Content-Type": "application/json"}, **kwargs
            )
        )

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self._json(self.request("DELETE", path, **kwargs))

    def get_object(self, path: str, **kwargs: Any) -> JSONObject:
        """:meth:`get_json` of a reply that must be a JSON object."""
        return json_object(self.get_json(path, **kwargs), path)

    def post_object(self, path: str, payload: Any = None, **kwargs: Any) -> JSONObject:
        """:meth:`post_json` of a reply that must be a JSON object."""
        return json_object(self.post_json(path, payload, **kwargs), path)

    def delete_object(self, path: str, **kwargs: Any) -> JSONObject:
        """:meth:`delete` of a reply that must be a JSON object."""
        return json_object(self.delete(path, **kwargs), path)

    @staticmethod
    def _json(resp: requests.Response) -> Any:
        try:
            return json.loads(resp.content)  # UTF-8 JSON; no charset guessing over large replies
        except ValueError:
            raise ProtocolError(
                f"expected JSON from {resp.url}, got {resp.headers.get('Content-Type', 'nothing')}; "
                "is this the address of an ACECal server?"
            ) from None

    # --- uploads and downloads ----------------------------------------------------------------------------------
    def post_multipart(
        self,
        path: str,
        fields: Optional[Dict[str, str]] = None,
        files: Optional[Dict[str, FilePart]] = None,
        *,
        progress: Optional[ProgressCallback] = None,
        **kwargs: Any,
    ) -> requests.Response:
        """POST a streamed ``multipart/form-data`` body (text ``fields``; ``files``: name -> (filename, bytes|path)).

        Upload progress is reported as stage ``"upload"``. Repeated only when the connection could not be opened
        (or on busy, if enabled).
        """
        boundary = uuid.uuid4().hex
        fields, files = dict(fields or {}), dict(files or {})

        def body() -> MultipartBody:  # a fresh stream per attempt, same boundary as the Content-Type header
            return MultipartBody(fields, files, progress, boundary=boundary)

        return self.request(
            "POST",
            path,
            body_factory=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            **kwargs,
        )

    def download(
        self,
        path: str,
        dest: DownloadTarget,
        *,
        progress: Optional[ProgressCallback] = None,
        stage: str = "download",
    ) -> int:
        """Stream ``GET path`` into a file path or a binary file object; returns the byte count.

        Retried (from the start) on transport failures, like any GET.
        """
        attempt = 0
        while True:
            resp = self.request("GET", path, stream=True, headers={"Accept": "*/*"})
            total = resp.headers.get("Content-Length")
            total_i = int(total) if total and total.isdigit() else None
            done = 0
            try:
                if isinstance(dest, (str, os.PathLike)):
                    tmp = Path(str(dest) + ".part")
                    with open(tmp, "wb") as fh:
                        done = self._copy(resp, fh, progress, stage, total_i)
                    os.replace(tmp, dest)
                else:
                    start = dest.tell() if dest.seekable() else None
                    try:
                        done = self._copy(resp, dest, progress, stage, total_i)
                    except requests.RequestException:
                        if start is not None:
                            dest.seek(start)
                            dest.truncate()
                        raise
                return done
            except requests.RequestException as e:
                if attempt < self.retries:
                    attempt += 1
                    time.sleep(self.backoff_s * (2 ** (attempt - 1)))
                    continue
                raise self._transport_error(e) from None
            finally:
                resp.close()
                if isinstance(dest, (str, os.PathLike)):
                    Path(str(dest) + ".part").unlink(missing_ok=True)

    def download_bytes(
        self, path: str, *, progress: Optional[ProgressCallback] = None, stage: str = "download"
    ) -> memoryview:
        """``GET path`` into memory: one buffer sized from ``Content-Length`` (no regrowth copies), returned as a
        writable memoryview (``read_nrrd`` decodes raw volumes from it without copying)."""
        sink = _Sink()
        self.download(path, sink, progress=progress, stage=stage)
        return sink.view()

    @staticmethod
    def _copy(
        resp: requests.Response,
        fh: Union[BinaryIO, io.RawIOBase],
        progress: Optional[ProgressCallback],
        stage: str,
        total: Optional[int],
    ) -> int:
        if isinstance(fh, _Sink) and total:
            fh.reserve(total)
        done = 0
        for chunk in resp.iter_content(_CHUNK):
            fh.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(stage, done, total)
        if total is not None and done != total:
            raise requests.ConnectionError(f"download ended after {done} of {total} bytes")
        return done


def json_object(value: Any, where: str) -> JSONObject:
    """``value`` when it is a JSON object; else :class:`ProtocolError` (the server's replies are objects)."""
    if not isinstance(value, dict):
        raise ProtocolError(f"expected a JSON object from {where}, got {type(value).__name__}")
    return value


def json_objects(value: Any, where: str) -> List[JSONObject]:
    """``value`` when it is a list of JSON objects; else :class:`ProtocolError`."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ProtocolError(f"expected a list of JSON objects from {where}")
    return value


class _Sink(io.RawIOBase):
    """A growable in-memory file whose buffer can be preallocated (``reserve``) and handed out without a copy."""

    def __init__(self) -> None:
        super().__init__()
        self._buf = bytearray()
        self._pos = 0

    def reserve(self, n: int) -> None:
        if len(self._buf) < n:
            self._buf.extend(bytes(n - len(self._buf)))

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else (self._pos + pos if whence == 1 else self._pos + pos)
        return self._pos

    def truncate(self, size: Optional[int] = None) -> int:
        size = self._pos if size is None else size
        del self._buf[size:]
        return size

    def write(self, b: Any) -> int:
        n = len(b)
        end = self._pos + n
        if end > len(self._buf):
            self._buf.extend(bytes(end - len(self._buf)))
        self._buf[self._pos : end] = b
        self._pos = end
        return n

    def view(self) -> memoryview:
        return memoryview(self._buf)[: self._pos]


def _short(e: Exception) -> str:
    text = str(e)
    for marker in (
        "Connection refused",
        "Name or service not known",
        "timed out",
        "Connection reset",
        "Remote end closed connection",
        "Connection aborted",
    ):
        if marker in text:
            return marker.lower()
    return text[:200]
