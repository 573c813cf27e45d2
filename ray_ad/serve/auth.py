"""Bearer tokens: one per product line, plus an admin token for adaptation and rollback.

Tokens come from a secret file (YAML or JSON, any fsspec URI) or from the ``RAY_AD_TOKENS``
environment variable holding the same document::

    admin: <token>
    lines:
      elpv-mono: <token>
      elpv-poly: <token>

A request without a token gets 401; a token that is not the line's (or the admin's) gets 403, so a
line's token never reads another line's models. Comparisons are constant-time.
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from ray_ad import storage
from ray_ad.errors import ConfigError
from ray_ad.registry import check_name
from ray_ad.serve.requests import BadRequest

ENV_VAR = "RAY_AD_TOKENS"
MIN_TOKEN_LENGTH = 16


class AccessDenied(BadRequest):
    """401 (no or malformed credentials) or 403 (credentials that do not grant this resource)."""


@dataclass(frozen=True)
class Tokens:
    admin: str | None = None
    lines: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Any, source: str) -> Tokens:
        if not isinstance(data, dict) or set(data) - {"admin", "lines"}:
            raise ConfigError(f"{source}: expected a mapping with 'admin' and/or 'lines'")
        lines = data.get("lines") or {}
        if not isinstance(lines, dict):
            raise ConfigError(f"{source}: 'lines' must map line names to tokens")
        for line, token in lines.items():
            check_name("line", line)
            _check_token(token, f"{source}: token of line {line!r}")
        admin = data.get("admin")
        if admin is not None:
            _check_token(admin, f"{source}: admin token")
        return cls(admin, dict(lines))

    @classmethod
    def load(cls, uri: str | None = None) -> Tokens:
        """From the secret file at ``uri``, else from ``RAY_AD_TOKENS``; no source is an error."""
        if uri:
            text, source = storage.read_text(uri), uri
        elif os.environ.get(ENV_VAR):
            text, source = os.environ[ENV_VAR], f"${ENV_VAR}"
        else:
            raise ConfigError(f"no access tokens: give a token file or set {ENV_VAR}")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML/JSON ({exc})") from exc
        return cls.from_mapping(data, source)

    def to_json(self) -> str:
        return json.dumps({"admin": self.admin, "lines": self.lines})

    def check_line(self, line: str, authorization: str | None) -> None:
        """Allow the line's own token or the admin token."""
        token = _bearer(authorization)
        allowed = [t for t in (self.lines.get(line), self.admin) if t]
        if not any(hmac.compare_digest(token.encode(), t.encode()) for t in allowed):
            raise AccessDenied(403, f"this token does not grant access to line {line!r}")

    def check_known(self, authorization: str | None) -> None:
        """Allow any token this service issued (the admin's or a line's); 403 for any other."""
        token = _bearer(authorization)
        issued = [t for t in (self.admin, *self.lines.values()) if t]
        if not any(hmac.compare_digest(token.encode(), t.encode()) for t in issued):
            raise AccessDenied(403, "this token is not known to the service")

    def check_admin(self, authorization: str | None) -> None:
        token = _bearer(authorization)
        if not self.admin or not hmac.compare_digest(token.encode(), self.admin.encode()):
            raise AccessDenied(403, "this operation needs the admin token")


def _check_token(token: Any, what: str) -> None:
    if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ConfigError(f"{what} must be a string of at least {MIN_TOKEN_LENGTH} characters without spaces")


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise AccessDenied(401, "missing 'Authorization: Bearer <token>' header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AccessDenied(401, "the Authorization header must be 'Bearer <token>'")
    return token.strip()
