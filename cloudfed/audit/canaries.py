"""Secret-sharer canaries (Carlini et al. 2019): random secrets planted in one party's rows.

A canary is a sentence with a person's name and a uniformly random secret of `secret_digits`
digits. Because the secret is random, a model that ranks it above other random secrets in the
same sentence can only have learned it from the training rows: that rank is the exposure. The
names keep canaries apart, so that each canary's prefix points at exactly one secret.
``random.Random`` is fine here: canaries are test data, not key material.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from cloudfed.audit.config import SECRET_FIELD, CanarySettings

_SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "dor", "ni", "quo", "zan", "bei", "ru"]


@dataclass(frozen=True)
class Canary:
    name: str
    secret: str
    repeats: int
    instruction: str
    template: str

    def response(self, secret: str | None = None) -> str:
        """The canary sentence, with its own secret or a reference candidate's."""
        return self.template.format(
            name=self.name, secret=self.secret if secret is None else secret
        )

    @property
    def prefix(self) -> str:
        return self.template[: self.template.index(SECRET_FIELD)].format(name=self.name)


def _name(rng: random.Random) -> str:
    return " ".join(
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        for _ in range(2)
    )


def make_canaries(settings: CanarySettings, *, seed: int) -> list[Canary]:
    """`per_repeat` canaries for every repeat level, with distinct names and secrets."""
    rng = random.Random(f"cloudfed-audit:{seed}:canaries")
    secrets = rng.sample(range(10**settings.secret_digits), settings.canaries)
    names: list[str] = []
    while len(names) < settings.canaries:
        name = _name(rng)
        if name not in names:
            names.append(name)
    levels = [r for r in settings.repeats for _ in range(settings.per_repeat)]
    return [
        Canary(
            name=name,
            secret=f"{secret:0{settings.secret_digits}d}",
            repeats=repeats,
            instruction=settings.instruction,
            template=settings.format,
        )
        for name, secret, repeats in zip(names, secrets, levels, strict=True)
    ]


def reference_secrets(
    settings: CanarySettings, canaries: Sequence[Canary], *, seed: int
) -> list[str]:
    """Random secrets none of the canaries uses; every canary is ranked against the same set."""
    rng = random.Random(f"cloudfed-audit:{seed}:references")
    taken = {c.secret for c in canaries}
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < settings.references:
        s = f"{rng.randrange(10**settings.secret_digits):0{settings.secret_digits}d}"
        if s not in taken and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def canary_rows(canaries: Sequence[Canary]) -> pd.DataFrame:
    """Each canary as `repeats` identical training rows."""
    records = [
        {"instruction": c.instruction, "response": c.response()}
        for c in canaries
        for _ in range(c.repeats)
    ]
    return pd.DataFrame(records, columns=["instruction", "response"])


def insert_canaries(
    rows: Mapping[str, pd.DataFrame], party: str, canaries: Sequence[Canary], *, seed: int
) -> dict[str, pd.DataFrame]:
    """A copy of every party's rows with the canaries shuffled into `party`'s rows only."""
    if party not in rows:
        raise KeyError(f"no rows for canary party {party!r}")
    out = {name: df.copy() for name, df in rows.items()}
    mixed = pd.concat([rows[party][["instruction", "response"]], canary_rows(canaries)])
    out[party] = mixed.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return out
