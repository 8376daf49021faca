"""The coordinator streams contributions: its memory in a round does not grow with n updates.

Each coordinator stage that touches every party's contribution (opening the uploads for the
inputs roster, unmasking and aggregating) runs under tracemalloc, at 3 and at 12 parties, with an
adapter large enough (rank 64 on every projection) that one update dwarfs the per-party state
(keys, shares, rosters). A coordinator that held the n opened uploads would peak at 12 updates
at 12 parties; streaming keeps it at a few, whatever n is. A structural bound, not a timing.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from cloudfed.protection import messages
from tests.protected_support import Federation, federation_dict, random_updates

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MEASURED = {"upload": "inputs_roster", "unmask": "aggregate"}  # reset after key, read after value


def _peaks(tmp_path: Path, model_cache: Path, n: int) -> tuple[dict[str, int], int]:
    """Peak traced bytes above the stage's start, per measured stage; one update's masked bytes."""
    names = [f"party-{i:02d}" for i in range(n)]
    fed = Federation(
        federation_dict(
            tmp_path / f"n{n}",
            model_cache,
            names,
            lora={"rank": 64, "alpha": 64, "target_modules": MODULES},
        )
    )
    layout = messages.layout_for(fed.cfg, fed.exchange, fed.plan)
    seg = layout.segment("secagg")
    assert seg is not None
    update_bytes = 4 * seg.size
    peaks: dict[str, int] = {}
    base = {"at": 0}

    def hook(stage: str, _: Federation) -> None:
        if stage in MEASURED:
            tracemalloc.reset_peak()
            base["at"] = tracemalloc.get_traced_memory()[0]
        elif stage in MEASURED.values():
            peaks[stage] = tracemalloc.get_traced_memory()[1] - base["at"]

    examples = {p: 100 + k for k, p in enumerate(names)}
    # warm: every module the stages import is imported now
    fed.round(1, random_updates(fed, examples, 1))
    tracemalloc.start()
    try:
        _, report, _ = fed.round(2, random_updates(fed, examples, 2), hook=hook)
    finally:
        tracemalloc.stop()
    assert sorted(report.accepted) == names  # every contribution was summed
    assert set(peaks) == set(MEASURED.values())
    return peaks, update_bytes


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def test_coordinator_peak_is_a_few_updates_whatever_the_party_count(
    tmp_path: Path, model_cache: Path
) -> None:
    small, update = _peaks(tmp_path, model_cache, 3)
    large, same = _peaks(tmp_path, model_cache, 12)
    assert same == update and update > 500_000  # one update dwarfs any party's small state
    # Opening: one opened upload and the copy the coordinator keeps of it, then the next.
    # Aggregating: the unmasked sum, its float64 decoding per tensor, the global adapter and the
    # new one. Holding the 12 uploads would add 12 updates to either.
    bounds = {"inputs_roster": 4, "aggregate": 10}
    for stage, k in bounds.items():
        assert large[stage] < k * update, (stage, large[stage] / update)
        # From 3 to 12 parties: O(n) small state only, less than one more update.
        assert large[stage] - small[stage] < update, (stage, small[stage], large[stage])
