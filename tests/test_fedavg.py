import numpy as np
import pytest

from cloudfed.aggregation import check_update, shapes_of, weighted_mean
from cloudfed.errors import AggregationError


def upd(a: float, b: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 2), a, dtype=np.float32), "b": np.array([b, -b], dtype=np.float32)}


def test_weights_one_and_three() -> None:
    out = weighted_mean([upd(1.0, 2.0), upd(5.0, 6.0)], [1.0, 3.0])
    # (1*1 + 3*5)/4 = 4 ; (1*2 + 3*6)/4 = 5
    np.testing.assert_array_equal(out["w"], np.full((2, 2), 4.0, dtype=np.float32))
    np.testing.assert_array_equal(out["b"], np.array([5.0, -5.0], dtype=np.float32))
    assert out["w"].dtype == np.float32 and out["b"].dtype == np.float32


def test_weights_are_normalised() -> None:
    a = weighted_mean([upd(1.0, 0.0), upd(3.0, 0.0)], [2.0, 2.0])
    b = weighted_mean([upd(1.0, 0.0), upd(3.0, 0.0)], [0.25, 0.25])
    np.testing.assert_array_equal(a["w"], np.full((2, 2), 2.0, dtype=np.float32))
    np.testing.assert_array_equal(a["w"], b["w"])


def test_zero_weight_party_is_ignored() -> None:
    out = weighted_mean([upd(1.0, 1.0), upd(100.0, 100.0)], [1.0, 0.0])
    np.testing.assert_array_equal(out["w"], np.full((2, 2), 1.0, dtype=np.float32))


def test_float64_accumulation() -> None:
    # In float32, 1e8 + 1 == 1e8, so a float32 accumulator would return 0 here instead of 1/3.
    ups = [{"x": np.array([v], dtype=np.float32)} for v in (1e8, 1.0, -1e8)]
    assert weighted_mean(ups, [1, 1, 1])["x"][0] == np.float32(1 / 3)
    many = [{"x": np.array([0.1], dtype=np.float32)} for _ in range(1000)]
    assert weighted_mean(many, [1.0] * 1000)["x"][0] == np.float32(0.1)


@pytest.mark.parametrize(
    ("updates", "weights", "match"),
    [
        ([], [], "no updates"),
        ([upd(1, 1)], [1.0, 2.0], "2 weights for 1 updates"),
        ([upd(1, 1), upd(1, 1)], [0.0, 0.0], "total weight"),
        ([upd(1, 1), upd(1, 1)], [1.0, -1.0], "non-negative"),
        ([upd(1, 1), upd(1, 1)], [1.0, float("nan")], "finite"),
        ([upd(1, 1), {"w": np.zeros((2, 2))}], [1, 1], "update 1 .*missing tensor\\(s\\): b"),
        ([upd(1, 1), upd(1, 1) | {"z": np.zeros(1)}], [1, 1], "unexpected tensor\\(s\\): z"),
        ([upd(1, 1), upd(1, 1) | {"w": np.zeros((2, 3))}], [1, 1], "shape mismatch for w"),
    ],
)
def test_weighted_mean_errors(updates: list, weights: list, match: str) -> None:
    with pytest.raises(AggregationError, match=match):
        weighted_mean(updates, weights)


def test_check_update_reasons() -> None:
    ref = shapes_of(upd(0, 0))
    assert ref == {"w": (2, 2), "b": (2,)}
    assert check_update(upd(1, 1), ref) is None
    assert check_update({"w": np.zeros((2, 2))}, ref) == "missing tensor(s): b"
    assert check_update(upd(1, 1) | {"c": np.zeros(1)}, ref) == "unexpected tensor(s): c"
    assert check_update(upd(1, 1) | {"b": np.zeros(3)}, ref) == "shape mismatch for b: (3,) != (2,)"
    bad = upd(1, 1)
    bad["w"][0, 1] = np.nan
    assert check_update(bad, ref) == "non-finite values in w"
    bad["w"][0, 1] = np.inf
    assert check_update(bad, ref) == "non-finite values in w"
    assert check_update(upd(1, 1e6), ref, max_abs=1e3) == "magnitude 1e+06 exceeds 1e+03 in b"
    assert check_update(upd(1, 1e6), ref) is None
    assert check_update(upd(1, 1) | {"b": np.array(["a", "b"])}, ref).startswith("non-numeric")
