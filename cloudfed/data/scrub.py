"""Text normalisation and PII scrubbing applied to every harmonised record.

Scrubbing happens inside the party's cloud, before anything is counted, deduplicated or written,
so that the harmonised files (the only rows a trainer ever reads) carry typed placeholders
instead of contact details. The patterns are deliberately conservative: an amount, a year, a date
or a privacy marker such as ``CFMK3A9F01`` must survive, because mangling them would change
what the model learns and break the leak checks that look for markers.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

EMAIL_PATTERN = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"

# Phone numbers need grouping (separators, a leading + or brackets): a bare run of digits is far
# more often an amount, an id or a year than a phone number. The look-arounds keep the match from
# starting or ending inside a longer token (a marker, a decimal, an account number).
PHONE_PATTERN = (
    r"(?<![\w.+\-/])"
    r"(?:\+\d{1,3}[ .\-]?)?"
    r"(?:\(\d{2,4}\)[ .\-]?|\d{2,4}[ .\-])"
    r"\d{3,4}[ .\-]\d{3,4}"
    r"(?![\w\-/]|[.,]\d)"
)

SCRUBBERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("EMAIL", re.compile(EMAIL_PATTERN)),
    ("PHONE", re.compile(PHONE_PATTERN)),
)

_HSPACE = re.compile(r"[^\S\n]+")
_SPACE_AROUND_NL = re.compile(r" *\n *")
_MANY_NL = re.compile(r"\n{3,}")


def normalise_text(text: str) -> str:
    """NFKC-normalise and tidy whitespace so that look-alike records deduplicate.

    Paragraph breaks are kept (at most one blank line) because instruction templates use them
    to separate an instruction from its input.
    """
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(
        ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in {"Cc", "Cf"}
    )
    text = _HSPACE.sub(" ", text)
    text = _SPACE_AROUND_NL.sub("\n", text)
    return _MANY_NL.sub("\n\n", text).strip()


def scrub_text(text: str) -> tuple[str, Counter[str]]:
    """Replace contact details by ``[KIND]`` placeholders and count what was replaced."""
    counts: Counter[str] = Counter()
    for kind, pattern in SCRUBBERS:
        text, n = pattern.subn(f"[{kind}]", text)
        if n:
            counts[kind] += n
    return text, counts


def clean_text(text: str | None) -> tuple[str | None, Counter[str]]:
    """Normalise then scrub; a missing value (None, NaN, NA) becomes None and stays visible."""
    if not isinstance(text, str):
        return None, Counter()
    return scrub_text(normalise_text(text))


def clean_many(texts: Iterable[str | None]) -> tuple[list[str | None], Counter[str]]:
    """Clean a column of texts, summing the replacement counts over all of them."""
    out: list[str | None] = []
    total: Counter[str] = Counter()
    for text in texts:
        cleaned, counts = clean_text(text)
        out.append(cleaned)
        total.update(counts)
    return out, total
