"""What clients send the journal, checked: metadata with their images and the times they filter by.

Every refusal names the field (the service answers 400, or 413 for what is too large), so a client learns
what to fix; SQL-looking text is kept verbatim (only parameters ever reach the database).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

MAX_TEXT = 200  # characters of source, sample_id and each tag
MAX_TAGS = 20
MAX_NOTE = 2000  # characters of a review's note


class MetadataError(ValueError):
    """Client metadata that is refused: `field` names it, `too_large` tells 413 from 400."""

    def __init__(self, field_name: str, message: str, too_large: bool = False) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.too_large = too_large


@dataclass(frozen=True, slots=True)
class ClientMetadata:
    """What a client may send with its images (query parameters of POST /embed)."""

    source: str | None = None  # the instrument or pipeline
    sample_id: str | None = None
    tags: tuple[str, ...] = ()

    @classmethod
    def parse(cls, values: Mapping[str, Sequence[str]]) -> ClientMetadata:
        """From parsed query parameters; refuses repeated or unknown-shaped values naming the field."""
        source = _one_text(values, "source")
        sample_id = _one_text(values, "sample_id")
        tags: list[str] = []
        for value in values.get("tags", ()):
            tags += [tag.strip() for tag in value.split(",") if tag.strip()]
        if len(tags) > MAX_TAGS:
            raise MetadataError("tags", f"{len(tags)} tags; at most {MAX_TAGS}", too_large=True)
        for tag in tags:
            _check_text("tags", tag)
        return cls(source, sample_id, tuple(tags))


def _one_text(values: Mapping[str, Sequence[str]], name: str) -> str | None:
    given = values.get(name, ())
    if len(given) > 1:
        raise MetadataError(name, "given more than once")
    if not given or given[0] == "":
        return None
    _check_text(name, given[0])
    return given[0]


def _check_text(name: str, text: str) -> None:
    if len(text) > MAX_TEXT:
        raise MetadataError(name, f"{len(text)} characters; at most {MAX_TEXT}", too_large=True)
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise MetadataError(name, "control characters are not allowed")


def utc_time(name: str, text: str | None) -> str | None:
    """A time a client gave (ISO 8601: a day, or a time with `Z`, an offset or none, read as UTC) in the form
    the journal stores, so that comparing the text compares the times; MetadataError naming `name` otherwise."""
    if text is None:
        return None
    if len(text) > 6 and text[-6] == " " and text[-3] == ":":  # "+01:00" sent unencoded: '+' arrives as ' '
        text = text[:-6] + "+" + text[-5:]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise MetadataError(
            name, f"{text!r} is not an ISO 8601 time, e.g. 2026-12-01 or 2026-12-01T08:00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")
