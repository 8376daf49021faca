"""Deterministic demo exports for three simulated clouds, each shaped the way its owner exports.

The federation's embedded default needs raw data that looks like three different organisations:
different formats, nesting, vocabularies and text lengths (non-IID), plus the faults real exports
have (empty answers, runaway text, duplicates, contact details). Every record carries a unique
privacy marker ``CFMK`` + 6 hex digits so that end-to-end tests can scan every coordinator-side
store and prove that no raw text left a party. ``random.Random`` is fine here: this is sample
data, not key material.

    python -m cloudfed.data.demo --out .cloudfed/clouds
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MARKER_PREFIX = "CFMK"
MARKER_RE = re.compile(MARKER_PREFIX + r"[0-9A-F]{6}")
PARTIES: dict[str, str] = {"hospital-aws": "csv", "bank-gcp": "jsonl", "insurer-azure": "parquet"}
MIN_TRAIN_ROWS = 60
# Row groups are Parquet's unit of reading: a reader's memory is bounded by one, not the file.
PARQUET_ROW_GROUP = 10_000

# Train-split positions of the planted faults (every party, same places, for easy test counts).
EMPTY_ROW, NULL_ROW, LONG_ROW = 5, 17, 29
DUPLICATES = {41: 3, 53: 11}  # position -> position it copies exactly
NEAR_DUPLICATES = {59: 23}  # position -> position it copies with other case and punctuation
PII_ROWS = (7, 19, 31)
# position -> identifier kind planted there (valid checksums, so the scrubber must catch them)
IDENTIFIER_ROWS = {35: "IBAN", 37: "CARD", 43: "NATIONAL_ID", 47: "IP"}
LOOKALIKE_ROW = 49  # text that only looks like identifiers and must survive scrubbing
MOJIBAKE_ROW = 57  # UTF-8 read as Latin-1 upstream: repaired, not quarantined

Record = dict[str, object]

_FIRST = ["Alex", "Sam", "Maria", "Jon", "Priya", "Chen", "Fatima", "Lukas"]
_LAST = ["Meyer", "Okafor", "Silva", "Novak", "Tanaka", "Brennan", "Haddad", "Larsen"]
_PHONES = ["+1 555-013-2271", "(555) 014-9932", "+44 20 7946 0958", "555.017.4410"]


def _contact(rng: random.Random, kind: int) -> str:
    """Contact details as people paste them: 0 = e-mail, 1 = phone, 2 = both."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    email = f"{first.lower()}.{last.lower()}@{rng.choice(['mail.example.com', 'example.org'])}"
    phone = rng.choice(_PHONES)
    return [
        f" Please reply to {email}.",
        f" You can reach {first} on {phone}.",
        f" Contact me at {email} or {phone}.",
    ][kind]


def _hospital(rng: random.Random, marker: str) -> Record:
    drug, dose = rng.choice(
        [("metformin", 500), ("lisinopril", 10), ("atorvastatin", 20), ("amoxicillin", 500)]
    )
    cond = rng.choice(["type 2 diabetes", "hypertension", "asthma", "atrial fibrillation", "COPD"])
    dept = rng.choice(["cardio", "endo", "pulm", "gp"])
    age = rng.randint(18, 90)
    question = rng.choice(
        [
            f"What is the usual starting dose of {drug} for a {age}-year-old with {cond}?",
            f"Which side effects of {drug} should a patient with {cond} report?",
            f"Can {drug} be combined with ibuprofen in {cond}?",
            f"How often should kidney function be checked on {drug} {dose}\u00a0mg?",
        ]
    )
    answer = rng.choice(
        [
            f"Start {drug} at {dose} mg daily and review after 2 weeks; adjust for renal function.",
            f"Advise the patient to report dizziness, rash or swelling. In {cond}, check blood "
            f"pressure and electrolytes within 1-2 weeks of starting {drug}.",
            f"Avoid routine NSAID use with {drug}; prefer paracetamol up to 4 g per day and "
            f"document the plan in the {cond} care record.",
            f"Check eGFR at baseline, after 3 months and then every 6-12 months while on {drug}.",
        ]
    )
    return {"question": f"{question} (case ref {marker})", "answer": answer, "dept": dept}


def _bank(rng: random.Random, marker: str) -> Record:
    product = rng.choice(["current account", "credit card", "mortgage", "savings account"])
    amount = rng.choice([49.99, 120.0, 1250.5, 15000.0, 320.75])
    intent = rng.choice(["dispute", "limit", "fees", "transfer", "freeze"])
    instruction, output = {
        "dispute": (
            f"Help the customer dispute a {amount:.2f} GBP charge on their {product}.",
            f"I have opened a dispute for {amount:.2f} GBP; you will hear back in 10 working days.",
        ),
        "limit": (
            f"Explain how to raise the daily limit on a {product}.",
            "Open the app, go to Limits, and request a new daily limit; changes apply within 24h.",
        ),
        "fees": (
            f"Summarise the monthly fees of the {product}.",
            f"The {product} has no monthly fee; overdraft interest is 19.9% EAR.",
        ),
        "transfer": (
            f"Tell the customer why a transfer of {amount:.2f} GBP is pending.",
            "Transfers above the daily limit are held for a fraud check, usually under 4 hours.",
        ),
        "freeze": (
            f"Guide the customer through freezing their {product} card.",
            "Tap Card, then Freeze; unfreezing is instant and no replacement is needed.",
        ),
    }[intent]
    note = rng.choice(["", "", f"Customer since {rng.randint(1995, 2023)}.", "Premium tier."])
    return {
        "id": f"conv-{rng.randrange(16**8):08x}",
        "record": {
            "instruction": f"{instruction} Ticket {marker}.",
            "input": note,
            "output": output,
        },
        "meta": {
            "channel": rng.choice(["chat", "email", "phone"]),
            "locale": rng.choice(["en-GB", "en-IE"]),
            "intent": intent,
        },
    }


def _insurer(rng: random.Random, marker: str) -> Record:
    policy = rng.choice(["AUTO", "HOME", "TRAVEL", "PET"])
    event = {
        "AUTO": "a rear-end collision on the motorway",
        "HOME": "water damage from a burst pipe in the kitchen",
        "TRAVEL": "a cancelled flight and a lost suitcase",
        "PET": "an emergency vet visit after the dog swallowed a toy",
    }[policy]
    cost = rng.randint(300, 25000)
    year = rng.randint(2015, 2024)
    prompt = (
        f"Claim ref {marker}: the policyholder reports {event} in {year}, estimated cost "
        f"{cost} EUR. Draft the adjuster's assessment and next steps."
    )
    steps = [
        f"Verify that the {policy.lower()} policy was active in {year} and the excess applies.",
        "Request photographs, invoices and any third-party report within 14 days.",
        f"Reserve {cost} EUR pending documents; escalate if the amount exceeds 10000 EUR.",
        "Check the claim history for similar events in the last 3 years.",
        "Inform the policyholder of the expected decision date in writing.",
    ]
    rng.shuffle(steps)
    completion = "Assessment: the event appears covered. Next steps:\n" + "\n".join(
        f"{i}. {s}" for i, s in enumerate(steps[: rng.randint(3, 5)], start=1)
    )
    created = dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=rng.randrange(525_600))
    return {
        "prompt": prompt,
        "completion": completion,
        "policy_type": policy,
        "created_at": created,
        "agent_id": f"AG{rng.randint(100, 999)}",
    }


_MAKERS: dict[str, Callable[[random.Random, str], Record]] = {
    "hospital-aws": _hospital,
    "bank-gcp": _bank,
    "insurer-azure": _insurer,
}
_TEXT_FIELDS = {  # (instruction-like, response-like) field of each raw shape
    "hospital-aws": ("question", "answer"),
    "bank-gcp": ("record.instruction", "record.output"),
    "insurer-azure": ("prompt", "completion"),
}


def _get(rec: Record, path: str) -> object:
    obj: object = rec
    for key in path.split("."):
        obj = obj[key]  # type: ignore[index]
    return obj


def _set(rec: Record, path: str, value: object) -> None:
    *parents, last = path.split(".")
    obj: object = rec
    for key in parents:
        obj = obj[key]  # type: ignore[index]
    obj[last] = value  # type: ignore[index]


_IDENTIFIERS = {
    "IBAN": " Refund to IBAN DE89 3704 0044 0532 0130 00.",
    "CARD": " Card on file: 4111 1111 1111 1111.",
    "NATIONAL_ID": " SSN 078-05-1120 on the form.",
    "IP": " Submitted from 192.168.14.201.",
}
LOOKALIKE_TEXT = " Ref ORD-2024-000123, order 4111 1111 1111 1112, v2.13.0, 2023-04-15."


def _near_copy(value: object) -> object:
    """The same text as people retype it: other case, extra punctuation and spacing."""
    if not isinstance(value, str):
        return value
    return value.upper().replace(" ", "  ", 2) + " !"


def _plant_faults(party: str, rows: list[Record], rng: random.Random) -> None:
    instr, resp = _TEXT_FIELDS[party]
    for pos, kind in IDENTIFIER_ROWS.items():
        _set(rows[pos], resp, f"{_get(rows[pos], resp)}{_IDENTIFIERS[kind]}")
    _set(rows[LOOKALIKE_ROW], resp, f"{_get(rows[LOOKALIKE_ROW], resp)}{LOOKALIKE_TEXT}")
    broken = " Served at the café.".encode().decode("latin-1")
    _set(rows[MOJIBAKE_ROW], resp, f"{_get(rows[MOJIBAKE_ROW], resp)}{broken}")
    _set(rows[EMPTY_ROW], resp, "")
    _set(rows[NULL_ROW], resp, None)
    _set(rows[LONG_ROW], resp, ("Detailed notes follow. " * 200).strip())
    for k, pos in enumerate(PII_ROWS):
        field = resp if k == 1 else instr
        _set(rows[pos], field, f"{_get(rows[pos], field)}{_contact(rng, k)}")
    for pos, src in DUPLICATES.items():
        rows[pos] = json.loads(json.dumps(rows[src], default=str))
        if party == "insurer-azure":
            rows[pos]["created_at"] = rows[src]["created_at"]
    for pos, src in NEAR_DUPLICATES.items():
        rows[pos] = json.loads(json.dumps(rows[src], default=str))
        for path in (instr, resp):
            _set(rows[pos], path, _near_copy(_get(rows[src], path)))
        if party == "insurer-azure":
            rows[pos]["created_at"] = rows[src]["created_at"]


def _write(party: str, rows: list[Record], path: Path) -> None:
    if party == "hospital-aws":
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(
                fh, fieldnames=["question", "answer", "dept"], lineterminator="\n"
            )
            writer.writeheader()
            writer.writerows(rows)
    elif party == "bank-gcp":
        with path.open("w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        schema = pa.schema(
            [
                ("prompt", pa.string()),
                ("completion", pa.string()),
                ("policy_type", pa.string()),
                ("created_at", pa.timestamp("us", tz="UTC")),
                ("agent_id", pa.string()),
            ]
        )
        table = pa.Table.from_pylist(rows, schema=schema)
        pq.write_table(table, path, compression="snappy", row_group_size=PARQUET_ROW_GROUP)


def generate_demo(
    out_root: Path, *, seed: int = 0, train_rows: int = 240, eval_rows: int = 60
) -> dict[str, dict[str, Path]]:
    """Write ``<out_root>/<party>/raw/{train,eval}.<ext>`` for the three demo parties."""
    return _generate(out_root, {p: p for p in PARTIES}, seed, train_rows, eval_rows)


def scaled_parties(n: int) -> dict[str, str]:
    """`n` party names, each mapped to the demo export it is shaped like (the three in turn).

    A load test needs many parties but only the three source mappings the contracts ship, so
    party i copies the format of demo party i mod 3 under a name of its own.
    """
    if n < 1:
        raise ValueError(f"need at least one party, got {n}")
    shapes = list(PARTIES)
    return {f"{shapes[i % len(shapes)]}-{i:02d}": shapes[i % len(shapes)] for i in range(n)}


def generate_scaled(
    out_root: Path,
    n: int,
    *,
    sources: Path,
    seed: int = 0,
    train_rows: int = 60,
    eval_rows: int = 12,
) -> dict[str, dict[str, Path]]:
    """Raw exports for `n` parties (`scaled_parties`), each with its own records and markers.

    Each party also gets ``<party>/mapping.yaml``: the source mapping of the demo party it copies
    (from `sources`, e.g. data_contracts/sources) under its own name, since a mapping names the
    one party it belongs to.
    """
    shapes = scaled_parties(n)
    written = _generate(out_root, shapes, seed, train_rows, eval_rows)
    for party, shape in shapes.items():
        mapping = (Path(sources) / f"{shape}.yaml").read_text(encoding="utf-8")
        mapping, found = re.subn(r"(?m)^party: .*$", f"party: {party}", mapping, count=1)
        if not found:
            raise ValueError(f"{Path(sources) / f'{shape}.yaml'}: no top-level `party:` line")
        path = Path(out_root) / party / "mapping.yaml"
        path.write_text(mapping, encoding="utf-8")
        written[party]["mapping"] = path
    return written


def _generate(
    out_root: Path, shapes: dict[str, str], seed: int, train_rows: int, eval_rows: int
) -> dict[str, dict[str, Path]]:
    if train_rows < MIN_TRAIN_ROWS or eval_rows < 1:
        raise ValueError(f"need train_rows >= {MIN_TRAIN_ROWS} and eval_rows >= 1")
    out_root = Path(out_root)
    total = len(shapes) * (train_rows + eval_rows)
    pool = random.Random(f"cloudfed-demo:{seed}:markers").sample(range(16**6), total)
    markers = iter(f"{MARKER_PREFIX}{n:06X}" for n in pool)
    written: dict[str, dict[str, Path]] = {}
    for party, shape in shapes.items():
        rng = random.Random(f"cloudfed-demo:{seed}:{party}")
        raw_dir = out_root / party / "raw"
        raw_dir.mkdir(parents=True, exist_ok=True)
        written[party] = {}
        for split, n in (("train", train_rows), ("eval", eval_rows)):
            rows = [_MAKERS[shape](rng, next(markers)) for _ in range(n)]
            if split == "train":
                _plant_faults(shape, rows, rng)
            path = raw_dir / f"{split}.{PARTIES[shape]}"
            _write(shape, rows, path)
            written[party][split] = path
    return written


def planted_markers(out_root: Path) -> set[str]:
    """Every privacy marker present in the demo raw files under ``out_root``."""
    found: set[str] = set()
    for party, ext in PARTIES.items():
        for path in sorted((Path(out_root) / party / "raw").glob(f"*.{ext}")):
            if ext == "parquet":
                text = json.dumps(pq.read_table(path).to_pylist(), default=str)
            else:
                text = path.read_text(encoding="utf-8")
            found.update(MARKER_RE.findall(text))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write the demo raw exports of three clouds (or --parties N for a load test)."
    )
    parser.add_argument("--out", type=Path, default=Path(".cloudfed/clouds"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-rows", type=int, default=240)
    parser.add_argument("--eval-rows", type=int, default=60)
    parser.add_argument(
        "--parties", type=int, default=None, help="N load-test parties (scaled_parties), not 3"
    )
    parser.add_argument(
        "--sources", type=Path, default=Path("data_contracts/sources"), help="with --parties"
    )
    args = parser.parse_args(argv)
    rows = {"seed": args.seed, "train_rows": args.train_rows, "eval_rows": args.eval_rows}
    if args.parties is None:
        written = generate_demo(args.out, **rows)
    else:
        written = generate_scaled(args.out, args.parties, sources=args.sources, **rows)
    for party, splits in written.items():
        for split, path in splits.items():
            print(f"{party:>14} {split:<5} {path}")


if __name__ == "__main__":
    main()
