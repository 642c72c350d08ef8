"""Connection settings: the server URL, its history and upload consent persist; the API key never does.

The module widget keeps settings in ``qt.QSettings`` (keys below); the helpers here take any object with
``value(key, default)`` and ``setValue(key, value)`` (QSettings has both; :class:`MemorySettings` is a dict-backed
stand-in for tests and scripts), so the rules are tested without Qt.

Images leave the machine only with consent: before the first upload to a server that is not on this computer
(:func:`is_loopback`), the user is asked once per server, and the answer is remembered (:func:`has_upload_consent`,
:func:`remember_upload_consent`). A key that would travel unencrypted (plain ``http`` to another host) is warned
about first (:func:`key_sent_in_clear`).

The API key lives only in memory (the password field of the widget) or comes from the ``ACECAL_API_KEY``
environment variable; :func:`save_setting` refuses any key that looks like a secret, so no code path here can write
it to disk.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Protocol
from urllib.parse import urlparse

__all__ = [
    "DEFAULT_SERVER_URL",
    "KEY_SERVER_URL",
    "KEY_SERVER_HISTORY",
    "KEY_MODEL_ID",
    "API_KEY_ENV",
    "MAX_HISTORY",
    "MemorySettings",
    "normalize_server_url",
    "server_history",
    "remember_server_url",
    "last_server_url",
    "remember_model",
    "last_model",
    "save_setting",
    "api_key_from_environment",
    "KEY_UPLOAD_CONSENT",
    "is_loopback",
    "has_upload_consent",
    "remember_upload_consent",
    "key_sent_in_clear",
]

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
KEY_SERVER_URL = "ACECalibration/serverUrl"
KEY_SERVER_HISTORY = "ACECalibration/serverUrlHistory"
KEY_MODEL_ID = "ACECalibration/modelId"
KEY_UPLOAD_CONSENT = "ACECalibration/uploadConsentServers"
API_KEY_ENV = "ACECAL_API_KEY"
MAX_HISTORY = 10
_SECRET_WORDS = ("key", "token", "password", "secret", "auth")


class SettingsStore(Protocol):
    def value(self, key: str, default: Any = None) -> Any: ...

    def setValue(self, key: str, value: Any) -> None: ...


class MemorySettings:
    """A dict-backed settings store with the QSettings methods the helpers use."""

    def __init__(self, values: dict[str, Any] | None = None):
        self.values: dict[str, Any] = dict(values or {})

    def value(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def setValue(self, key: str, value: Any) -> None:
        self.values[key] = value


def normalize_server_url(url: str | None) -> str:
    """``""`` -> the default local server; no scheme -> ``http://``; no trailing slash. Raises ValueError if
    unusable."""
    u = (url or "").strip()
    if not u:
        return DEFAULT_SERVER_URL
    if "://" not in u:
        u = "http://" + u
    parsed = urlparse(u)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"'{url}' is not a server address; expected something like {DEFAULT_SERVER_URL}")
    return u.rstrip("/")


def save_setting(store: SettingsStore, key: str, value: Any) -> None:
    """``store.setValue`` that refuses secrets (keys naming a key, token, password, ...)."""
    name = key.rsplit("/", 1)[-1].lower()
    if any(w in name for w in _SECRET_WORDS):
        raise ValueError(f"refusing to store '{key}': API keys and other secrets are never written to settings")
    store.setValue(key, value)


def server_history(store: SettingsStore) -> list[str]:
    """Previously used server URLs, most recent first."""
    raw = store.value(KEY_SERVER_HISTORY, "") or ""
    items = raw if isinstance(raw, (list, tuple)) else str(raw).split(";")
    out: list[str] = []
    for item in items:
        item = str(item).strip()
        if item and item not in out:
            out.append(item)
    return out[:MAX_HISTORY]


def remember_server_url(store: SettingsStore, url: str) -> str:
    """Normalise ``url``, make it the current server and put it first in the history (at most :data:`MAX_HISTORY`)."""
    u = normalize_server_url(url)
    history = [u] + [h for h in server_history(store) if h != u]
    save_setting(store, KEY_SERVER_URL, u)
    save_setting(store, KEY_SERVER_HISTORY, ";".join(history[:MAX_HISTORY]))
    return u


def last_server_url(store: SettingsStore) -> str:
    """The last server used, or the default local one."""
    try:
        return normalize_server_url(store.value(KEY_SERVER_URL, "") or "")
    except ValueError:
        return DEFAULT_SERVER_URL


def remember_model(store: SettingsStore, model_id: str) -> None:
    """Record the model the user chose: it is selected again whenever a server offers it."""
    save_setting(store, KEY_MODEL_ID, model_id)


def last_model(store: SettingsStore) -> str:
    """The model the user chose last (``""`` when they never chose one)."""
    return str(store.value(KEY_MODEL_ID, "") or "")


def api_key_from_environment() -> str:
    """The API key from ``ACECAL_API_KEY`` (the only place other than memory a key comes from), or ``""``."""
    return os.environ.get(API_KEY_ENV, "")


def is_loopback(url: str) -> bool:
    """True when ``url`` points at this computer (``localhost``, 127.0.0.0/8, ``::1``): nothing leaves the machine."""
    host = (urlparse(normalize_server_url(url)).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _consented(store: SettingsStore) -> list:
    raw = store.value(KEY_UPLOAD_CONSENT, "") or ""
    items = raw if isinstance(raw, (list, tuple)) else str(raw).split(";")
    return [str(i).strip() for i in items if str(i).strip()]


def has_upload_consent(store: SettingsStore, url: str) -> bool:
    """May images go to ``url`` without asking? (Always for this computer; otherwise once the user agreed.)"""
    u = normalize_server_url(url)
    return is_loopback(u) or u in _consented(store)


def remember_upload_consent(store: SettingsStore, url: str) -> None:
    """Record that the user agreed to send images to ``url``."""
    u = normalize_server_url(url)
    if u not in _consented(store):
        save_setting(store, KEY_UPLOAD_CONSENT, ";".join(_consented(store) + [u]))


def key_sent_in_clear(url: str, api_key: str | None) -> bool:
    """True when an API key would go unencrypted over the network (plain http to another computer)."""
    if not api_key:
        return False
    u = normalize_server_url(url)
    return urlparse(u).scheme == "http" and not is_loopback(u)
