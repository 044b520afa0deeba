"""Schedule validation and the timestep grid (docs/design.md, "The scoring loop")."""

import pytest

from diffcls.errors import DiffclsError
from diffcls.runtime.algorithm.schedule import Schedule, default_schedule


def test_grid_of_the_paper_schedule():
    s = Schedule((50, 500), (5, 1))
    grid = s.grid(1000)
    assert len(grid) == 500 and grid[0] == 1 and grid[-1] == 999 and grid[1] - grid[0] == 2
    rounds = s.rounds(1000)
    first = [t for _, t in rounds[0]]
    assert first == list(range(11, 1000, 20))  # step 10 over the grid, starting at grid[5]
    assert len(rounds[1]) == 450  # 500 minus the 50 already evaluated
    ks = [k for r in rounds for k, _ in r]
    assert ks == list(range(500))  # evaluation order indexes the noise bank


def test_evals_per_image_for_cifar_schedule():
    assert Schedule((50, 500), (5, 1)).evals_upper_bound(10) == 10 * 50 + 5 * 450  # 2,750


@pytest.mark.parametrize(
    "schedule, n_prompts, message",
    [
        (Schedule((50, 500), (5,)), 10, "--n-samples has 2 rounds but --to-keep has 1"),
        (Schedule((50, 500), (5, 2)), 10, "must be 1"),
        (Schedule((10, 50, 500), (2, 5, 1)), 10, "non-increasing"),
        (Schedule((50, 500), (12, 1)), 10, "more than the 10 prompts"),
        (Schedule((500, 50), (5, 1)), 10, "non-decreasing"),
        (Schedule((50, 2000), (5, 1)), 10, "exceeds the model's 1000"),
        (Schedule((50, 500), (5, 1), n_trials=0), 10, "--n-trials"),
        (Schedule((50, 500), (5, 1), loss="l3"), 10, "unknown --loss"),
        (Schedule((0, 500), (5, 1)), 10, ">= 1"),
        (Schedule((), ()), 10, "empty"),
    ],
)
def test_impossible_schedules_are_refused(schedule, n_prompts, message):
    with pytest.raises(DiffclsError, match=message) as e:
        schedule.validate(n_prompts, 1000)
    assert "\n" not in str(e.value)


def test_default_schedule_caps_first_round_at_prompt_count():
    s = default_schedule(3)
    assert s.to_keep == (3, 1)
    s.validate(3)
    assert default_schedule(10).to_keep == (5, 1)
