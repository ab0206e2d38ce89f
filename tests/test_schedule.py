"""`PruningSchedule`: the fraction of the targets in force at given steps, defaults, and bad arguments."""

import pytest

from hf_prune.errors import InvalidScheduleError, UsageError
from hf_prune.training.schedule import PruningSchedule


def test_cubic_follows_zhu_and_gupta_at_its_events():
    schedule = PruningSchedule("cubic", start_step=2, end_step=12, frequency=2).resolved(20)
    assert schedule.events() == [2, 4, 6, 8, 10, 12]
    expected = {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0, 4: 1 - 0.8**3, 5: 1 - 0.8**3, 6: 1 - 0.6**3, 10: 1 - 0.2**3}
    for step, fraction in expected.items():
        assert schedule.fraction(step) == pytest.approx(fraction, abs=1e-12), step
    assert schedule.fraction(12) == 1.0
    assert schedule.fraction(20) == 1.0


def test_cubic_starts_from_initial_sparsity_and_ends_exactly_at_end_step():
    schedule = PruningSchedule("cubic", start_step=0, end_step=7, frequency=3, initial_sparsity=0.25).resolved(10)
    assert schedule.events() == [0, 3, 6, 7]  # the last interval is shorter: the end is always an event
    assert schedule.fraction(0) == 0.25
    assert schedule.fraction(3) == pytest.approx(1 - 0.75 * (1 - 3 / 7) ** 3)
    assert schedule.fraction(6) < 1.0
    assert schedule.fraction(7) == 1.0


def test_iterative_adds_the_same_share_every_frequency_steps():
    schedule = PruningSchedule("iterative", start_step=0, end_step=8, frequency=2).resolved(8)
    assert [schedule.fraction(step) for step in range(9)] == [0, 0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0]


def test_oneshot_prunes_everything_at_its_step():
    schedule = PruningSchedule("oneshot", start_step=5).resolved(10)
    assert schedule.events() == [5]
    assert [schedule.fraction(step) for step in (0, 4, 5, 9)] == [0, 0, 1.0, 1.0]


def test_default_is_cubic_from_zero_to_three_quarters_of_the_run():
    schedule = PruningSchedule().resolved(100)
    assert (schedule.kind, schedule.start_step, schedule.end_step, schedule.frequency) == ("cubic", 0, 75, 1)
    assert schedule.fraction(0) == 0.0
    assert schedule.fraction(75) == 1.0
    fractions = [schedule.fraction(step) for step in range(101)]
    assert fractions == sorted(fractions)  # never un-prunes


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "linear"}, r"kind='linear' is unknown; choose one of oneshot, iterative, cubic"),
        ({"frequency": 0}, r"frequency=0 must be an int >= 1"),
        ({"start_step": -1}, r"start_step=-1 must be an int >= 0"),
        ({"start_step": 5, "end_step": 5}, r"end_step=5 must be greater than start_step=5"),
        ({"kind": "oneshot", "end_step": 9}, r"a one-shot schedule prunes once, at start_step"),
        ({"initial_sparsity": 1.0}, r"initial_sparsity=1.0 must be a fraction of the targets in \[0, 1\)"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(InvalidScheduleError, match=message) as error:
        PruningSchedule(**kwargs)
    assert isinstance(error.value, UsageError)


def test_a_schedule_must_end_within_the_run():
    with pytest.raises(InvalidScheduleError, match=r"end_step=50 is after the run's last optimizer step \(20\)"):
        PruningSchedule(end_step=50).resolved(20)
    with pytest.raises(InvalidScheduleError, match=r"default end_step \(75% of 1 steps = 0\)"):
        PruningSchedule().resolved(1)
    with pytest.raises(InvalidScheduleError, match=r"call resolved\(total_steps\) first"):
        PruningSchedule().fraction(3)
