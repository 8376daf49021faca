"""Text normalisation, encoding repair and PII scrubbing applied to every harmonised record.

Scrubbing happens inside the party's cloud, before anything is counted, deduplicated or written,
so that the harmonised files (the only rows a trainer ever reads) carry typed placeholders
(``[EMAIL]``, ``[PHONE]``, ``[IBAN]``, ``[CARD]``, ``[NATIONAL_ID]``, ``[IP]``) instead of
identifiers. A pattern only replaces what also passes the identifier's own check (the IBAN
mod-97 checksum, the Luhn digit of a card number, the octet range of an IPv4 address, a parseable
IPv6 address), so that a 16-digit order number, an amount, a date, a version string or a privacy
marker such as ``CFMK3A9F01`` survives: mangling those would change what the model learns.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import ftfy
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EMAIL_PATTERN = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"

# Country code, two check digits, then 11..30 letters/digits, optionally in groups of four.
IBAN_PATTERN = r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"

# 13..19 digits, optionally grouped by single spaces or dashes, not inside a longer token.
CARD_PATTERN = r"(?<![\w\-.])\d(?:[ \-]?\d){12,18}(?![\w\-]|[.,]\d)"

# US SSN (with the dashes that make it recognisable) and UK National Insurance number.
NATIONAL_ID_PATTERN = (
    r"(?<![\w\-])\d{3}-\d{2}-\d{4}(?![\w\-])"
    r"|\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"
)
# Any value a writer labelled as a national id, social security or passport number; the label
# (group 1) is kept so the text still reads naturally.
LABELLED_ID_PATTERN = (
    r"(?i:(\b(?:ssn|social security (?:no\.?|number)|national id(?:entity)? (?:no\.?|number)"
    r"|passport (?:no\.?|number))[:#]? ?))(?=[A-Z0-9\-]*\d)[A-Z0-9][A-Z0-9\-]{5,14}\b"
)
_ID_LABELS = ("ssn", "social security", "national id", "passport")

IPV4_PATTERN = (
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    r"(?![\w]|\.\d)"
)
IPV6_PATTERN = r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"

# Phone numbers need grouping (separators, a leading + or brackets): a bare run of digits is far
# more often an amount, an id or a year than a phone number. The look-arounds keep the match from
# starting or ending inside a longer token (a marker, a decimal, an account number).
PHONE_PATTERN = (
    r"(?<![\w.+\-/])(?<!\d[ .\-])"
    r"(?:\+\d{1,3}[ .\-]?)?"
    r"(?:\(\d{2,4}\)[ .\-]?|\d{2,4}[ .\-])"
    r"\d{3,4}[ .\-]\d{3,4}"
    r"(?![\w\-/]|[.,]\d|[ .\-]\d)"
)


def _iban_ok(candidate: str) -> bool:
    """ISO 13616 mod-97 check: a random look-alike passes with probability 1/97."""
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    digits = "".join(str(int(ch, 36)) for ch in s[4:] + s[:4])
    return int(digits) % 97 == 1


def _luhn_ok(candidate: str) -> bool:
    digits = [int(ch) for ch in candidate if ch.isdigit()]
    if len(set(digits)) == 1:  # 0000 0000 0000 0000 is a placeholder, not a card
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _ipv6_ok(candidate: str) -> bool:
    if candidate.count(":") < 7 and "::" not in candidate:
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return candidate != "::"


def _always(_: str) -> bool:
    return True


def _pattern(expr: str) -> Callable[[str], bool]:
    return re.compile(expr).search  # type: ignore[return-value]


@dataclass(frozen=True)
class Scrubber:
    """One kind of identifier: a cheap gate, the full pattern and the identifier's own check.

    The gate is a necessary condition that Python's regex engine can scan for quickly; most
    texts fail it, so the slower pattern with look-arounds runs only where it can match.
    """

    kind: str
    gate: Callable[[str], object]
    pattern: re.Pattern[str]
    valid: Callable[[str], bool]
    keep_group: int = 0


# Order matters: each kind replaces before the next looks, so longer, checksummed identifiers
# come first (an IBAN's digits are not a phone number).
SCRUBBERS: tuple[Scrubber, ...] = (
    Scrubber("EMAIL", lambda t: "@" in t, re.compile(EMAIL_PATTERN), _always),
    Scrubber("IBAN", _pattern(r"\b[A-Z]{2}\d\d"), re.compile(IBAN_PATTERN), _iban_ok),
    Scrubber("CARD", _pattern(r"\d(?:[ \-]?\d){12}"), re.compile(CARD_PATTERN), _luhn_ok),
    Scrubber(
        "NATIONAL_ID",
        _pattern(r"\d{3}-\d\d-\d{4}|[A-Z]{2} ?\d\d ?\d\d ?\d\d ?[A-D]"),
        re.compile(NATIONAL_ID_PATTERN),
        _always,
    ),
    Scrubber(
        "NATIONAL_ID",
        lambda t: any(label in t.lower() for label in _ID_LABELS),
        re.compile(LABELLED_ID_PATTERN),
        _always,
        keep_group=1,
    ),
    Scrubber("IP", _pattern(r"\d\.\d{1,3}\.\d{1,3}\.\d"), re.compile(IPV4_PATTERN), _always),
    Scrubber(
        "IP",
        lambda t: "::" in t or t.count(":") >= 7,
        re.compile(IPV6_PATTERN),
        _ipv6_ok,
    ),
    Scrubber(
        "PHONE", _pattern(r"[\d)][ .\-]?\d{3,4}[ .\-]\d{3}"), re.compile(PHONE_PATTERN), _always
    ),
)
PII_KINDS: tuple[str, ...] = tuple(dict.fromkeys(s.kind for s in SCRUBBERS))

# Every pattern needs a digit, an '@' or a ':'; text without any of them skips all of them.
_MAYBE_PII = re.compile(r"[\d@:]")

_HSPACE = re.compile(r"[^\S\n]+")
_SPACE_AROUND_NL = re.compile(r" *\n *")
_MANY_NL = re.compile(r"\n{3,}")


def _char_ranges(codes: list[int]) -> str:
    """A regex character class body for these code points, as ranges (fast to match)."""
    parts: list[str] = []
    start = prev = codes[0]
    for c in [*codes[1:], -1]:
        if c == prev + 1:
            prev = c
            continue
        parts.append(re.escape(chr(start)) + ("-" + re.escape(chr(prev)) if prev > start else ""))
        start = prev = c
    return "".join(parts)


# Control and format characters (category Cc/Cf) except newline and tab, built once.
_INVISIBLE = re.compile(
    "["
    + _char_ranges(
        [
            c
            for c in range(0x110000)
            if chr(c) not in "\n\t" and unicodedata.category(chr(c)) in {"Cc", "Cf"}
        ]
    )
    + "]+"
)
_ASCII_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f]+")
# Sequences that only appear when UTF-8 was decoded as Latin-1/cp1252 somewhere upstream.
_MOJIBAKE = re.compile("[\u00c2\u00c3\u00c5\u00e2\u00d0\u00d1][\u0080-\u00bf\u0152-\u2122]")


def repair_mojibake(text: str) -> tuple[str, bool]:
    """Undo UTF-8-read-as-Latin-1 damage with ftfy, only where its tell-tale pairs appear.

    ftfy only changes text when the result is clearly less "bad" than the input, so correct
    accented text (``Café``) is left alone; the regex gate keeps its cost off clean rows.
    """
    if not _MOJIBAKE.search(text):
        return text, False
    fixed = ftfy.fix_encoding(text)
    return fixed, fixed != text


# A lone surrogate (a JSON "\\ud800" escape) is not text; it becomes U+FFFD, which the
# contract's charset expectation then quarantines.
_SURROGATE = re.compile("[\ud800-\udfff]")


def normalise_text(text: str) -> str:
    """NFKC-normalise and tidy whitespace so that look-alike records deduplicate.

    Paragraph breaks are kept (at most one blank line) because instruction templates use them
    to separate an instruction from its input.
    """
    if _SURROGATE.search(text):
        text = _SURROGATE.sub("\ufffd", text)
    if text.isascii():
        text = _ASCII_INVISIBLE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    else:
        text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
        text = _INVISIBLE.sub("", text)
    text = _HSPACE.sub(" ", text)
    if "\n" in text:
        text = _SPACE_AROUND_NL.sub("\n", text)
        text = _MANY_NL.sub("\n\n", text)
    return text.strip()


def scrub_text(text: str) -> tuple[str, Counter[str]]:
    """Replace identifiers by ``[KIND]`` placeholders and count what was replaced per kind."""
    counts: Counter[str] = Counter()
    if not _MAYBE_PII.search(text):
        return text, counts
    for scrubber in SCRUBBERS:
        if not scrubber.gate(text):
            continue

        def _sub(match: re.Match[str], s: Scrubber = scrubber) -> str:
            if not s.valid(match.group(0)):
                return match.group(0)
            counts[s.kind] += 1
            keep = match.group(s.keep_group) if s.keep_group else ""
            return f"{keep}[{s.kind}]"

        text = scrubber.pattern.sub(_sub, text)
    return text, counts


def clean_text(text: str | None) -> tuple[str | None, Counter[str]]:
    """Repair, normalise then scrub; a missing value (None, NaN, NA) stays None and visible."""
    if not isinstance(text, str):
        return None, Counter()
    text, repaired = repair_mojibake(text)
    cleaned, counts = scrub_text(normalise_text(text))
    if repaired:
        counts["_repaired"] += 1
    return cleaned, counts


# RE2 (pyarrow) gates, each a necessary condition for the Python function it guards, so that a
# column is cleaned in C++ scans and only the rows that need it pay for Python. A test checks
# `clean_column` against `clean_text` on adversarial text.
_NEEDS_NORMALISING = (
    r"[^\P{Cc}\n]|\p{Cf}|[\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}"
    r"\x{205f}\x{3000}]|  | \n|\n |\n\n\n|^[ \n]|[ \n]$"
)
_MAY_HOLD_PII = (
    r"@|\b[A-Z]{2}\d\d|\d(?:[ \-]?\d){12}|\d{3}-\d\d-\d{4}|[A-Z]{2} ?\d\d ?\d\d ?\d\d ?[A-D]"
    r"|(?i:ssn|social security|national id|passport)|\d\.\d{1,3}\.\d{1,3}\.\d|::"
    r"|:(?:[^:]*:){6}|[\d)][ .\-]?\d{3,4}[ .\-]\d{3}"
)


def _to_arrow(texts: Sequence[str | None]) -> pa.StringArray:
    try:
        return pa.array(texts, type=pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError):  # NaN, non-str, surrogates
        safe = [_SURROGATE.sub("\ufffd", t) if isinstance(t, str) else None for t in texts]
        return pa.array(safe, type=pa.string())


def clean_column(texts: Sequence[str | None]) -> tuple[list[str | None], Counter[str]]:
    """`clean_text` over a column, with C++ gates deciding which rows need Python at all.

    Non-ASCII rows are first repaired and NFKC-normalised in Python (Python's and Arrow's
    Unicode tables can differ, and the result must not depend on which one ran); NFKC is
    idempotent, so the gates then see exactly what `normalise_text` would.
    """
    arr = _to_arrow(texts)
    out: list[str | None] = arr.to_pylist()
    total: Counter[str] = Counter()
    if not len(arr):
        return out, total
    non_ascii = pc.fill_null(pc.invert(pc.string_is_ascii(arr)), False)
    rows = np.flatnonzero(non_ascii.to_numpy(zero_copy_only=False))
    for i in rows:
        text, repaired = repair_mojibake(out[i])  # type: ignore[arg-type]
        if repaired:
            total["_repaired"] += 1
        out[i] = unicodedata.normalize("NFKC", text)
    if len(rows):
        arr = _to_arrow(out)
    full = pc.fill_null(pc.match_substring_regex(arr, _NEEDS_NORMALISING), False)
    scan = pc.fill_null(
        pc.and_(pc.invert(full), pc.match_substring_regex(arr, _MAY_HOLD_PII)), False
    )
    for i in np.flatnonzero(full.to_numpy(zero_copy_only=False)):
        out[i], counts = scrub_text(normalise_text(out[i]))  # type: ignore[arg-type]
        total.update(counts)
    for i in np.flatnonzero(scan.to_numpy(zero_copy_only=False)):
        out[i], counts = scrub_text(out[i])  # type: ignore[arg-type]
        total.update(counts)
    return out, total


def clean_many(texts: Iterable[str | None]) -> tuple[list[str | None], Counter[str]]:
    """Clean a column of texts, summing the per-kind counts (``_repaired``: mojibake fixed)."""
    return clean_column(list(texts))
