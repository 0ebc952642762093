"""The Sluice plugin vocabulary for Python, in the words of the Rust SDK.

A plugin subclasses `Plugin`, and its module exports it with
`WitWorld = export(MyPlugin)`. `Request` reads what the plugin declared and
raises, naming the declaration to add, for anything else (never a silent
empty value); `allow()` and `deny()` build decisions with `set_header`,
`remove_header`, `log_field` and `reuse_for`.
"""

import json
from typing import List, Optional

from componentize_py_types import Err
from wit_world.imports import host, types
from wit_world.imports.types import Fields, Hooks


# The request's flags as bits, and those of the text fields, whose parts come first in
# the WIT's `request.text`, in flag order.
_METHOD, _SCHEME, _AUTHORITY, _PATH, _QUERY = (
    Fields.METHOD.value,
    Fields.SCHEME.value,
    Fields.AUTHORITY.value,
    Fields.PATH.value,
    Fields.QUERY.value,
)
_CLIENT_ADDR, _CLIENT_IP, _ROUTE, _TENANT = (
    Fields.CLIENT_ADDR.value,
    Fields.CLIENT_IP.value,
    Fields.ROUTE.value,
    Fields.TENANT.value,
)
_TLS, _SUBPROTOCOLS = Fields.TLS.value, Fields.SUBPROTOCOLS.value
_TEXT = (
    _METHOD | _SCHEME | _AUTHORITY | _PATH | _QUERY | _CLIENT_ADDR | _CLIENT_IP | _ROUTE | _TENANT
)


class Request:
    """A request as the plugin sees it: the fields and headers it declared,
    read back from the one string of NUL-ended parts the WIT's `request` is
    (found when asked for: a plugin reads a few of them)."""

    def __init__(self, raw: types.Request, headers: Optional[List[str]]):
        self._raw = raw
        self._headers = headers
        self._bits = raw.fields.value
        self._parts = raw.text.split("\0")

    def _declared(self, bit: int, name: str, flag: str) -> None:
        if not self._bits & bit:
            raise LookupError(
                f"the plugin reads the request's {name}, which its fields() leaves "
                f"out: add Fields.{flag}"
            )

    def _text(self, bit: int, name: str, flag: str) -> str:
        self._declared(bit, name, flag)
        return self._parts[(self._bits & _TEXT & (bit - 1)).bit_count()]

    def _subprotocols_at(self) -> int:
        at = (self._bits & _TEXT).bit_count()
        if self._bits & _TLS and self._raw.tls_on:
            at += 3 + self._raw.cert_names
        return at

    def method(self) -> str:
        return self._text(_METHOD, "method", "METHOD")

    def scheme(self) -> str:
        return self._text(_SCHEME, "scheme", "SCHEME")

    def authority(self) -> str:
        return self._text(_AUTHORITY, "authority", "AUTHORITY")

    def path(self) -> str:
        return self._text(_PATH, "path", "PATH")

    def query_string(self) -> str:
        return self._text(_QUERY, "query", "QUERY")

    def client_addr(self) -> str:
        return self._text(_CLIENT_ADDR, "client address", "CLIENT_ADDR")

    def client_ip(self) -> str:
        return self._text(_CLIENT_IP, "client IP", "CLIENT_IP")

    def route(self) -> str:
        return self._text(_ROUTE, "route", "ROUTE")

    def tenant(self) -> Optional[str]:
        """The tenant assigned, or `None`."""
        return self._text(_TENANT, "tenant", "TENANT") or None

    def subprotocols(self) -> List[str]:
        self._declared(_SUBPROTOCOLS, "subprotocols", "SUBPROTOCOLS")
        at = self._subprotocols_at()
        return self._parts[at : at + self._raw.subprotocols]

    def is_websocket(self) -> bool:
        return self._raw.kind == types.RequestKind.WEBSOCKET

    def header(self, name: str) -> Optional[str]:
        """The first value of a header (names match in any case)."""
        name = name.lower()
        if self._headers is not None and name not in self._headers:
            raise LookupError(
                f"the plugin reads the request header `{name}`, which its headers() "
                f"does not name: add \"{name}\" to it"
            )
        at = self._subprotocols_at()
        if self._bits & _SUBPROTOCOLS:
            at += self._raw.subprotocols
        parts = self._parts
        for i in range(at, at + 2 * self._raw.headers, 2):
            if parts[i] == name:
                return parts[i + 1]
        return None


def _part(value: str) -> str:
    """A part of a decision's text: NUL-ended, a NUL inside written as U+FFFD."""
    return str(value).replace("\0", "\ufffd") + "\0"


class Decision:
    """A verdict under construction: `allow()` or `deny(status, body)`. It crosses
    as the WIT's `decision`: one string of items (header changes, choices, log
    fields, in the order made, each a kind character then NUL-ended parts), then
    the body."""

    def __init__(self, status: int = 0, body: str = ""):
        self._status = status
        self._body = str(body)
        self._text = ""
        self._items = 0
        self._reuse_ms = 0

    def _item(self, kind: str, *parts: str) -> "Decision":
        self._text += kind + "".join(_part(p) for p in parts)
        self._items += 1
        return self

    def set_header(self, name: str, value: str) -> "Decision":
        """Replace an upstream request header (on a deny: a response header)."""
        return self._item("=", name.lower(), value)

    def append_header(self, name: str, value: str) -> "Decision":
        """Add a header value, keeping the others (upstream, or the response's)."""
        return self._item("+", name.lower(), value)

    def remove_header(self, name: str) -> "Decision":
        """Remove a header (upstream, or the response's on a deny)."""
        return self._item("-", name.lower())

    def log_field(self, name: str, value: str) -> "Decision":
        """Add a field to the access-log line."""
        return self._item("l", name.lower(), value)

    def _choose(self, kind: str, value: str) -> "Decision":
        return self._item(kind, value) if self._status == 0 else self

    def pool(self, name: str) -> "Decision":
        """The upstream pool to use (one the route allows). No effect on a deny."""
        return self._choose("p", name)

    def tenant(self, name: str) -> "Decision":
        """The tenant of this exchange. No effect on a deny."""
        return self._choose("t", name)

    def sticky_key(self, key: str) -> "Decision":
        """The consistent-hash key. No effect on a deny."""
        return self._choose("k", key)

    def subprotocol(self, name: str) -> "Decision":
        """The subprotocol to select (one the client offered). No effect on a deny."""
        return self._choose("s", name)

    def reuse_for(self, seconds: float) -> "Decision":
        """Let the gateway give this decision again, without a call, to requests
        that show the plugin the same inputs, for up to `seconds`."""
        self._reuse_ms = max(0, min(int(seconds * 1000), 2**32 - 1))
        return self

    def to_wit(self) -> types.Decision:
        return types.Decision(self._status, self._reuse_ms, self._items, self._text + self._body)


def allow() -> Decision:
    """Let the request through, unchanged until changed."""
    return Decision()


def deny(status: int, body: str) -> Decision:
    """Refuse the request with this status (300 to 599) and body."""
    return Decision(status, body)


class Plugin:
    """A policy plugin. Override what you need; `__init__` takes the config (a
    dict) and raises `ValueError` for a bad one."""

    def __init__(self, config: dict):
        self.config = config

    def headers(self) -> Optional[List[str]]:
        """The request headers `on_request` reads; `None` for all."""
        return None

    def fields(self) -> Optional[Fields]:
        """The other request fields `on_request` reads; `None` for all."""
        return None

    def on_request(self, req: Request) -> Decision:
        return allow()


def log(level: host.Level, message: str, **fields: str) -> None:
    """Log through the gateway, tagged with the plugin's name."""
    host.log(level, message, list(fields.items()))


def export(plugin_class):
    """The component's exports for `plugin_class` (assign to `WitWorld`)."""
    state = {}

    class Exports:
        def init(self, config: str) -> types.Interest:
            try:
                plugin = plugin_class(json.loads(config or "{}"))
            except (ValueError, KeyError, TypeError) as e:
                raise Err(f"invalid config: {e}")
            headers = plugin.headers()
            if headers is not None:
                headers = [h.lower() for h in headers]
            state["plugin"], state["headers"] = plugin, headers
            hooks = Hooks.ON_CLOSE if hasattr(plugin, "on_close") else Hooks(0)
            return types.Interest(hooks, headers, plugin.fields())

        def on_request(self, req: types.Request) -> types.Decision:
            try:
                return state["plugin"].on_request(Request(req, state["headers"])).to_wit()
            except Exception as e:
                # The gateway counts the fault; the message goes to its log.
                host.log(host.Level.ERROR, f"plugin raised: {e!r}", [])
                raise

        def on_close(self, info: types.CloseInfo) -> None:
            plugin = state.get("plugin")
            if plugin is not None and hasattr(plugin, "on_close"):
                plugin.on_close(info)

    return Exports
