"""Known answers of the equal-error and break-even arithmetic that the demo and the benchmarks report."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_attr.evaluation import break_even, equal_error_budget


def curve(c: float = 0.05, budgets=(32, 64, 128, 256)) -> list[dict]:
    """A Monte-Carlo curve MSE = c / budget (exact in log-log coordinates)."""
    return [{"evals_per_example": b, "mse": c / b} for b in budgets]


@pytest.mark.parametrize("target", [0.05 / 40, 0.05 / 100, 0.05 / 256])
def test_equal_error_budget_interpolates_a_one_over_budget_curve(target):
    assert equal_error_budget(curve(), target) == pytest.approx(0.05 / target, rel=1e-9)


@pytest.mark.parametrize("target", [0.05 / 1000, 0.05 / 10])
def test_equal_error_budget_extrapolates_beyond_the_rows(target):
    assert equal_error_budget(curve(), target) == pytest.approx(0.05 / target, rel=1e-9)


def test_equal_error_budget_needs_two_rows():
    assert math.isnan(equal_error_budget(curve(budgets=(32,)), 1e-3))


def test_break_even_is_fixed_cost_over_the_saving_per_example():
    assert break_even(100_000, 162, 2) == pytest.approx(625.0)
    n = break_even(50_000, 80, 5)
    assert 50_000 + n * 5 == pytest.approx(n * 80)  # equal totals at the break-even count
    assert break_even(100, 2, 2) == math.inf and break_even(100, 1, 3) == math.inf


def test_inference_seconds_explains_the_requested_number_of_images_per_repeat():
    from lightning_attr.evaluation import inference_seconds

    seen = []
    seconds = inference_seconds(lambda b: seen.append(len(b)) or b, torch.zeros(10, 1, 2, 2), images=25, batch_size=8,
                                repeats=2)
    assert seen == [8] + [8, 8, 8, 1] * 2 and seconds > 0


class RowCounter(torch.nn.Module):
    """A linear classifier on flattened images that counts the rows (game evaluations) it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.rows = torch.nn.Linear(3 * 4 * 4, 3), 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("estimator, budget", [("permutation_shapley", 32), ("unbiased_kernel_shap", 40)])
def test_evaluations_per_example_are_the_rows_the_model_sees(estimator, budget):
    from lightning_attr.evaluation import evaluations_per_example
    from lightning_attr.games import PatchGame

    model = RowCounter()
    game = PatchGame(model, 2, (4, 4))
    assert evaluations_per_example(game, torch.randn(5, 3, 4, 4), estimator, budget) == model.rows > 0


def test_oracle_rate_counts_a_warm_up_and_the_repeats():
    from lightning_attr.evaluation import evaluations_per_example, oracle_rate
    from lightning_attr.games import PatchGame

    game, x = PatchGame(RowCounter(), 2, (4, 4)), torch.randn(3, 3, 4, 4)
    per = evaluations_per_example(game, x, "permutation_shapley", 64)
    before = game.num_evaluations
    assert oracle_rate(game, x, 64, repeats=2) > 0
    assert game.num_evaluations - before == 3 * 3 * per
