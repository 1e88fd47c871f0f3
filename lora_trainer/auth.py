"""HTTP basic authentication for the API: `--api-auth user:password[,user2:password2]`.

The WebUI adapters pass A1111's own `--api-auth` here; `serve` has the same option. FastAPI is
imported only when a dependency is built, so parsing works anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from secrets import compare_digest

from .errors import ConfigError


def parse_api_auth(value: str | None) -> dict[str, str]:
    """`user:pass,user2:pass2` as {user: password} (the WebUI's own parsing: entries without ':' are ignored)."""
    creds: dict[str, str] = {}
    for item in (value or "").split(","):
        item = item.strip()
        if item and ":" in item:
            user, password = item.split(":", 1)
            creds[user] = password
    return creds


def parse_api_auth_strict(value: str) -> dict[str, str]:
    """As parse_api_auth, but an entry without a user name or password is a ConfigError (our CLI)."""
    for item in (i.strip() for i in value.split(",")):
        user, sep, password = item.partition(":")
        if not (sep and user.strip() and password):
            raise ConfigError(f"--api-auth entry {item!r} is not USER:PASSWORD; write e.g. "
                              "--api-auth alice:long-secret (several: comma-separated).")
    return parse_api_auth(value)


def basic_auth_dependency(creds: dict[str, str]) -> Callable[..., bool] | None:
    """A FastAPI dependency that answers 401 unless the request carries one of `creds` (HTTP basic);
    None when `creds` is empty."""
    if not creds:
        return None
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    basic = HTTPBasic()

    def auth(credentials: HTTPBasicCredentials = Depends(basic)) -> bool:  # noqa: B008 - FastAPI idiom
        expected = creds.get(credentials.username)
        if expected is not None and compare_digest(credentials.password.encode(), expected.encode()):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    # Real classes, not the strings `from __future__ import annotations` leaves: FastAPI 0.94 resolves
    # string annotations in this module's globals, where HTTPBasicCredentials is not imported.
    auth.__annotations__ = {"credentials": HTTPBasicCredentials, "return": bool}
    return auth
