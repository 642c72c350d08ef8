# Generated from server/acecal/client/client.py by ACECalibration/CMake/generate_light_client.py: edit the source.
"""ACEClient: the one HTTP client of the ACECalibration server (requests + numpy; no torch, monai, SimpleITK, FastAPI).

Used by scripts, by ``acecal infer/models --server`` and by the 3D Slicer module, and extended by later resources
(datasets, fine-tuning jobs) by subclassing or by adding methods built on :meth:`ACEClient.request`,
:meth:`ACEClient.get_json` and :meth:`ACEClient.download`.

- Explicit timeouts: ``timeout=(connect, read)`` seconds on every call (a dead server never hangs the caller).
- Typed errors: a server reply ``{"error": code, "detail": message}`` becomes the matching class of
  :mod:`acecal.errors` (``ModelNotFoundError``, ``InvalidInputError``, ``ServerBusyError`` with ``retry_after``...)
  carrying the server's message; transport failures become :class:`ServerUnreachableError` /
  :class:`ServerTimeoutError`.
- Retries only where safe: idempotent requests (GET, DELETE) on connection failures, timeouts and 502/503/504; a
  POST only when the connection could not be opened (nothing was sent) or, if ``busy_retries`` > 0, when the server
  answered 503 busy (it refused the job before starting it), waiting ``Retry-After``.
- Progress: ``progress(stage, done_bytes, total_bytes)`` with stage ``"upload"`` or ``"download:<volume>"``.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Sequence, Tuple, Union

import numpy as np
import requests

from ._acecal import __version__
from .errors import (
    ERRORS_BY_CODE,
    ACECalError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    ServerBusyError,
    StorageError,
    UnauthorizedError,
)
from .geometry import Grid
from .nrrd import encode_nrrd, read_nrrd

ProgressCallback = Callable[[str, int, Optional[int]], None]
Timeout = Union[float, Tuple[float, float]]

#: the volumes a result has, in order
VOLUMES = ("labels", "confidence", "uncertainty", "flags")
SUMMARY_NAME = "summary.json"
DEFAULT_URL = "http://127.0.0.1:8000"
_CHUNK = 1 << 20


class ServerUnreachableError(ACECalError, ConnectionError):
    """The server could not be reached (not running, wrong URL or port, network down)."""

    code = "unreachable"
    http_status = 503


class ServerTimeoutError(ServerUnreachableError, TimeoutError):
    """The server did not answer within the client's timeout."""

    code = "timeout"
    http_status = 504


class ProtocolError(ACECalError):
    """The server answered something this client does not understand (wrong URL? a proxy? a version mismatch?)."""

    code = "bad_response"
    http_status = 502


_BY_STATUS = {400: InvalidInputError, 401: UnauthorizedError, 404: NotFoundError, 409: ConflictError,
              413: PayloadTooLargeError, 422: InvalidInputError, 503: ServerBusyError, 507: StorageError}


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
    kwargs: dict[str, Any] = {"code": code} if isinstance(code, str) else {}
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


# --------------------------------------------------------------------------------------------- result types
@dataclass
class ModelInfo:
    """A model as ``GET /models`` describes it (``raw`` keeps every field, including ones added later)."""

    id: str
    labels: dict[str, str]
    description: str = ""
    loss: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    temperature: Optional[float] = None
    uncertainty_threshold: Optional[float] = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        return cls(id=d["id"], labels=dict(d.get("labels", {})), description=d.get("description", ""),
                   loss=d.get("loss", ""), metrics=dict(d.get("metrics") or {}), temperature=d.get("temperature"),
                   uncertainty_threshold=d.get("uncertainty_threshold"), raw=dict(d))

    @property
    def class_names(self) -> list[str]:
        return [self.labels[k] for k in sorted(self.labels, key=int)]


@dataclass
class Region:
    """One uncertain boundary region. Coordinates in mm; ``bbox_*`` are ``{"min": [x, y, z], "max": [...]}``."""

    id: int
    class_value: int
    class_name: str
    voxels: int
    volume_ml: float
    mean_confidence: float
    centroid_lps: list[float]
    centroid_ras: list[float]
    bbox_lps: dict[str, list[float]]
    bbox_ras: dict[str, list[float]]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Region":
        return cls(id=int(d["id"]), class_value=int(d["class"]), class_name=d.get("class_name", ""),
                   voxels=int(d["voxels"]), volume_ml=float(d["volume_ml"]),
                   mean_confidence=float(d["mean_confidence"]), centroid_lps=list(d["centroid_lps"]),
                   centroid_ras=list(d["centroid_ras"]), bbox_lps=dict(d["bbox_lps"]), bbox_ras=dict(d["bbox_ras"]),
                   raw=dict(d))


@dataclass
class InferenceResult:
    """What ``infer`` returns: the server's reply plus the volumes, as arrays and/or files.

    ``arrays[name]`` is a numpy array (z, y, x) on :attr:`grid` (the input's grid); ``paths[name]`` the NRRD written
    when an output folder was given. ``raw`` is the server's JSON reply (also written as ``summary.json``).
    """

    result_id: str
    model_id: str
    labels: dict[str, str]
    grid: Grid
    summary: dict[str, Any]
    regions: list[Region]
    files: dict[str, str]
    raw: dict[str, Any] = field(repr=False)
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    paths: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, d: dict) -> "InferenceResult":
        try:
            return cls(result_id=d["result_id"], model_id=d["model_id"], labels=dict(d["labels"]),
                       grid=Grid.from_dict(d["grid"]), summary=dict(d["summary"]),
                       regions=[Region.from_dict(r) for r in d.get("regions", [])], files=dict(d["files"]), raw=d)
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"the server's inference reply is incomplete ({e!r}); is it an ACECal server of a "
                                "compatible version?") from None

    @property
    def label_map(self) -> Optional[np.ndarray]:
        return self.arrays.get("labels")

    @property
    def confidence(self) -> Optional[np.ndarray]:
        return self.arrays.get("confidence")

    @property
    def uncertainty(self) -> Optional[np.ndarray]:
        return self.arrays.get("uncertainty")

    @property
    def flags(self) -> Optional[np.ndarray]:
        return self.arrays.get("flags")


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

    def __init__(self, fields: dict[str, str], files: dict[str, tuple[str, Union[bytes, Path]]],
                 progress: Optional[ProgressCallback] = None, boundary: Optional[str] = None):
        self.boundary = boundary or uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self._parts: list[Union[bytes, Path]] = []
        for name, value in fields.items():
            self._parts.append((f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n"
                                f"Content-Type: application/json\r\n\r\n").encode() + value.encode("utf-8") + b"\r\n")
        for name, (filename, content) in files.items():
            self._parts.append((f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                                f"filename=\"{_quote(filename)}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                                ).encode())
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
                b = part[self._offset:self._offset + size - len(out)]
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


ImageInput = Union[str, os.PathLike, Tuple[np.ndarray, Grid]]


# --------------------------------------------------------------------------------------------- the client
class ACEClient:
    """Client of one ACECalibration server.

    Args:
        server_url: e.g. ``http://127.0.0.1:8000`` (``http://`` is added when no scheme is given).
        api_key: the server's key, sent as ``Authorization: Bearer``; default ``ACECAL_API_KEY`` from the environment.
        timeout: ``(connect, read)`` seconds. The read timeout bounds each wait for data, including the wait for an
            inference reply: raise it for very large volumes on a CPU server.
        retries: attempts after the first for safe requests (see the module docstring).
        busy_retries: how many times ``infer`` waits ``Retry-After`` and tries again when the server is busy.
        session: a ``requests.Session`` to use (a new one by default).
    """

    def __init__(self, server_url: str = DEFAULT_URL, api_key: Optional[str] = None, *,
                 timeout: Timeout = (5.0, 600.0), retries: int = 2, backoff_s: float = 0.5, busy_retries: int = 0,
                 max_retry_wait_s: float = 60.0, verify: Union[bool, str] = True,
                 session: Optional[requests.Session] = None):
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

    # --- plumbing ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "ACEClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def __repr__(self) -> str:
        return f"ACEClient({self.base_url!r})"

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.base_url}/{path.lstrip('/')}"

    def _headers(self, extra: Optional[dict] = None) -> dict:
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

    def request(self, method: str, path: str, *, body_factory: Optional[Callable[[], Any]] = None,
                headers: Optional[dict] = None, stream: bool = False, timeout: Optional[Timeout] = None,
                busy_retries: Optional[int] = None, **kwargs: Any) -> requests.Response:
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
                resp = self.session.request(method, url, headers=self._headers(headers), data=data,
                                            timeout=timeout or self.timeout, stream=stream, verify=self.verify,
                                            **kwargs)
            except requests.RequestException as e:
                can_retry = attempt < self.retries and (idempotent or self._nothing_sent(e))
                if can_retry:
                    attempt += 1
                    time.sleep(self.backoff_s * (2 ** (attempt - 1)))
                    continue
                raise self._transport_error(e) from None
            finally:
                if hasattr(data, "close"):
                    data.close()
            if resp.status_code < 400:
                return resp
            err = error_from_response(resp)
            resp.close()
            wait = err.retry_after if isinstance(err, ServerBusyError) else self.backoff_s * (2 ** attempt)
            if resp.status_code in (502, 503, 504) and idempotent and attempt < self.retries:
                attempt += 1
                if time.monotonic() + wait <= deadline:
                    time.sleep(wait)
                    continue
            if isinstance(err, ServerBusyError) and not idempotent and busy_left > 0 \
                    and time.monotonic() + wait <= deadline:
                busy_left -= 1
                time.sleep(wait)
                continue
            raise err

    def _transport_error(self, e: requests.RequestException) -> ACECalError:
        if isinstance(e, requests.ConnectTimeout):
            return ServerTimeoutError(f"could not connect to {self.base_url} within {self.timeout[0]:g} s; "
                                      "is the server running and the address right?")
        if isinstance(e, requests.Timeout):
            return ServerTimeoutError(f"{self.base_url} did not answer within {self.timeout[1]:g} s; the server may "
                                      "be overloaded or the volume very large (raise the read timeout)")
        if isinstance(e, requests.ConnectionError):
            return ServerUnreachableError(f"cannot reach the ACECal server at {self.base_url} ({_short(e)}); start it "
                                          "with `acecal serve` or check the URL and port")
        return ServerUnreachableError(f"request to {self.base_url} failed: {_short(e)}")

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return self._json(self.request("GET", path, **kwargs))

    def post_json(self, path: str, payload: Any = None, **kwargs: Any) -> Any:
        body = json.dumps(payload if payload is not None else {}).encode()
        return self._json(self.request("POST", path, body_factory=lambda: body,
                                       headers={"Content-Type": "application/json"}, **kwargs))

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self._json(self.request("DELETE", path, **kwargs))

    @staticmethod
    def file_part(source: ImageInput, filename: Optional[str] = None, *,
                  compress: bool = False) -> tuple[str, Union[bytes, Path]]:
        """A multipart file part from a path (streamed from disk) or ``(array_zyx, Grid)`` (encoded as NRRD)."""
        if isinstance(source, tuple):
            array, grid = source
            if not isinstance(grid, Grid):
                raise TypeError("an image must be a path or (array_zyx, Grid)")
            return filename or "image.nrrd", encode_nrrd(np.asarray(array), grid,
                                                         encoding="gzip" if compress else "raw")
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no such image file: {path}")
        return filename or path.name, path

    def post_multipart(self, path: str, fields: Optional[dict[str, str]] = None,
                       files: Optional[dict[str, tuple[str, Union[bytes, Path]]]] = None, *,
                       progress: Optional[ProgressCallback] = None, **kwargs: Any) -> requests.Response:
        """POST a streamed ``multipart/form-data`` body (text ``fields``; ``files``: name -> (filename, bytes|path)).

        Upload progress is reported as stage ``"upload"``. Used by :meth:`infer`; later resources (dataset cases)
        upload through it too. Repeated only when the connection could not be opened (or on busy, if enabled).
        """
        boundary = uuid.uuid4().hex
        fields, files = dict(fields or {}), dict(files or {})

        def body() -> MultipartBody:  # a fresh stream per attempt, same boundary as the Content-Type header
            return MultipartBody(fields, files, progress, boundary=boundary)

        return self.request("POST", path, body_factory=body,
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, **kwargs)

    @staticmethod
    def _json(resp: requests.Response) -> Any:
        try:
            return json.loads(resp.content)  # UTF-8 JSON; no charset guessing over large replies
        except ValueError:
            raise ProtocolError(f"expected JSON from {resp.url}, got {resp.headers.get('Content-Type', 'nothing')}; "
                                "is this the address of an ACECal server?") from None

    def download(self, path: str, dest: Union[str, os.PathLike, BinaryIO], *,
                 progress: Optional[ProgressCallback] = None, stage: str = "download") -> int:
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

    def download_bytes(self, path: str, *, progress: Optional[ProgressCallback] = None,
                       stage: str = "download") -> memoryview:
        """``GET path`` into memory: one buffer sized from ``Content-Length`` (no regrowth copies), returned as a
        writable memoryview (``read_nrrd`` decodes raw volumes from it without copying)."""
        sink = _Sink()
        self.download(path, sink, progress=progress, stage=stage)
        return sink.view()

    @staticmethod
    def _copy(resp: requests.Response, fh: BinaryIO, progress: Optional[ProgressCallback], stage: str,
              total: Optional[int]) -> int:
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

    # --- endpoints --------------------------------------------------------------------------------------------
    def health(self) -> dict:
        """``GET /health``: {"status", "version", "device", "auth_required", ...}. Needs no key."""
        return self.get_json("/health")

    def check(self) -> dict:
        """Like :meth:`health`, and also checks the key (``/models``): raises ``UnauthorizedError`` if refused.

        For "Test connection" buttons: one call says the server is up, which version and device, and that the key
        works.
        """
        info = self.health()
        info["models"] = [m.id for m in self.models()]
        return info

    def models(self) -> list[ModelInfo]:
        """``GET /models``."""
        return [ModelInfo.from_dict(m) for m in self.get_json("/models")["models"]]

    def model(self, model_id: str) -> ModelInfo:
        """``GET /models/{id}``; ``ModelNotFoundError`` if unknown."""
        return ModelInfo.from_dict(self.get_json(f"/models/{_seg(model_id)}"))

    def infer(self, image: ImageInput, model_id: str, *, params: Optional[dict] = None,
              out_dir: Optional[Union[str, os.PathLike]] = None, load_arrays: Optional[bool] = None,
              volumes: Sequence[str] = VOLUMES, keep_on_server: bool = False,
              progress: Optional[ProgressCallback] = None, filename: Optional[str] = None,
              compress_upload: bool = False, **param_kwargs: Any) -> InferenceResult:
        """Segment one volume; returns the reply with the volumes on the input's exact grid.

        Args:
            image: a file path (.nii, .nii.gz, .nrrd, .mha; streamed from disk) or ``(array_zyx, Grid)`` (sent as
                NRRD; the grid in LPS, as :class:`acecal.geometry.Grid` always is).
            model_id: a model id from :meth:`models`.
            params / **param_kwargs: inference parameters (``uncertainty_threshold``, ``overlap``,
                ``use_temperature``, ``band_mm``, ``band_voxels``, ``min_region_voxels``, ``connectivity``,
                ``compress``); keyword arguments override ``params``.
            out_dir: write ``<volume>.nrrd`` files and ``summary.json`` there.
            load_arrays: also decode the volumes into ``result.arrays`` (default: when no ``out_dir`` is given).
            volumes: which volumes to fetch.
            keep_on_server: leave the result on the server (it expires) instead of deleting it after download.
            progress: ``progress(stage, done_bytes, total_bytes)`` for the upload and each download.
            filename: the name to send with an array (default ``image.nrrd``) or instead of the file's own.
            compress_upload: gzip an array before sending it (smaller, slower).
        """
        p = dict(params or {})
        p.update({k: v for k, v in param_kwargs.items() if v is not None})
        unknown = [v for v in volumes if v not in VOLUMES]
        if unknown:
            raise ValueError(f"unknown volume(s) {unknown}; choose from {VOLUMES}")
        fields = {"params": json.dumps(p)} if p else {}
        resp = self.post_multipart(f"/infer/{_seg(model_id)}", fields,
                                   {"image": self.file_part(image, filename, compress=compress_upload)},
                                   progress=progress)
        result = InferenceResult.from_reply(self._json(resp))
        try:
            self.fetch_volumes(result, out_dir=out_dir, load_arrays=load_arrays, volumes=volumes, progress=progress)
        finally:
            if not keep_on_server:
                try:
                    self.delete_result(result.result_id)
                except ACECalError:
                    pass  # it expires anyway
        return result

    def fetch_volumes(self, result: InferenceResult, *, out_dir: Optional[Union[str, os.PathLike]] = None,
                      load_arrays: Optional[bool] = None, volumes: Sequence[str] = VOLUMES,
                      progress: Optional[ProgressCallback] = None) -> InferenceResult:
        """Download a result's volumes into ``result.arrays`` and/or ``out_dir`` (with ``summary.json``)."""
        load = (out_dir is None) if load_arrays is None else load_arrays
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        for name in volumes:
            stage = f"download:{name}"
            if out is not None:
                dest = out / f"{name}.nrrd"
                self.download(result.files[name], dest, progress=progress, stage=stage)
                result.paths[name] = dest
                if load:
                    result.arrays[name] = read_nrrd(dest).array
            else:
                result.arrays[name] = read_nrrd(self.download_bytes(result.files[name], progress=progress,
                                                                    stage=stage)).array
            if name in result.arrays and result.arrays[name].shape != result.grid.shape_zyx:
                raise ProtocolError(f"the {name} volume has shape {result.arrays[name].shape}, not the input's "
                                    f"{result.grid.shape_zyx}")
        if out is not None:
            summary = dict(result.raw, files={n: p.name for n, p in result.paths.items()},
                           source={"server": self.base_url})
            (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
            result.paths["summary"] = out / SUMMARY_NAME
        return result

    def result(self, result_id: str) -> InferenceResult:
        """``GET /results/{id}``: a stored result's reply (volumes not fetched; see :meth:`fetch_volumes`)."""
        return InferenceResult.from_reply(self.get_json(f"/results/{_seg(result_id)}"))

    def delete_result(self, result_id: str, *, missing_ok: bool = True) -> None:
        """``DELETE /results/{id}``."""
        try:
            self.delete(f"/results/{_seg(result_id)}")
        except NotFoundError:
            if not missing_ok:
                raise

    # --- datasets, fine-tuning jobs and evaluation ------------------------------------------------------------
    def create_dataset(self, name: str, *, model: Optional[str] = None) -> dict:
        """``POST /datasets`` -> ``{"id", "name", "model", "created"}``. With ``model`` every uploaded case is
        checked against that model's labels at once."""
        return self.post_json("/datasets", {"name": name, **({"model": model} if model else {})})

    def datasets(self) -> list[dict]:
        """``GET /datasets``: ``[{"id", "name", "model", "num_cases", "created"}, ...]``."""
        return self.get_json("/datasets")["datasets"]

    def dataset(self, dataset_id: str) -> dict:
        """``GET /datasets/{id}``: ``{"id", "name", "model", "num_cases", "cases": [{"case_id", "name", ...}]}``."""
        return self.get_json(f"/datasets/{_seg(dataset_id)}")

    def delete_dataset(self, dataset_id: str) -> None:
        """``DELETE /datasets/{id}`` (``ConflictError`` while a queued or running job uses it)."""
        self.delete(f"/datasets/{_seg(dataset_id)}")

    def add_case(self, dataset_id: str, image: ImageInput, label: ImageInput, *, name: Optional[str] = None,
                 model: Optional[str] = None, progress: Optional[ProgressCallback] = None,
                 compress_upload: bool = True) -> dict:
        """``POST /datasets/{id}/cases``: upload one labelled case; returns ``{"case_id", "name", ...}``.

        ``image`` and ``label``: file paths or ``(array_zyx, Grid)`` (sent as NRRD, gzip-compressed by default).
        The server checks the pair on arrival; a bad one raises ``InvalidInputError`` naming the problem.
        """
        files = {"image": self.file_part(image, "image.nrrd" if isinstance(image, tuple) else None,
                                         compress=compress_upload),
                 "label": self.file_part(label, "label.nrrd" if isinstance(label, tuple) else None,
                                         compress=compress_upload)}
        fields = {k: v for k, v in (("name", name), ("model", model)) if v}
        return self._json(self.post_multipart(f"/datasets/{_seg(dataset_id)}/cases", fields, files,
                                              progress=progress))

    def delete_case(self, dataset_id: str, case_id: str) -> None:
        """``DELETE /datasets/{id}/cases/{case_id}``."""
        self.delete(f"/datasets/{_seg(dataset_id)}/cases/{_seg(case_id)}")

    def upload_dataset(self, images_dir: Union[str, os.PathLike], labels_dir: Union[str, os.PathLike], *,
                       name: Optional[str] = None, model: Optional[str] = None, dataset_id: Optional[str] = None,
                       on_case: Optional[Callable[[int, int, str], None]] = None) -> dict:
        """Upload every (image, label) pair of two folders (same file names; the type may differ) as one dataset.

        Pairs are checked locally first (a missing label or a label without an image is reported before anything
        is sent), then each case is uploaded and checked by the server. Adds to ``dataset_id`` when given, else
        creates a dataset named ``name`` (default: the images folder's name, or its parent's for ``images/``).
        ``on_case(index, total, file_name)`` is called before each upload. Returns :meth:`dataset`'s reply.
        """
        pairs = pair_folders(images_dir, labels_dir)
        if dataset_id is None:
            folder = Path(images_dir).resolve()
            default = folder.parent.name if folder.name.lower() in ("images", "imagestr") else folder.name
            dataset_id = self.create_dataset(name or default or "uploaded cases", model=model)["id"]
        for i, (img, lab) in enumerate(pairs):
            if on_case is not None:
                on_case(i, len(pairs), img.name)
            try:
                self.add_case(dataset_id, img, lab, model=model)
            except InvalidInputError as e:
                raise type(e)(f"{img.name}: {e.detail}", code=e.code) from None
        return self.dataset(dataset_id)

    def finetune(self, base_model: str, dataset: str, *, loss: str = "hardl1ace_dice_ce", epochs: int = 20,
                 **options: Any) -> dict:
        """``POST /finetune``: queue a fine-tuning job; returns ``{"job_id", "status", "model_id", "url"}``.

        ``options``: ``lr``, ``freeze_encoder``, ``val_fraction``, ``val_cases``, ``val_every``, ``batch_size``,
        ``num_samples``, ``patch_size``, ``loss_params``, ``fit_temperature``, ``seed``, ``model_id``,
        ``description`` (see the server's ``/docs``). ``model_id`` is the id the new model gets on success.
        """
        payload = {"base_model": base_model, "dataset": dataset, "loss": loss, "epochs": int(epochs),
                   **{k: v for k, v in options.items() if v is not None}}
        return self.post_json("/finetune", payload)

    def jobs(self, status: Optional[str] = None, limit: int = 100) -> list[dict]:
        """``GET /jobs``: the jobs, newest first (optionally only those in ``status``)."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return self.get_json("/jobs", params=params)["jobs"]

    def job(self, job_id: str, *, wait: Optional[float] = None, after: Optional[int] = None) -> dict:
        """``GET /jobs/{id}``: ``{"status", "progress", "metrics", "model_id", "error", "log_tail", "rev", ...}``.

        With ``wait`` (seconds, at most 30) the server answers as soon as the job changes from revision ``after``
        (default: its current one), or when ``wait`` runs out.
        """
        params: dict[str, Any] = {}
        timeout = None
        if wait:
            params["wait"] = min(float(wait), 30.0)
            timeout = (self.timeout[0], max(self.timeout[1], params["wait"] + 30.0))
            if after is not None:
                params["after"] = int(after)
        return self.get_json(f"/jobs/{_seg(job_id)}", params=params, timeout=timeout)

    def cancel_job(self, job_id: str) -> dict:
        """``DELETE /jobs/{id}``: cancel (a running job stops within seconds and publishes nothing)."""
        return self.delete(f"/jobs/{_seg(job_id)}")

    def wait_job(self, job_id: str, *, timeout: Optional[float] = None, poll_s: float = 15.0,
                 on_update: Optional[Callable[[dict], None]] = None) -> dict:
        """Follow a job (long-polling) until it succeeds, fails or is cancelled; returns the final job.

        ``on_update(job)`` is called with every new state. ``ServerTimeoutError`` if ``timeout`` seconds pass first
        (the job goes on).
        """
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        job = self.job(job_id)
        if on_update is not None:
            on_update(job)
        while job["status"] not in JOB_FINAL_STATUSES:
            wait = poll_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerTimeoutError(f"job {job_id} is still {job['status']} after {timeout:g} s")
                wait = max(0.1, min(wait, left))
            new = self.job(job_id, wait=wait, after=job.get("rev"))
            if on_update is not None and (new.get("rev") != job.get("rev") or new["status"] != job["status"]):
                on_update(new)
            job = new
        return job

    def evaluate(self, model_id: str, dataset: str, *, temperature: bool = False,
                 cases: Optional[Sequence[str]] = None,
                 out_dir: Optional[Union[str, os.PathLike]] = None, raw: bool = False) -> dict:
        """``POST /evaluate/{model_id}`` on a stored dataset: Dice/ACE/ECE/MCE (macro, micro, per class, per case),
        the ACE floor, the flags' error detection and the figures' URL paths; ``raw``: the network's own softmax
        instead of the served probabilities. With ``out_dir`` the reply (``evaluation.json``) and every reliability
        PNG are saved there (``figures/<name>.png``); ``reply["files"]`` then maps URL paths to local files."""
        payload: dict[str, Any] = {"dataset": dataset, "temperature": bool(temperature)}
        if raw:
            payload["raw"] = True
        if cases:
            payload["cases"] = list(cases)
        reply = self.post_json(f"/evaluate/{_seg(model_id)}", payload)
        if out_dir is not None:
            out = Path(out_dir)
            (out / "figures").mkdir(parents=True, exist_ok=True)
            urls = [reply["figures"].get("dataset_histogram")] + list((reply["figures"].get("cases") or {}).values())
            files = {}
            for url in (u for u in urls if u):
                dest = out / "figures" / url.rsplit("/", 1)[-1]
                self.download(url, dest, stage="download:figure")
                files[url] = str(dest)
            reply = dict(reply, files=files)
            (out / "evaluation.json").write_text(json.dumps(reply, indent=2))
        return reply


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

    def write(self, b) -> int:
        n = len(b)
        end = self._pos + n
        if end > len(self._buf):
            self._buf.extend(bytes(end - len(self._buf)))
        self._buf[self._pos:end] = b
        self._pos = end
        return n

    def view(self) -> memoryview:
        return memoryview(self._buf)[: self._pos]


def _seg(s: str) -> str:
    """One URL path segment, quoted."""
    from urllib.parse import quote

    return quote(str(s), safe="")


def _short(e: Exception) -> str:
    text = str(e)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset",
                   "Remote end closed connection", "Connection aborted"):
        if marker in text:
            return marker.lower()
    return text[:200]


#: job states after which nothing changes
JOB_FINAL_STATUSES = ("succeeded", "failed", "cancelled")
#: single-file volume types a case can be uploaded as (detached headers cannot travel alone)
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def _case_key(name: str) -> Optional[str]:
    low = name.lower()
    for s in UPLOAD_SUFFIXES:
        if low.endswith(s):
            return name[: -len(s)]
    return None


def pair_folders(images_dir: Union[str, os.PathLike], labels_dir: Union[str, os.PathLike]) -> list[tuple[Path, Path]]:
    """(image, label) pairs of two folders with the same file names (a label may differ only in its type).

    Raises ``InvalidInputError`` listing every image without a label and every label without an image.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise InvalidInputError(f"no such folder: {d}")

    def files(d: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for p in sorted(d.iterdir()):
            key = _case_key(p.name) if p.is_file() and not p.name.startswith(".") else None
            if key is not None:
                out.setdefault(key, p)
        return out

    imgs, labs = files(images_dir), files(labels_dir)
    problems = [f"{imgs[k].name}: no label with the same name in {labels_dir}" for k in imgs if k not in labs]
    problems += [f"{labs[k].name}: a label without an image in {images_dir}" for k in labs if k not in imgs]
    if problems:
        raise InvalidInputError("the folders do not pair up:\n  " + "\n  ".join(problems))
    if not imgs:
        raise InvalidInputError(f"no images (.nii.gz, .nii, .nrrd, .mha) in {images_dir}")
    return [(imgs[k], labs[k]) for k in imgs]
