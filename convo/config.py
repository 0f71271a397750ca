"""Where settings come from: the caller first, then the environment, read when asked, never at import."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from convo.errors import ConfigError
from convo.ids import has_controls, is_text

DATABASE_URL_ENV = "CONVO_DATABASE_URL"
API_KEY_ENV = "ANTHROPIC_API_KEY"
BASE_URL_ENV = "ANTHROPIC_BASE_URL"


def data_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The user's data directory for convo, by the platform's convention."""
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    elif sys.platform == "win32":
        base = Path(env.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        xdg = env.get("XDG_DATA_HOME")
        base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "convo"


def default_database_path(env: Mapping[str, str] = os.environ) -> Path:
    return data_dir(env) / "convo.db"


def database_url(url: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """The caller's URL, else CONVO_DATABASE_URL, else the embedded SQLite default."""
    if url is not None and not isinstance(url, str):
        raise ConfigError(f"a database URL is a string, not {type(url).__name__}")
    if url is not None and not url.strip():
        # (None means the default; an empty string is a mistake, e.g. an unset variable.)
        raise ConfigError("the database URL is empty")
    if url is not None and (not is_text(url) or has_controls(url)):
        # (Only control characters: a file name may hold a no-break space or a joiner.)
        raise ConfigError("the database URL holds a control character or invalid text")
    if url:
        return url
    if env.get(DATABASE_URL_ENV):
        return env[DATABASE_URL_ENV]
    return f"sqlite:///{default_database_path(env)}"

