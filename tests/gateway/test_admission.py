"""The line of async jobs in front of the dispatcher (pure)."""

from __future__ import annotations

from gateway.admission import AdmissionLine


def anything(key: str) -> bool:
    return True


def test_jobs_come_out_first_come_first_served_across_models() -> None:
    line: AdmissionLine[str] = AdmissionLine()
    for ticket, (key, item) in enumerate([("a", "a0"), ("b", "b1"), ("a", "a2"), ("b", "b3")]):
        line.add(key, ticket, item)
    assert len(line) == 4
    assert [line.next(anything) for _ in range(5)] == ["a0", "b1", "a2", "b3", None]
    assert len(line) == 0


def test_a_model_that_may_not_take_one_is_skipped_not_waited_for() -> None:
    line: AdmissionLine[str] = AdmissionLine()
    line.add("a", 0, "a0")
    line.add("a", 1, "a1")
    line.add("b", 2, "b2")
    assert line.next(lambda key: key != "a") == "b2"
    assert line.next(lambda key: key != "a") is None
    assert line.next(anything) == "a0"


def test_positions_count_the_jobs_of_the_same_model_ahead() -> None:
    line: AdmissionLine[str] = AdmissionLine()
    for ticket in range(5):
        line.add("a" if ticket % 2 == 0 else "b", ticket, str(ticket))
    assert [line.position("a", t) for t in (0, 2, 4)] == [0, 1, 2]
    assert [line.position("b", t) for t in (1, 3)] == [0, 1]
    assert line.remove("a", 2) and not line.remove("a", 2) and not line.remove("c", 1)
    assert line.position("a", 4) == 1 and len(line) == 4


def test_a_job_put_back_takes_its_old_place() -> None:
    line: AdmissionLine[str] = AdmissionLine()
    for ticket in (1, 2, 3):
        line.add("a", ticket, f"a{ticket}")
    assert line.next(anything) == "a1"
    line.add("a", 1, "a1")  # it found no provider: back to the front
    assert line.position("a", 3) == 2
    assert [line.next(anything) for _ in range(3)] == ["a1", "a2", "a3"]
