"""PII scrubbing, normalisation and mojibake repair, and the fast column path matching them."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cloudfed.data.scrub import (
    PII_KINDS,
    clean_column,
    clean_many,
    clean_text,
    normalise_text,
    repair_mojibake,
    scrub_text,
)

# --- detection: every kind, several formats -----------------------------------------------------

DETECTED: list[tuple[str, str, str]] = [
    # (text, expected output, kind)
    ("call +44 20 7946 0958 now", "call [PHONE] now", "PHONE"),
    ("call (555) 123-4567 today", "call [PHONE] today", "PHONE"),
    ("tel 555-123-4567.", "tel [PHONE].", "PHONE"),
    ("tel 555.123.4567", "tel [PHONE]", "PHONE"),
    ("ring 020 7946 0958", "ring [PHONE]", "PHONE"),
    ("+1 415 555 2671", "[PHONE]", "PHONE"),
    ("+49-30-1234-5678", "[PHONE]", "PHONE"),
    ("mail jane.doe@example.com please", "mail [EMAIL] please", "EMAIL"),
    ("to a.b+tag@mail.co.uk.", "to [EMAIL].", "EMAIL"),
    ("X_Y-1%z@sub-domain.example.org", "[EMAIL]", "EMAIL"),
    ("IBAN DE89 3704 0044 0532 0130 00 ok", "IBAN [IBAN] ok", "IBAN"),
    ("iban DE89370400440532013000", "iban [IBAN]", "IBAN"),
    ("pay GB82WEST12345698765432 now", "pay [IBAN] now", "IBAN"),
    ("pay GB82 WEST 1234 5698 7654 32", "pay [IBAN]", "IBAN"),
    ("card 4111 1111 1111 1111 exp", "card [CARD] exp", "CARD"),
    ("card 5500-0000-0000-0004", "card [CARD]", "CARD"),
    ("card 4111111111111111.", "card [CARD].", "CARD"),
    ("ssn 078-05-1120", "ssn [NATIONAL_ID]", "NATIONAL_ID"),
    ("NINO AB 12 34 56 C", "NINO [NATIONAL_ID]", "NATIONAL_ID"),
    ("nino AB123456C.", "nino [NATIONAL_ID].", "NATIONAL_ID"),
    ("passport no: X1234567", "passport no: [NATIONAL_ID]", "NATIONAL_ID"),
    ("Passport number X1234567 expired", "Passport number [NATIONAL_ID] expired", "NATIONAL_ID"),
    ("national id no. AB-123456", "national id no. [NATIONAL_ID]", "NATIONAL_ID"),
    ("from 192.168.1.20 at noon", "from [IP] at noon", "IP"),
    ("host 10.0.0.1.", "host [IP].", "IP"),
    ("v6 2001:db8::8a2e:370:7334 up", "v6 [IP] up", "IP"),
    ("v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "v6 [IP]", "IP"),
    ("link fe80::1 down", "link [IP] down", "IP"),
]


@pytest.mark.parametrize(("text", "expected", "kind"), DETECTED)
def test_each_identifier_is_replaced_and_counted(text: str, expected: str, kind: str) -> None:
    out, counts = scrub_text(text)
    assert out == expected
    assert counts == Counter({kind: 1})


def test_mixed_text_counts_each_kind_exactly() -> None:
    text = (
        "Jane (jane@example.com, +44 20 7946 0958 or 555-123-4567) paid from "
        "DE89 3704 0044 0532 0130 00 and GB82WEST12345698765432 with card "
        "4111 1111 1111 1111 and 5500-0000-0000-0004; SSN 078-05-1120, NINO AB 12 34 56 C, "
        "passport no: X1234567; logged in from 192.168.1.20 and 2001:db8::8a2e:370:7334."
    )
    out, counts = scrub_text(text)
    assert counts == Counter(
        {"EMAIL": 1, "PHONE": 2, "IBAN": 2, "CARD": 2, "NATIONAL_ID": 3, "IP": 2}
    )
    assert set(counts) == set(PII_KINDS)
    assert out == (
        "Jane ([EMAIL], [PHONE] or [PHONE]) paid from [IBAN] and [IBAN] with card "
        "[CARD] and [CARD]; SSN [NATIONAL_ID], NINO [NATIONAL_ID], "
        "passport no: [NATIONAL_ID]; logged in from [IP] and [IP]."
    )
    # scrubbing is idempotent: placeholders are not detected again
    assert scrub_text(out) == (out, Counter())


# --- look-alikes that must survive ----------------------------------------------------------------

SURVIVORS = [
    "card 4111 1111 1111 1112 (Luhn-invalid)",
    "4111111111111112",
    "IBAN DE89370400440532013001 has a bad checksum",
    "GB82 WEST 1234 5698 7654 33",
    "GB82WEST12345698765433",
    "999.1.1.1",
    "256.10.10.10 is no address",
    "release version 2.13.0 and 1.2.3.4.5",
    "on 2023-04-15 at 10:30:15",
    "lunch 12:30, 2024/01/15",
    "total $12,450.00 due",
    "marker CFMK3A9F01 stays",
    "order ORD-2024-000123 shipped",
    "certified ISO 27001",
    "our passport number is great",
    "Order 1234567890123456 (a 16-digit id, Luhn-invalid)",
    "0000 0000 0000 0000",
    "call 555 1234",
    "population 1 234 567",
]


@pytest.mark.parametrize("text", SURVIVORS)
def test_look_alikes_are_left_unchanged(text: str) -> None:
    assert scrub_text(text) == (text, Counter())
    assert clean_text(text) == (text, Counter())


def test_look_alikes_survive_next_to_real_identifiers() -> None:
    text = "card 4111 1111 1111 1111 but not 4111 1111 1111 1112; v2.13.0 on 2023-04-15"
    out, counts = scrub_text(text)
    assert out == "card [CARD] but not 4111 1111 1111 1112; v2.13.0 on 2023-04-15"
    assert counts == Counter({"CARD": 1})


# --- normalisation and mojibake -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  a\u00a0\u00a0b\u3000c  ", "a b c"),
        ("zero\u200bwidth\ufeff joiner\u200d", "zerowidth joiner"),
        ("a\r\nb\rc", "a\nb\nc"),
        ("para one  \n\n\n\n  para two", "para one\n\npara two"),
        ("tab\tand\x00nul\x07bell", "tab andnulbell"),
        ("\ufb01ne \uff26\uff55\uff4c\uff4c", "fine Full"),
    ],
)
def test_normalise_text(raw: str, expected: str) -> None:
    assert normalise_text(raw) == expected


def test_mojibake_is_repaired_and_counted() -> None:
    assert repair_mojibake("CafÃ© au lait") == ("Café au lait", True)
    out, counts = clean_text("CafÃ© au lait")
    assert out == "Café au lait"
    assert counts == Counter({"_repaired": 1})
    assert clean_column(["CafÃ© au lait", "plain", "Ã©tÃ©"]) == (
        ["Café au lait", "plain", "été"],
        Counter({"_repaired": 2}),
    )


@pytest.mark.parametrize("text", ["Café", "naïve façade", "Ãbc uppercase A-tilde alone", "ASCII"])
def test_correct_text_is_not_repaired(text: str) -> None:
    assert repair_mojibake(text) == (text, False)
    assert clean_text(text) == (text, Counter())


def test_missing_values_stay_none() -> None:
    assert clean_text(None) == (None, Counter())
    assert clean_text(float("nan")) == (None, Counter())  # type: ignore[arg-type]
    assert clean_column([None, float("nan"), "x", ""]) == (  # type: ignore[list-item]
        [None, None, "x", ""],
        Counter(),
    )
    assert clean_many(iter(["a  b", None])) == (["a b", None], Counter())
    assert clean_column([]) == ([], Counter())


# --- the fast column path equals clean_text -----------------------------------------------------

PIECES: list[str] = [
    "a", "Hello", "world", " ", "  ", "\t", "\n", "\r\n", "\r", "\n\n\n", "\x00", "\x07",
    "\x0b", "\x0c", "\x1b", "\x1c", "\x1f", "\x7f", "\x85", "\u200b", "\u200d", "\u2060",
    "\ufeff", "\u00ad", "\u00a0", "\u3000", "\u1680", "\u2028", "\u202f", "\u205f",
    "CafÃ©", "Ã©", "â€™", "Â\u00a0", "Café", "\ufb01", "\u2460", "\uff26\uff55\uff4c\uff4c",
    "\u212a", "\u017f", "\u0661\u0662\u0663", "e\u0301", "\U0001f600",
    "jane.doe@example.com", "@", "a@b", "+44 20 7946 0958", "(555) 123-4567", "555-123-4567",
    "DE89 3704 0044 0532 0130 00", "DE89370400440532013001", "GB82WEST12345698765432",
    "4111 1111 1111 1111", "4111 1111 1111 1112", "5500-0000-0000-0004", "078-05-1120",
    "AB 12 34 56 C", "AB123456C", "passport no: X1234567", "SSN ", "national id ",
    "192.168.1.20", "999.1.1.1", "2001:db8::8a2e:370:7334", "::", ":", "fe80::1",
    "2.13.0", "2023-04-15", "10:30:15", "$12,450.00", "CFMK3A9F01", "ORD-2024-000123",
    "0", "1", "12", "123", "1234", ".", "-", ",", "(", ")", "+", "é", "x",
]  # fmt: skip


def _fuzz_texts(rng: random.Random, n: int) -> list[str | None]:
    texts: list[str | None] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.03:
            texts.append(None)
        elif r < 0.05:
            texts.append(float("nan"))  # type: ignore[arg-type]
        else:
            texts.append("".join(rng.choice(PIECES) for _ in range(rng.randint(0, 9))))
    return texts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_column_equals_clean_text_on_fuzz(seed: int) -> None:
    texts = _fuzz_texts(random.Random(seed), 4000)
    out, total = clean_column(texts)
    expected: list[str | None] = []
    want: Counter[str] = Counter()
    for text in texts:
        cleaned, counts = clean_text(text)
        expected.append(cleaned)
        want.update(counts)
    mismatches = [(t, o, e) for t, o, e in zip(texts, out, expected, strict=True) if o != e]
    assert mismatches == []
    assert total == want
    # the fuzz set really exercises every kind, repairs and missing values
    assert set(PII_KINDS) <= set(want) and want["_repaired"] > 0
    assert out.count(None) >= sum(t is None for t in texts) > 0


def test_clean_column_pure_ascii_fast_path_matches() -> None:
    """ASCII rows that skip normalisation: only the PII gate decides, it must not miss any."""
    texts = [t for t, _, _ in DETECTED] + SURVIVORS + ["plain text", "a b", "", "x:y:z"]
    out, total = clean_column(texts)
    pairs = [clean_text(t) for t in texts]
    assert out == [o for o, _ in pairs]
    assert total == sum((c for _, c in pairs), Counter())
    assert total["PHONE"] == sum(kind == "PHONE" for _, _, kind in DETECTED)
