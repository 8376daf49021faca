"""Exact and near-exact de-duplication across chunks and against the train split."""

from __future__ import annotations

import numpy as np

from cloudfed.data.dedup import DedupIndex, exact_keys, near_form, near_keys


def test_near_form_ignores_case_punctuation_and_spacing() -> None:
    assert near_form("What is X?") == near_form("what  is x") == b"whatisx"
    assert near_form("Café_au-lait!") == "caféaulait".encode()
    assert near_form("Straße") == near_form("STRASSE")  # casefold, not lower
    assert near_form("What is Y?") != near_form("What is X?")


def test_keys_are_stable_and_pair_sensitive() -> None:
    a = exact_keys(["q1", "q2"], ["r1", "r2"])
    assert a.dtype == np.uint64 and len(a) == 2
    assert list(a) == list(exact_keys(["q1", "q2"], ["r1", "r2"]))
    assert a[0] != a[1]
    # the separator keeps ("ab", "c") and ("a", "bc") apart
    assert exact_keys(["ab"], ["c"])[0] != exact_keys(["a"], ["bc"])[0]
    assert near_keys(["What is X?"], ["It is Y."])[0] == near_keys(["what is x"], ["it is y"])[0]
    assert exact_keys(["What is X?"], ["It is Y."])[0] != exact_keys(["what is x"], ["it is y"])[0]


def test_exact_and_near_duplicates_in_one_chunk_keep_the_first() -> None:
    index = DedupIndex()
    ins = ["What is X?", "What is X?", "what is x", "What  is X", "What is Y?", "What is X?"]
    res = ["X is 1.", "X is 1.", "x is 1", "X is 1", "Y is 2.", "X is 2."]
    assert index.classify(ins, res) == [
        None,
        "duplicate",
        "near_duplicate",
        "near_duplicate",
        None,
        None,  # same instruction, different response: a different pair
    ]
    assert index.nbytes == 16 * 3


def test_duplicates_across_chunks() -> None:
    index = DedupIndex()
    assert index.classify(["a", "b"], ["1", "2"]) == [None, None]
    assert index.classify(["c", "a", "B!", "b"], ["3", "1", "2", "2"]) == [
        None,
        "duplicate",
        "near_duplicate",
        "duplicate",
    ]
    assert index.classify(["b"], ["2"]) == ["duplicate"]
    assert index.classify([], []) == []
    assert index.nbytes == 16 * 3


def test_rejected_rows_are_not_indexed() -> None:
    index = DedupIndex()
    index.classify(["q"], ["r"])
    index.classify(["Q"], ["R"])  # near duplicate: not accepted, not indexed
    assert index.nbytes == 16
    # its exact form was never accepted, so it is still only a near duplicate
    assert index.classify(["Q"], ["R"]) == ["near_duplicate"]


def test_duplicate_of_train_via_parent() -> None:
    train = DedupIndex()
    assert train.classify(["What is X?", "What is Z?"], ["1", "3"]) == [None, None]
    held_out = DedupIndex(parent=train)
    assert held_out.classify(
        ["What is X?", "what is z", "What is Y?", "What is Y?", "what is y"],
        ["1", "3", "2", "2", "2"],
    ) == ["duplicate_of_train", "duplicate_of_train", None, "duplicate", "near_duplicate"]
    assert held_out.nbytes == 16 * 1
    assert train.nbytes == 16 * 2  # the parent is only read, never written
    assert held_out.classify(["what is x?"], ["1"]) == ["duplicate_of_train"]
    # a row only in the held-out split is not a train duplicate for the train index
    assert train.classify(["What is Y?"], ["2"]) == [None]


def test_index_memory_is_16_bytes_per_accepted_row() -> None:
    index = DedupIndex()
    assert index.nbytes == 0
    accepted = 0
    for chunk in range(5):
        ins = [f"question {i}" for i in range(chunk * 700, chunk * 700 + 1000)]
        res = [f"answer {i}" for i in range(chunk * 700, chunk * 700 + 1000)]
        reasons = index.classify(ins, res)
        assert reasons.count("duplicate") == (300 if chunk else 0)
        accepted += reasons.count(None)
        assert index.nbytes == 16 * accepted
    assert accepted == 4 * 700 + 1000
