"""convo: a stateful conversation manager over Anthropic's stateless Messages API."""

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
from convo.service import Conversation, Reply, ReplyStream, Store
from convo.tools import Tool, tool
from convo.types import ToolUse, Usage

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
