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


# --- fair shares -------------------------------------------------------------------------------


def test_a_client_with_one_job_does_not_wait_behind_a_flood() -> None:
    line: AdmissionLine[str] = AdmissionLine()
    for ticket in range(1000):
        line.add("m", ticket, f"flood{ticket}", client="flood")
    assert line.next(anything) == "flood0"
    line.add("m", 1000, "polite", client="polite")
    assert line.position("m", 1000) <= 1
    assert line.next(anything) == "polite"  # a new client goes first
    assert line.next(anything) == "flood1"


def test_clients_that_keep_jobs_waiting_take_turns_by_weight() -> None:
    line: AdmissionLine[str] = AdmissionLine()
    for ticket in range(40):
        line.add("m", 2 * ticket, "a", client="a", weight=1.0)
        line.add("m", 2 * ticket + 1, "b", client="b", weight=3.0)
    served = [line.next(anything) for _ in range(40)]
    # After the first turns, b gets three jobs for each of a's.
    assert 27 <= served.count("b") <= 31 and served.count("a") + served.count("b") == 40


def test_work_is_shared_by_cost_not_by_count() -> None:
    line: AdmissionLine[str] = AdmissionLine()
    for ticket in range(20):
        line.add("m", 2 * ticket, "big", client="big", cost=4.0)
        line.add("m", 2 * ticket + 1, "small", client="small", cost=1.0)
    served = [line.next(anything) for _ in range(15)]
    assert served.count("small") >= 3 * served.count("big") - 1


def test_new_clients_go_by_weight_then_in_order() -> None:
    line: AdmissionLine[str] = AdmissionLine()
    line.add("m", 0, "busy0", client="busy")
    line.add("m", 1, "busy1", client="busy")
    assert line.next(anything) == "busy0"
    line.add("m", 2, "anon", client="anon")
    line.add("m", 3, "contributor", client="contributor", weight=4.0)
    line.add("m", 4, "anon2", client="anon2")
    assert [line.next(anything) for _ in range(4)] == ["contributor", "anon", "anon2", "busy1"]


def test_a_client_over_its_jobs_in_flight_is_passed_over() -> None:
    line: AdmissionLine[str] = AdmissionLine()
    line.add("m", 0, "a0", client="a")
    line.add("m", 1, "a1", client="a")
    line.add("m", 2, "b0", client="b")
    assert line.next(anything, lambda client: client != "a") == "b0"
    assert line.next(anything, lambda client: client != "a") is None
    assert [line.next(anything) for _ in range(3)] == ["a0", "a1", None]
    assert len(line) == 0


def test_a_job_taken_out_unserved_gets_its_cost_back() -> None:
    line: AdmissionLine[str] = AdmissionLine()
    for ticket in range(4):
        line.add("m", ticket, f"a{ticket}", client="a")
    line.add("m", 10, "b0", client="b")
    line.add("m", 11, "b1", client="b")
    assert line.next(anything) == "a0"
    line.add("m", 0, "a0", client="a", returned=True)  # no provider was free
    assert line.remove("m", 11)
    assert [line.next(anything) for _ in range(6)] == ["a0", "b0", "a1", "a2", "a3", None]
