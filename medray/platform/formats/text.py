"""Clinical text: UTF-8 documents (reports, notes) chunked to the text encoder's maximum length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medray.platform.decoders.text import decode_text, is_text, text_facts
from medray.platform.errors import ConfigError, LimitExceeded
from medray.platform.formats.registry import Format, PrepareContext, Prepared, register_format, run_preprocess

__all__ = ["TEXT", "TextOptions", "prepare_text"]

#: Generous characters per token: a document longer than max_chunks x max_length x this is first
#: chunked on that prefix only, so refusing a huge document costs a bounded tokenization.
_CHARS_PER_TOKEN = 8


@dataclass(frozen=True)
class TextOptions:
    """How documents are chunked (config section ``text``).

    Args:
        overlap_tokens: tokens shared by consecutive chunks.
        max_chars: longest accepted document (characters); a text object over
            ``4 * max_chars`` bytes is refused unread.
        max_chunks: a document that needs more chunks of the encoder's maximum
            length is quarantined (LimitExceeded) before it is embedded.
        pool: ``"mean"`` adds one pooled row per document; ``"none"`` does not.
    """

    overlap_tokens: int = 0
    max_chars: int = 10_000_000
    max_chunks: int = 1000
    pool: str = "mean"

    def __post_init__(self) -> None:
        if isinstance(self.overlap_tokens, bool) or not isinstance(self.overlap_tokens, int) or self.overlap_tokens < 0:
            raise ConfigError("text.overlap_tokens", f"expected an int >= 0, got {self.overlap_tokens!r}")
        if isinstance(self.max_chars, bool) or not isinstance(self.max_chars, int) or self.max_chars < 1:
            raise ConfigError("text.max_chars", f"expected a positive int, got {self.max_chars!r}")
        if isinstance(self.max_chunks, bool) or not isinstance(self.max_chunks, int) or self.max_chunks < 1:
            raise ConfigError("text.max_chunks", f"expected a positive int, got {self.max_chunks!r}")
        if self.pool not in ("mean", "none"):
            raise ConfigError("text.pool", f"expected 'mean' or 'none', got {self.pool!r}")


def prepare_text(
    text: str,
    ctx: PrepareContext,
    options: TextOptions,
    *,
    modality: str = "text",
    patient_key: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Prepared:
    """A document as token chunks of the route's text preprocessor (one item per chunk)."""
    if len(text) > options.max_chars:
        raise LimitExceeded(f"text has {len(text)} characters, over text.max_chars = {options.max_chars}")
    pre = ctx.preprocessor
    prefix = options.max_chunks * int(pre.max_length) * _CHARS_PER_TOKEN
    if len(text) > prefix:
        # Bounded work for a huge document: chunk a prefix first; too many chunks there is too many.
        head = run_preprocess(lambda: pre.chunk_text(text[:prefix], options.overlap_tokens))
        if len(head.token_start) > options.max_chunks:
            raise LimitExceeded(
                f"document needs more than {len(head.token_start)} chunks of {pre.max_length} tokens (counted on "
                f"its first {prefix} characters), over text.max_chunks = {options.max_chunks}; "
                "raise text.max_chunks to embed it"
            )
    chunks = run_preprocess(lambda: pre.chunk_text(text, options.overlap_tokens))
    if len(chunks.token_start) > options.max_chunks:
        raise LimitExceeded(
            f"document has {chunks.n_tokens} tokens in {len(chunks.token_start)} chunks of {pre.max_length}, "
            f"over text.max_chunks = {options.max_chunks}; raise text.max_chunks to embed it"
        )
    segments = [
        {"segment": "chunk", "token_start": s, "token_end": e} for s, e in zip(chunks.token_start, chunks.token_end)
    ]
    meta = dict(
        metadata or {},
        **text_facts(text),
        n_tokens=chunks.n_tokens,
        max_length=pre.max_length,
        overlap_tokens=options.overlap_tokens,
    )
    return Prepared(chunks.inputs, segments, options.pool, modality, meta, patient_key)


def _prepare(data: bytes, ctx: PrepareContext) -> Prepared:
    options = ctx.options_of(TEXT)
    return prepare_text(decode_text(data, max_chars=options.max_chars), ctx, options)


def _sniff(data: bytes, name: str) -> str | None:
    return "text" if is_text(bytes(data[:4096])) else None


TEXT = register_format(
    Format(
        name="text",
        modality="text",
        sniff=_sniff,
        prepare=_prepare,
        priority=90,  # the loosest test: last
        media_types={"text/plain": "input.txt"},
        extensions=(".txt",),
        options=TextOptions,
        options_key="text",
        columns=(("token_start", "int32"), ("token_end", "int32")),
        description="UTF-8 text",
    )
)
