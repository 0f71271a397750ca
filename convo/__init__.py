"""convo: a stateful conversation manager over Anthropic's stateless Messages API."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from convo.errors import (
    AmbiguousId,
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    BudgetExceeded,
    Conflict,
    ContentError,
    ConvoError,
    HistoryError,
    InvalidInput,
    MissingApiKey,
    NotFound,
    OutputInvalid,
    PrefillNotSupported,
    SchemaTooNew,
    StoreError,
)

if TYPE_CHECKING:
    from convo.service import Conversation, Reply, ReplyStream, Store
    from convo.tools import Tool, tool
    from convo.types import ToolUse, Usage

# Imported when first asked for (PEP 562): the errors are light, these bring in SQLAlchemy,
# pydantic and httpx, which the console script imports only once it can handle Ctrl-C.
_LAZY = {
    "Conversation": "convo.service",
    "Reply": "convo.service",
    "ReplyStream": "convo.service",
    "Store": "convo.service",
    "Tool": "convo.tools",
    "tool": "convo.tools",
    "ToolUse": "convo.types",
    "Usage": "convo.types",
}


if not TYPE_CHECKING:  # (to a type checker, a name convo lacks stays an error)

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'convo' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # (once: later lookups find it without coming here)
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AmbiguousId",
    "BudgetExceeded",
    "Conflict",
    "ContentError",
    "Conversation",
    "ConvoError",
    "HistoryError",
    "InvalidInput",
    "MissingApiKey",
    "NotFound",
    "OutputInvalid",
    "PrefillNotSupported",
    "Reply",
    "ReplyStream",
    "SchemaTooNew",
    "Store",
    "StoreError",
    "Tool",
    "ToolUse",
    "Usage",
    "tool",
]
