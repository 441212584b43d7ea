"""Known-answer tests of the Shapley / Banzhaf / LIME estimators on cheap table games.

A table game stores ``v_e(S)`` for every example ``e`` and coalition ``S`` (indexed by the bitmask of ``S``), so the
exact answers can be computed by brute-force Python loops and every game evaluation can be counted. The input
``x`` of a table game is simply the vector of example indices, so ``x = torch.zeros(n)`` is ``n`` independent draws
of one example's estimate in a single batched call.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lightning_attr.estimators import (
    ESTIMATORS,
    MAX_EXACT_PLAYERS,
    banzhaf,
    exact_banzhaf,
    exact_lime,
    exact_shapley,
    exact_values,
    get_estimator,
    kernel_shap,
    lime,
    permutation_shapley,
    unbiased_kernel_shap,
)

SAMPLING = ["permutation_shapley", "kernel_shap", "unbiased_kernel_shap", "banzhaf", "lime"]
EXACT = ["exact_shapley", "exact_banzhaf", "exact_lime"]
MINIMUM = {"permutation_shapley": 1, "kernel_shap": 4, "unbiased_kernel_shap": 4, "banzhaf": 2, "lime": 2}
LIME_WIDTH = 0.5  # the default kernel width: kernel exp(-(1 - sqrt(|S|/d))^2 / 0.25)


class TableGame:
    """``v_e(S) = table[e, bitmask(S)]``: one row of ``2^d`` coalition values (K outputs each) per example ``e``."""

    def __init__(self, table: torch.Tensor) -> None:
        n, m, _ = table.shape
        self.num_players = int(round(math.log2(m)))
        assert 2**self.num_players == m
        self.table = table
        self.num_evaluations = 0
        self.num_calls = 0

    @classmethod
    def from_function(cls, fn, d: int, num_examples: int = 1, k: int = 1) -> TableGame:
        """Tabulate ``fn(e, S) -> k values`` (``S`` a frozenset of players) over all coalitions."""
        table = torch.zeros(num_examples, 2**d, k)
        for e in range(num_examples):
            for code in range(2**d):
                table[e, code] = torch.as_tensor(fn(e, members(code, d)), dtype=torch.float32)
        return cls(table)

    @classmethod
    def random(cls, d: int, num_examples: int = 2, k: int = 2, seed: int = 0) -> TableGame:
        gen = torch.Generator().manual_seed(seed)
        return cls(torch.randn(num_examples, 2**d, k, generator=gen))

    def __call__(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        d = self.num_players
        assert masks.dtype == torch.bool, masks.dtype
        assert masks.dim() == 3 and masks.shape[0] == x.shape[0] and masks.shape[2] == d, tuple(masks.shape)
        self.num_evaluations += masks.shape[0] * masks.shape[1]
        self.num_calls += 1
        codes = (masks.long() << torch.arange(d)).sum(-1)  # (B, M)
        rows = self.table[x.long()]  # (B, 2^d, K)
        return rows[torch.arange(x.shape[0]).unsqueeze(1), codes]

    def v(self, e: int, players) -> np.ndarray:
        code = sum(1 << i for i in players)
        return self.table[e, code].double().numpy()


def members(code: int, d: int) -> frozenset:
    return frozenset(i for i in range(d) if code >> i & 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def examples(game: TableGame) -> torch.Tensor:
    return torch.arange(game.table.shape[0])


# ------------------------------------------------------------------------------------------------ brute force


def brute_shapley_subsets(game: TableGame, e: int) -> np.ndarray:
    """phi_i = sum_{S not containing i} |S|! (d-|S|-1)! / d! (v(S+i) - v(S))."""
    d = game.num_players
    phi = np.zeros((d, game.table.shape[-1]))
    for i in range(d):
        others = [j for j in range(d) if j != i]
        for size in range(d):
            w = math.factorial(size) * math.factorial(d - size - 1) / math.factorial(d)
            for s in itertools.combinations(others, size):
                phi[i] += w * (game.v(e, s + (i,)) - game.v(e, s))
    return phi


def brute_shapley_permutations(game: TableGame, e: int) -> np.ndarray:
    """phi_i = mean over all d! orderings of i's marginal contribution to the players before it."""
    d = game.num_players
    phi = np.zeros((d, game.table.shape[-1]))
    perms = list(itertools.permutations(range(d)))
    for perm in perms:
        for pos, i in enumerate(perm):
            phi[i] += game.v(e, perm[: pos + 1]) - game.v(e, perm[:pos])
    return phi / len(perms)


def brute_banzhaf(game: TableGame, e: int) -> np.ndarray:
    """phi_i = 2^-(d-1) sum_{S not containing i} (v(S+i) - v(S))."""
    d = game.num_players
    phi = np.zeros((d, game.table.shape[-1]))
    for i in range(d):
        others = [j for j in range(d) if j != i]
        for size in range(d):
            for s in itertools.combinations(others, size):
                phi[i] += game.v(e, s + (i,)) - game.v(e, s)
    return phi / 2 ** (d - 1)


def numpy_lime(game: TableGame, e: int, width: float = LIME_WIDTH) -> np.ndarray:
    """Weighted least squares with intercept over all 2^d coalitions, solved by numpy's lstsq."""
    d = game.num_players
    z = np.array([[code >> i & 1 for i in range(d)] for code in range(2**d)], dtype=np.float64)
    w = np.exp(-((1 - np.sqrt(z.sum(1) / d)) ** 2) / width**2)
    design = np.hstack([np.ones((2**d, 1)), z])
    y = game.table[e].double().numpy()
    coef, *_ = np.linalg.lstsq(design * np.sqrt(w)[:, None], y * np.sqrt(w)[:, None], rcond=None)
    return coef[1:]


def additive_game(d: int = 5, num_examples: int = 2, k: int = 2, seed: int = 0) -> tuple[TableGame, torch.Tensor]:
    a = torch.randn(num_examples, d, k, generator=gen(seed))
    return TableGame.from_function(lambda e, s: a[e, list(s)].sum(0), d, num_examples, k), a


def unanimity_game(d: int, coalition: tuple[int, ...]) -> TableGame:
    return TableGame.from_function(lambda e, s: [float(set(coalition) <= s)], d)


# ------------------------------------------------------------------------------------------------ exact vs loops


@pytest.mark.parametrize("d", [1, 3, 5])
def test_exact_shapley_equals_brute_force_subset_formula(d):
    game = TableGame.random(d, num_examples=3, k=2)
    out = exact_shapley(game, examples(game))
    assert out.shape == (3, d, 2)
    for e in range(3):
        np.testing.assert_allclose(out[e].numpy(), brute_shapley_subsets(game, e), atol=1e-5)


def test_exact_shapley_equals_mean_over_all_permutations():
    game = TableGame.random(4, num_examples=2, k=3, seed=1)
    out = exact_shapley(game, examples(game))
    for e in range(2):
        np.testing.assert_allclose(out[e].numpy(), brute_shapley_permutations(game, e), atol=1e-5)


@pytest.mark.parametrize("d", [1, 3, 5])
def test_exact_banzhaf_equals_brute_force(d):
    game = TableGame.random(d, num_examples=3, k=2, seed=2)
    out = exact_banzhaf(game, examples(game))
    assert out.shape == (3, d, 2)
    for e in range(3):
        np.testing.assert_allclose(out[e].numpy(), brute_banzhaf(game, e), atol=1e-5)


@pytest.mark.parametrize("d", [2, 4, 5])
def test_exact_lime_equals_numpy_weighted_least_squares(d):
    game = TableGame.random(d, num_examples=3, k=2, seed=3)
    out = exact_lime(game, examples(game))
    assert out.shape == (3, d, 2)
    for e in range(3):
        np.testing.assert_allclose(out[e].numpy(), numpy_lime(game, e), atol=1e-4)


def test_exact_values_one_enumeration_matches_individual_estimators():
    game = TableGame.random(5, num_examples=2, k=2, seed=4)
    x = examples(game)
    both = exact_values(game, x, ("shapley", "banzhaf", "lime"))
    assert game.num_evaluations == 2 * 2**5  # one enumeration for all three kinds
    torch.testing.assert_close(both["shapley"], exact_shapley(game, x))
    torch.testing.assert_close(both["banzhaf"], exact_banzhaf(game, x))
    torch.testing.assert_close(both["lime"], exact_lime(game, x))
    # small enumeration blocks give the same answer
    blocked = exact_values(game, x, ("shapley", "banzhaf", "lime"), block=3)
    for kind in both:
        torch.testing.assert_close(blocked[kind], both[kind], atol=1e-6, rtol=1e-5)


def test_exact_lime_kernel_width_matches_numpy():
    game = TableGame.random(4, num_examples=1, k=1, seed=5)
    out = exact_values(game, examples(game), ("lime",), kernel_width=1.5)["lime"]
    np.testing.assert_allclose(out[0].numpy(), numpy_lime(game, 0, width=1.5), atol=1e-4)


# ------------------------------------------------------------------------------------------------ known games


EXACT_ON_ADDITIVE = EXACT + ["permutation_shapley", "kernel_shap", "lime"]


@pytest.mark.parametrize("name", EXACT_ON_ADDITIVE)
def test_additive_game_recovered_exactly(name):
    """v(S) = sum_{i in S} a_i: the exact values, permutation sampling, KernelSHAP and LIME all return a_i.

    (Unbiased KernelSHAP and MSR Banzhaf are *not* exact per draw on additive games: their sampled ``b`` is not
    ``A a``; see test_additive_game_unbiased_estimators_exact_in_mean.) LIME's ridge (1e-3 on the summed normal
    equations) is negligible at 4096 samples.
    """
    game, a = additive_game()
    budget = 4096 if name == "lime" else 64
    out = get_estimator(name)(game, examples(game), budget, generator=gen(0))
    torch.testing.assert_close(out, a, atol=1e-4 if name == "lime" else 1e-5, rtol=0)


@pytest.mark.parametrize("name", ["unbiased_kernel_shap", "banzhaf"])
def test_additive_game_unbiased_estimators_exact_in_mean(name):
    """On v(S) = sum_{i in S} a_i the per-draw noise of unbiased KernelSHAP / MSR Banzhaf averages out to a_i.

    Tolerance: |mean of 2000 draws - a_i| <= 4 standard errors + 1e-6 for every entry (fixed seed).
    """
    game, a = additive_game(num_examples=1)
    draws = 2000
    out = get_estimator(name)(game, torch.zeros(draws), 8, generator=gen(0)).double()
    mean, se = out.mean(0), out.std(0) / math.sqrt(draws)
    assert ((mean - a[0].double()).abs() <= 4 * se + 1e-6).all()


@pytest.mark.parametrize("name", EXACT + SAMPLING)
def test_constant_game_gives_zero(name):
    """A constant game has no marginal contributions: every estimator returns 0 on every draw."""
    game = TableGame(torch.full((2, 2**4, 2), 0.3))
    out = get_estimator(name)(game, examples(game), 16, generator=gen(0))
    torch.testing.assert_close(out, torch.zeros(2, 4, 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("coalition", [(0,), (1, 3), (0, 2, 4), (0, 1, 2, 3, 4)])
def test_unanimity_game(coalition):
    """v(S) = 1 iff T is a subset of S: Shapley = 1/|T| and Banzhaf = 1/2^(|T|-1) on T, 0 elsewhere."""
    d = 5
    game = unanimity_game(d, coalition)
    x = examples(game)
    in_t = torch.zeros(1, d, 1)
    in_t[0, list(coalition)] = 1.0
    torch.testing.assert_close(exact_shapley(game, x), in_t / len(coalition))
    torch.testing.assert_close(exact_banzhaf(game, x), in_t / 2 ** (len(coalition) - 1))


def test_null_player_gets_zero_per_draw():
    """Player 2 never changes v: exact values give it 0 and every permutation-sampling draw gives it exactly 0."""
    d = 4
    base = torch.randn(1, 2**d, 2, generator=gen(6))
    codes = torch.arange(2**d)
    table = base[:, codes & ~(1 << 2)]  # v(S) = v(S without player 2)
    game = TableGame(table)
    x = torch.zeros(50)
    for est in (exact_shapley, exact_banzhaf):
        torch.testing.assert_close(est(game, x[:1])[:, 2], torch.zeros(1, 2), atol=1e-6, rtol=0)
    out = permutation_shapley(game, x, 10, generator=gen(0))
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))


# ------------------------------------------------------------------------------------------------ efficiency


@pytest.mark.parametrize("name", ["exact_shapley", "permutation_shapley", "kernel_shap", "unbiased_kernel_shap"])
@pytest.mark.parametrize("budget", [4, 10, 33])
def test_efficiency_on_every_draw(name, budget):
    """sum_i phi_i = v(all) - v(empty) for each of 200 independent draws (float tolerance)."""
    d = 5
    game = TableGame.random(d, num_examples=2, k=3, seed=7)
    x = torch.arange(2).repeat(100)
    out = get_estimator(name)(game, x, budget, generator=gen(budget))
    total = game.table[x, 2**d - 1] - game.table[x, 0]
    torch.testing.assert_close(out.sum(1), total, atol=2e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ unbiasedness


UNBIASED = [("permutation_shapley", 10), ("unbiased_kernel_shap", 6), ("banzhaf", 4)]


@pytest.mark.parametrize("name,budget", UNBIASED)
def test_unbiased_estimators_are_unbiased(name, budget):
    """Mean of 2000 independent draws at a tiny budget is within 4 standard errors of the exact value.

    Tolerance: for every (example, player, class) entry, |mean - exact| <= 4 * s / sqrt(2000) + 1e-6, with s the
    sample standard deviation of the 2000 draws (fixed seed, so the test is deterministic; under the null the chance
    that any of the 20 entries leaves the band is ~1e-3).
    """
    est = get_estimator(name)
    assert est.unbiased
    d, draws = 5, 2000
    game = TableGame.random(d, num_examples=2, k=2, seed=8)
    exact = {"shapley": exact_shapley, "banzhaf": exact_banzhaf}[est.target](game, examples(game)).double()
    x = torch.arange(2).repeat_interleave(draws)  # one batched call = 2000 independent draws per example
    out = est(game, x, budget, generator=gen(123)).double().view(2, draws, d, 2)
    mean, se = out.mean(1), out.std(1) / math.sqrt(draws)
    assert (se > 0).all()  # the budget is small enough that the draws really are noisy
    assert ((mean - exact).abs() <= 4 * se + 1e-6).all(), ((mean - exact).abs() / se).max()


def test_unbiasedness_check_has_power():
    """The same 4-standard-error check rejects biased KernelSHAP at a tiny budget (so the check is meaningful)."""
    d, draws = 5, 2000
    game = TableGame.random(d, num_examples=2, k=2, seed=8)
    exact = exact_shapley(game, examples(game)).double()
    x = torch.arange(2).repeat_interleave(draws)
    out = kernel_shap(game, x, 6, generator=gen(123)).double().view(2, draws, d, 2)
    mean, se = out.mean(1), out.std(1) / math.sqrt(draws)
    assert ((mean - exact).abs() > 4 * se + 1e-6).any()


class RecordingGame(TableGame):
    """A table game that keeps every mask it is asked to evaluate."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__(table)
        self.masks: list[torch.Tensor] = []

    def __call__(self, x, masks):
        self.masks.append(masks.clone())
        return super().__call__(x, masks)


def brute_shapley_kernel(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Size distribution p(s), s = 1..d-1, and A = E[z z^T] under the Shapley kernel, by enumerating all subsets.

    Subset weight: (d - 1) / (C(d, |S|) |S| (d - |S|)) for 0 < |S| < d, normalized.
    """
    p = torch.zeros(d - 1, dtype=torch.float64)
    gram = torch.zeros(d, d, dtype=torch.float64)
    for code in range(1, 2**d - 1):
        z = torch.tensor([code >> i & 1 for i in range(d)], dtype=torch.float64)
        s = int(z.sum())
        w = (d - 1) / (math.comb(d, s) * s * (d - s))
        p[s - 1] += w
        gram += w * torch.outer(z, z)
    return p / p.sum(), gram / p.sum()


@pytest.mark.parametrize("d", [2, 3, 6])
def test_shapley_kernel_closed_form(d):
    from lightning_attr.estimators.kernel import shapley_kernel_gram, shapley_kernel_sizes

    p, gram = brute_shapley_kernel(d)
    torch.testing.assert_close(shapley_kernel_sizes(d), p)
    torch.testing.assert_close(shapley_kernel_gram(d), gram)


@pytest.mark.parametrize("name", ["kernel_shap", "unbiased_kernel_shap"])
def test_kernel_samples_follow_shapley_kernel(name):
    """The sampled coalitions come from the Shapley kernel, each paired with its complement.

    With 100,000 pairs: the frequency of every size and every entry of the empirical E[z z^T] is within 4 binomial
    standard errors of the brute-force Shapley kernel (fixed seed).
    """
    d, pairs = 6, 100_000
    game = RecordingGame(torch.zeros(1, 2**d, 1))
    get_estimator(name)(game, torch.zeros(1), 2 + 2 * pairs, generator=gen(0))
    z = torch.cat([m for m in game.masks if not (m.all(-1) | (~m).all(-1)).all()], 1)[0]  # drop the endpoints
    assert z.shape == (2 * pairs, d)
    assert torch.equal(z[1::2], ~z[0::2])  # paired sampling
    p, gram = brute_shapley_kernel(d)
    n = z.shape[0] // 2  # count one coalition per pair, so the rows are independent
    freq = torch.bincount(z[0::2].sum(-1), minlength=d + 1)[1:d].double() / n
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt()).all(), (freq, p)
    zf = z[0::2].double()
    emp = zf.T @ zf / n
    assert ((emp - gram).abs() <= 4 * (gram * (1 - gram) / n).sqrt()).all(), (emp - gram)


# ------------------------------------------------------------------------------------------------ consistency


@pytest.mark.parametrize(
    "name,exact,small,large",
    [("kernel_shap", exact_shapley, 8, 1024), ("lime", exact_lime, 16, 2048)],
)
def test_biased_estimators_converge(name, exact, small, large):
    """Mean absolute error to the exact target over 100 draws shrinks > 6x from the small to the large budget.

    (Observed ~13x: the error decays like 1/sqrt(budget), and 128x more budget predicts ~11x.)
    """
    d = 5
    game = TableGame.random(d, num_examples=1, k=2, seed=9)
    truth = exact(game, examples(game))
    x = torch.zeros(100)
    est = get_estimator(name)
    assert not est.unbiased
    err_small = (est(game, x, small, generator=gen(0)) - truth).abs().mean()
    out = est(game, x, large, generator=gen(1))
    err_large = (out - truth).abs().mean()
    assert err_large < err_small / 6, (err_small, err_large)
    # ... and it converges to the right target: at the large budget the remaining bias is small
    # (|mean of the 100 draws - exact| <= 4 standard errors + 0.01 for every entry).
    mean, se = out.mean(0), out.std(0) / 10
    assert ((mean - truth[0]).abs() <= 4 * se + 0.01).all(), ((mean - truth[0]).abs() - 4 * se).max()


# ------------------------------------------------------------------------------------------------ budgets


@pytest.mark.parametrize("name", SAMPLING)
@pytest.mark.parametrize("d", [2, 5])
def test_budget_respected(name, d):
    """Evaluations per example stay within one natural unit of ``num_samples``.

    permutation: ``2 + 2 (d-1) * pairs`` (an antithetic pair costs 2 (d-1), endpoints 2); kernel: ``2 + 2 * pairs``;
    banzhaf: complement pairs; lime: exactly ``num_samples``.
    """
    game = TableGame.random(d, num_examples=3, k=1)
    est = get_estimator(name)
    for n in sorted({MINIMUM[name], 5, 10, 17, 50, 101}):
        game.num_evaluations = 0
        est(game, examples(game), n, generator=gen(n))
        assert game.num_evaluations % 3 == 0
        used = game.num_evaluations // 3
        if name == "permutation_shapley":
            unit = 2 * (d - 1)
            assert (used - 2) % unit == 0 and used >= 2 + unit, (n, used)
            assert used <= max(n, 2) + unit and used >= n - unit, (n, used)
        elif name in ("kernel_shap", "unbiased_kernel_shap"):
            assert used % 2 == 0 and n - 2 < used <= n, (n, used)
        elif name == "banzhaf":
            assert used % 2 == 0 and n - 2 < used <= n, (n, used)
        else:
            assert used == n, (n, used)


@pytest.mark.parametrize("name", EXACT)
def test_exact_budget_is_all_coalitions(name):
    game = TableGame.random(4, num_examples=3, k=1)
    get_estimator(name)(game, examples(game), None)
    assert game.num_evaluations == 3 * 2**4


# ------------------------------------------------------------------------------------------------ batching, seeds


@pytest.mark.parametrize("name", EXACT)
def test_exact_batched_equals_per_example(name):
    game = TableGame.random(5, num_examples=4, k=2, seed=10)
    est = get_estimator(name)
    batched = est(game, examples(game))
    single = torch.cat([est(game, torch.tensor([e])) for e in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", SAMPLING)
def test_seeded_generator_reproducible(name):
    game = TableGame.random(5, num_examples=3, k=2, seed=11)
    est = get_estimator(name)
    x = examples(game)
    first = est(game, x, 20, generator=gen(5))
    again = est(game, x, 20, generator=gen(5))
    other = est(game, x, 20, generator=gen(6))
    assert first.shape == (3, 5, 2) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    torch.manual_seed(0)
    a = est(game, x, 20)
    torch.manual_seed(0)
    assert torch.equal(a, est(game, x, 20))  # generator=None uses the global RNG


@pytest.mark.parametrize("name", SAMPLING)
def test_sampling_rows_are_independent_draws(name):
    """Copies of one example in a batch get different draws (a batch of copies is a sample of estimates)."""
    game = TableGame.random(5, num_examples=1, k=1, seed=12)
    out = get_estimator(name)(game, torch.zeros(2), 10, generator=gen(0))
    assert not torch.equal(out[0], out[1])


def test_registry_metadata():
    expected = {
        "exact_shapley": ("shapley", True),
        "exact_banzhaf": ("banzhaf", True),
        "exact_lime": ("lime", True),
        "permutation_shapley": ("shapley", True),
        "kernel_shap": ("shapley", False),
        "unbiased_kernel_shap": ("shapley", True),
        "banzhaf": ("banzhaf", True),
        "lime": ("lime", False),
    }
    assert set(ESTIMATORS) == set(expected)
    for name, (target, unbiased) in expected.items():
        est = get_estimator(name)
        assert est.name == name and est.target == target and est.unbiased is unbiased
    assert get_estimator("lime") is lime and get_estimator("banzhaf") is banzhaf
    assert get_estimator("kernel_shap") is kernel_shap and get_estimator("unbiased_kernel_shap") is unbiased_kernel_shap


# ------------------------------------------------------------------------------------------------ bad input


class TooManyPlayers:
    num_players = MAX_EXACT_PLAYERS + 1

    def __call__(self, x, masks):
        raise AssertionError("exact enumeration must refuse before evaluating the game")


@pytest.mark.parametrize("name", EXACT)
def test_exact_refuses_too_many_players_before_evaluating(name):
    with pytest.raises(ValueError, match="num_players.*21"):
        get_estimator(name)(TooManyPlayers(), torch.zeros(1))


def test_unknown_estimator_name():
    with pytest.raises(ValueError, match=r"`name`.*'nope'.*allowed") as info:
        get_estimator("nope")
    assert "kernel_shap" in str(info.value)


@pytest.mark.parametrize("name", SAMPLING)
def test_num_samples_below_minimum(name):
    game = TableGame.random(4, num_examples=1, k=1)
    est = get_estimator(name)
    with pytest.raises(ValueError, match=rf"`num_samples` must be an integer >= {MINIMUM[name]}"):
        est(game, torch.zeros(1), MINIMUM[name] - 1)
    for bad in (10.5, 10.0, True, "10"):  # only integers are budgets (10.0 used to crash later with a TypeError)
        with pytest.raises(ValueError, match="`num_samples`"):
            est(game, torch.zeros(1), bad)
    assert game.num_evaluations == 0  # refused before evaluating anything
    est(game, torch.zeros(1), MINIMUM[name])  # the minimum itself is allowed
    est(game, torch.zeros(1), np.int64(10))  # and numpy integers
    assert game.num_evaluations > 0


@pytest.mark.parametrize("name", ["kernel_shap", "unbiased_kernel_shap"])
def test_kernel_shap_needs_two_players(name):
    with pytest.raises(ValueError, match="`game.num_players` >= 2"):
        get_estimator(name)(TableGame.random(1, num_examples=1, k=1), torch.zeros(1), 8)


@pytest.mark.parametrize("name", ["exact_shapley", "exact_banzhaf", "exact_lime", "permutation_shapley", "banzhaf"])
def test_single_player_gets_everything(name):
    """With d = 1 every attribution is v({0}) - v(empty) (MSR Banzhaf: pairs {0}, {} make it exact per draw)."""
    game = TableGame.random(1, num_examples=3, k=2, seed=13)
    out = get_estimator(name)(game, examples(game), 4, generator=gen(0))
    torch.testing.assert_close(out[:, 0], game.table[:, 1] - game.table[:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", EXACT + SAMPLING)
def test_bad_x(name):
    game = TableGame.random(4, num_examples=1, k=1)
    for bad in (torch.tensor(0.0), torch.zeros(0), [0.0]):
        with pytest.raises(ValueError, match="`x`"):
            get_estimator(name)(game, bad, 16)


def test_exact_values_unknown_kind():
    game = TableGame.random(3, num_examples=1, k=1)
    with pytest.raises(ValueError, match="`kinds`.*'owen'"):
        exact_values(game, torch.zeros(1), ("shapley", "owen"))


def test_lime_bad_kernel_width():
    game = TableGame.random(3, num_examples=1, k=1)
    with pytest.raises(ValueError, match="`kernel_width`"):
        lime(game, torch.zeros(1), 8, kernel_width=0.0)
