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
    assert [line.next(0.0, anything) for _ in range(5)] == ["a0", "b1", "a2", "b3", None]
    assert len(line) == 0


def test_a_model_without_room_is_skipped_not_waited_for() -> None:
    line: AdmissionLine[str] = AdmissionLine()
    line.add("a", 0, "a0")
    line.add("a", 1, "a1")
    line.add("b", 2, "b2")
    assert line.next(0.0, lambda key: key != "a") == "b2"
    assert line.next(0.0, lambda key: key != "a") is None
    assert line.next(0.0, anything) == "a0"


def test_positions_count_the_jobs_of_the_same_model_ahead() -> None:
    line: AdmissionLine[str] = AdmissionLine()
    for ticket in range(5):
        line.add("a" if ticket % 2 == 0 else "b", ticket, str(ticket))
    assert [line.position("a", t) for t in (0, 2, 4)] == [0, 1, 2]
    assert [line.position("b", t) for t in (1, 3)] == [0, 1]
    assert line.remove("a", 2) and not line.remove("a", 2) and not line.remove("c", 1)
    assert line.position("a", 4) == 1 and len(line) == 4


def test_a_job_backing_off_keeps_its_place_but_waits_its_time() -> None:
    line: AdmissionLine[str] = AdmissionLine()
    line.add("a", 5, "later")
    line.add("a", 1, "backing off", not_before=10.0)  # it came first
    assert line.position("a", 5) == 1
    assert line.wake_at(0.0) == 10.0
    assert line.next(0.0, anything) == "later"
    assert line.next(0.0, anything) is None
    assert line.next(10.0, anything) == "backing off"
    assert line.wake_at(10.0) is None and len(line) == 0


def test_the_first_job_wins_among_models_even_behind_one_backing_off() -> None:
    line: AdmissionLine[str] = AdmissionLine()
    line.add("a", 0, "a0", not_before=5.0)
    line.add("a", 3, "a3")
    line.add("b", 2, "b2")
    assert line.next(0.0, anything) == "b2"
    assert line.next(0.0, anything) == "a3"
    assert line.next(6.0, anything) == "a0"
