"""Deterministic workloads shared by convo and the floor: the same texts, usage and write order.

Nothing here touches a database. A `Dataset` is a list of threads plus the order in which their
exchanges are written (`chunks`), so both systems see the same rows interleaved the same way in
time: several threads growing at once, as in a real store.
"""

from __future__ import annotations

import base64
import random
import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from convo.pricing import PriceTable
from convo.types import Usage

MODEL = "claude-sonnet-4-5"
MAX_TOKENS = 1024
TEXT_CHARS = 400  # about this many characters a turn
POOL_SIZE = 4096
OTHER_THREADS = 50
OTHER_EXCHANGES = 20
ROUNDS = 5  # the measured thread and the others grow together over this many rounds
GROUP = 5  # other threads written between two slices of the measured thread

# Words with the characters JSON must escape or encode: quotes, backslashes, newlines, non-ASCII.
_SPICE = ['"quoted"', "back\\slash", "line\nbreak", "café", "naïve", "—", "日本語", "emoji🙂", "tab\there"]


@lru_cache(maxsize=1)
def text_pool() -> tuple[str, ...]:
    rng = random.Random(20251124)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(3000)] + _SPICE * 20
    pool = []
    for _ in range(POOL_SIZE):
        target = TEXT_CHARS - 20 + rng.randint(0, 40)
        words: list[str] = []
        size = 0
        while size < target:
            w = rng.choice(vocab)
            words.append(w)
            size += len(w) + 1
        pool.append((" ".join(words))[:target].strip() + ".")
    return tuple(pool)


def next_question() -> str:
    return text_pool()[-1]


def text(thread: int, index: int) -> str:
    """Text of turn `index` (0-based, user turns even, replies odd) of a thread."""
    pool = text_pool()
    return pool[(thread * 7919 + index * 31) % (POOL_SIZE - 1)]


@lru_cache(maxsize=1)
def _price() -> PriceTable:
    return PriceTable.default()


@dataclass(frozen=True, slots=True)
class Exchange:
    user: list[dict[str, Any]]
    reply: list[dict[str, Any]]
    input_tokens: int
    output_tokens: int
    cost: float


def exchange(thread: int, k: int, image: dict[str, Any] | None = None) -> Exchange:
    user: list[dict[str, Any]] = [{"type": "text", "text": text(thread, 2 * k)}]
    if image is not None:
        user = [image, *user]
    reply = [{"type": "text", "text": text(thread, 2 * k + 1)}]
    inp = 120 + 190 * k + (thread * 31 + k * 17) % 50
    out = 80 + (thread * 13 + k * 7) % 60
    cost = _price().cost(MODEL, Usage(input_tokens=inp, output_tokens=out))
    assert cost is not None
    return Exchange(user, reply, inp, out, cost)


@dataclass
class Dataset:
    """Threads of exchanges and the interleaved order they are written in."""

    name: str
    threads: list[list[Exchange]]
    # (thread, first exchange, end exchange) in write order.
    chunks: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def exchanges(self) -> int:
        return sum(len(t) for t in self.threads)


def thread_case(n: int, *, image: dict[str, Any] | None = None, name: str | None = None) -> Dataset:
    """Thread 0 (measured, n exchanges) and 50 threads of 20 exchanges, interleaved in time.

    In each of 5 rounds every other thread gets 4 exchanges and the measured thread a fifth of
    its own, cut into 10 slices written between groups of 5 other threads.
    """
    threads = [[exchange(0, k, image) for k in range(n)]]
    threads += [[exchange(t, k) for k in range(OTHER_EXCHANGES)] for t in range(1, OTHER_THREADS + 1)]
    per_round = OTHER_EXCHANGES // ROUNDS
    chunks: list[tuple[int, int, int]] = []
    for r in range(ROUNDS):
        lo, hi = r * n // ROUNDS, (r + 1) * n // ROUNDS
        for j in range(OTHER_THREADS):
            if j % GROUP == 0:
                s = j // GROUP
                a = lo + (hi - lo) * s // (OTHER_THREADS // GROUP)
                b = lo + (hi - lo) * (s + 1) // (OTHER_THREADS // GROUP)
                if b > a:
                    chunks.append((0, a, b))
            chunks.append((j + 1, r * per_round, (r + 1) * per_round))
    return Dataset(name or f"n={n}", threads, chunks)


def audit_case(threads: int, exchanges: int, rounds: int = 5) -> Dataset:
    """`threads` threads of `exchanges` exchanges, written round-robin in `rounds` rounds."""
    data = [[exchange(t, k) for k in range(exchanges)] for t in range(threads)]
    chunks = []
    for r in range(rounds):
        lo, hi = r * exchanges // rounds, (r + 1) * exchanges // rounds
        if hi > lo:
            chunks += [(t, lo, hi) for t in range(threads)]
    return Dataset(f"{threads}x{exchanges}", data, chunks)


def png(side: int = 577, seed: int = 7) -> bytes:
    """A real, valid, incompressible RGB PNG (random pixels): about 1 MB at 577 px a side."""
    rng = random.Random(seed)
    raw = b"".join(b"\x00" + rng.randbytes(side * 3) for _ in range(side))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def image_block(data: bytes) -> dict[str, Any]:
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(data).decode()},
    }


def api_reply(text_value: str, input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """A Messages API reply as the mock transport returns it."""
    return {
        "id": "msg_01BenchmarkReply000000000",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": text_value}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }
