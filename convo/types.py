"""Pydantic models of what crosses convo's edges: API usage, replies, tool calls, settings.

Content blocks themselves stay plain dicts: the API adds block types faster than any model could
follow, and convo must store and replay the ones it does not know byte-for-byte.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Block = dict[str, Any]


class Usage(BaseModel):
    """Token counts of one call. Billed input is input + cache writes + cache reads."""

    model_config = ConfigDict(frozen=True)

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    # The 5-minute / 1-hour split of cache writes, where the API reports it.
    cache_creation_5m_input_tokens: int | None = None
    cache_creation_1h_input_tokens: int | None = None

    @classmethod
    def from_api(cls, usage: dict[str, Any] | None) -> Usage:
        """Read the API's `usage` object; missing or null counts are zero."""
        usage = usage or {}
        split = usage.get("cache_creation") or {}
        return cls(
            input_tokens=usage.get("input_tokens") or 0,
            output_tokens=usage.get("output_tokens") or 0,
            cache_creation_input_tokens=usage.get("cache_creation_input_tokens") or 0,
            cache_read_input_tokens=usage.get("cache_read_input_tokens") or 0,
            cache_creation_5m_input_tokens=split.get("ephemeral_5m_input_tokens"),
            cache_creation_1h_input_tokens=split.get("ephemeral_1h_input_tokens"),
        )

    @property
    def total_input_tokens(self) -> int:
        return (
            self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens
        )


class ToolUse(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


def text_of(blocks: list[Block]) -> str:
    """The concatenated text of a block list (what a person reads)."""
    return "".join(b.get("text", "") for b in blocks if b.get("type") == "text")


def tool_uses_of(blocks: list[Block]) -> list[ToolUse]:
    return [
        ToolUse(id=b["id"], name=b["name"], input=b.get("input") or {})
        for b in blocks
        if b.get("type") == "tool_use"
    ]
