"""The time/cost arithmetic of `tune` and `estimate`: flags, cost per 1,000 images, fleet plans and
the searches for the cheapest fleet within a deadline and the fastest within a budget."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.commands.tuning import cost
from pipeline.commands.tuning.cost import (
    FleetPlan,
    TypeOffer,
    cheapest_within,
    cost_per_1000,
    fastest_within,
    fleet_estimate,
    parse_counts,
    parse_duration,
    parse_prices,
    price_for,
)
from pipeline.core.errors import ConfigError

PRICES_FORM = (
    "(TYPE=PRICE per GPU-hour, comma-separated, e.g. A10G=1.01,H100=3.90, or a YAML file mapping types to prices)"
)


def _offers(*offers: TypeOffer) -> dict[str, TypeOffer]:
    return {offer.name: offer for offer in offers}


def _brute_force(
    offers: dict[str, TypeOffer], rows: int, *, deadline: float = math.inf, budget: float = math.inf
) -> FleetPlan | None:
    """Every mix through `fleet_estimate`: the cheapest within a deadline, or the fastest within a budget."""
    names = list(offers)
    plans = [
        fleet_estimate(offers, dict(zip(names, counts, strict=True)), rows)
        for counts in itertools.product(*(range(offer.available + 1) for offer in offers.values()))
        if any(counts)
    ]
    if deadline < math.inf:
        fitting = [plan for plan in plans if plan.seconds <= deadline]
        return min(fitting, key=lambda plan: (plan.cost or 0.0, plan.gpus, plan.seconds), default=None)
    fitting = [plan for plan in plans if (plan.cost or 0.0) <= budget]
    return min(fitting, key=lambda plan: (plan.seconds, plan.cost or 0.0), default=None)


# -- parsing -------------------------------------------------------------------------------------


def test_prices_inline_and_absent() -> None:
    assert parse_prices(None) == {} and parse_prices("") == {} and parse_prices("  ") == {}
    assert parse_prices("A10G=1.01, H100=3.90,") == {"A10G": 1.01, "H100": 3.9}
    assert parse_prices("L4=0") == {"L4": 0.0}


def test_prices_from_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("A10G: 1.01\nH100: 4\n", encoding="utf-8")
    assert parse_prices(str(path)) == {"A10G": 1.01, "H100": 4.0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("A10G:1", f"--prices: cannot read 'A10G:1' {PRICES_FORM}: there is no such file"),
        ("A10G=cheap", f"--prices: cannot read 'A10G=cheap' {PRICES_FORM}"),
        ("A10G=1,H100", f"--prices: cannot read 'H100' {PRICES_FORM}"),
        ("A10G=-1", "--prices: cannot read 'A10G=-1'"),
        ("A10G=nan", "--prices: cannot read 'A10G=nan'"),
        ("=1", "--prices: cannot read '=1'"),
        ("A10G=", "--prices: cannot read 'A10G='"),
        ("A10G=1,A10G=2", "--prices: 'A10G' is given twice"),
    ],
)
def test_prices_inline_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_prices(text)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- A10G\n- H100\n", "holds list, not a mapping of GPU types to prices per GPU-hour"),
        ("", "holds nothing, not a mapping"),
        ("A10G: cheap\n", "the price of 'A10G' is 'cheap'; write a number >= 0 per GPU-hour (e.g. `A10G: 1.01`)"),
        ("A10G: yes\n", "the price of 'A10G' is True"),
        ("A10G: -1.0\n", "the price of 'A10G' is -1.0"),
        ("A10G: [1\n", "cannot read the file"),
    ],
)
def test_price_file_errors_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^--prices: ") as error:
        parse_prices(str(path))
    assert str(path) in str(error.value) and message in str(error.value)


def test_price_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file") as error:
        parse_prices(str(tmp_path))  # a folder
    assert str(tmp_path) in str(error.value)


def test_price_for_a_type() -> None:
    prices = {"A10G": 1.01, "H100": 3.9}
    assert price_for(prices, "H100", 2.0) == 3.9
    assert price_for(prices, "h100", 2.0) == 3.9  # Ray's spelling or the user's
    assert price_for(prices, "L4", 2.0) == 2.0
    assert price_for(prices, "L4", None) is None
    assert price_for({}, "L4", None) is None


def test_counts() -> None:
    assert parse_counts("A10G=16, H100=8") == {"A10G": 16, "H100": 8}
    assert parse_counts("L4=0") == {"L4": 0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("A10G=1.5", "--fleet: cannot read 'A10G=1.5' (TYPE=COUNT of GPUs, comma-separated, e.g. A10G=16,H100=8)"),
        ("A10G=-1", "--fleet: cannot read 'A10G=-1'"),
        ("A10G", "--fleet: cannot read 'A10G'"),
        ("A10G=2,A10G=4", "--fleet: 'A10G' is given twice"),
        ("", "--fleet: no GPU types given"),
        (" , ", "--fleet: no GPU types given"),
    ],
)
def test_count_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_counts(text)
    assert str(error.value).startswith(message)


def test_count_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--available: cannot read 'H100=many'"):
        parse_counts("H100=many", flag="--available")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("45m", 2700.0),
        ("6h", 21600.0),
        ("1.5h", 5400.0),
        ("2d", 172800.0),
        (" 2 H ", 7200.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "soon",
            "--deadline: cannot read 'soon' (a duration such as 90s, 45m, 6h, 1.5h or 2d; a bare number is seconds)",
        ),
        ("5 weeks", "--deadline: cannot read '5 weeks'"),
        ("-5m", "--deadline: cannot read '-5m'"),
        ("0h", "--deadline: '0h' is no time at all; give a duration above zero"),
    ],
)
def test_duration_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_duration(text)
    assert str(error.value).startswith(message)
    with pytest.raises(ConfigError, match=r"^--max-wait: "):
        parse_duration(text, flag="--max-wait")


# -- cost per 1,000 images -------------------------------------------------------------------------


def test_cost_per_1000_steady_and_with_start_up() -> None:
    assert cost_per_1000(2.0, 3.6) == pytest.approx(0.5)
    with_startup = cost_per_1000(2.0, 3.6, startup_seconds=60, gpus=4, rows=36_000)
    assert with_startup == pytest.approx(0.5 + 3.6 / 3600 * 1000 * 4 * 60 / 36_000)
    assert cost_per_1000(2.0, 3.6, startup_seconds=60, gpus=4, rows=0) == pytest.approx(0.5)
    assert cost_per_1000(2.0, 3.6, startup_seconds=60, gpus=4) == pytest.approx(0.5)
    assert cost_per_1000(2.0, 0.0) == 0.0


def test_cost_per_1000_unknown() -> None:
    assert cost_per_1000(2.0, None) is None
    assert cost_per_1000(0.0, 3.6) is None
    assert cost_per_1000(-1.0, 3.6, rows=100) is None


# -- a fleet's time and cost -------------------------------------------------------------------------

FAST = TypeOffer("H100", images_per_second=2.0, startup_seconds=60.0, price=3.6, available=4)
SLOW = TypeOffer("L4", images_per_second=1.0, startup_seconds=120.0, price=1.8, available=8)


def test_fleet_estimate_by_hand() -> None:
    plan = fleet_estimate(_offers(FAST, SLOW), {"L4": 4, "H100": 2}, 36_000)
    assert plan.counts == {"H100": 2, "L4": 4} and list(plan.counts) == ["H100", "L4"]  # the offers' order
    assert plan.images_per_second == 8.0
    assert plan.seconds == pytest.approx(120 + 36_000 / 8)  # the slowest start-up, then together: 4620 s
    assert plan.gpu_hours == pytest.approx(6 * 4620 / 3600)
    assert plan.cost == pytest.approx((2 * 3.6 + 4 * 1.8) * 4620 / 3600)  # 18.48
    assert plan.lines() == [
        "fleet            2 x H100 + 4 x L4",
        "rows to render   36,000",
        "throughput       8 images/s",
        "time             77.0 min (start-up 2.0 min)",
        "GPU-hours        7.7",
        "cost             18.48 (0.5133 / 1,000 images)",
    ]


def test_fleet_estimate_lines_in_hours_and_large_figures() -> None:
    plan = fleet_estimate(_offers(FAST, SLOW), {"H100": 4, "L4": 8}, 1_000_000)
    assert plan.seconds == pytest.approx(120 + 1_000_000 / 16)
    assert "time             17.4 h (start-up 2.0 min)" in plan.lines()
    assert "throughput       16.0 images/s" in plan.lines()
    assert "GPU-hours        208.7" in plan.lines()


def test_fleet_estimate_without_a_price() -> None:
    offers = _offers(FAST, TypeOffer("L4", 1.0, 120.0, None, 8))
    plan = fleet_estimate(offers, {"H100": 1, "L4": 1}, 3600)
    assert plan.cost is None and plan.unpriced == ("L4",)
    assert plan.lines()[-1] == "cost             unknown: no price for L4 (--prices)"
    assert fleet_estimate(offers, {"H100": 1, "L4": 0}, 3600).cost is not None  # an unused type needs none


def test_fleet_estimate_of_nothing_to_render() -> None:
    plan = fleet_estimate(_offers(FAST, SLOW), {"H100": 1}, 0)
    assert plan.seconds == 0.0 and plan.cost == 0.0 and plan.gpu_hours == 0.0
    assert plan.lines() == [
        "fleet            1 x H100",
        "rows to render   0: nothing to render, so no time and no cost",
    ]


@pytest.mark.parametrize(
    ("counts", "rows", "message"),
    [
        ({"A100": 2}, 10, "the fleet names 'A100', a GPU type with no tuned figures; use the tuned types (H100, L4)"),
        ({"H100": 5}, 10, "the fleet asks for 5 x H100, but there are 4 H100 GPU(s) to use; ask for 0 to 4"),
        ({"H100": -1}, 10, "the fleet asks for -1 x H100"),
        ({"H100": 0, "L4": 0}, 10, "the fleet has no GPU: give at least one type a count above 0"),
        ({}, 10, "the fleet has no GPU"),
        ({"H100": 1}, -1, "cannot plan -1 rows"),
    ],
)
def test_fleet_estimate_errors(counts: dict[str, int], rows: int, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        fleet_estimate(_offers(FAST, SLOW), counts, rows)
    assert str(error.value).startswith(message)


def test_fleet_estimate_of_a_type_without_throughput() -> None:
    with pytest.raises(ConfigError, match="L4 has no measured throughput"):
        fleet_estimate(_offers(FAST, TypeOffer("L4", 0.0, 120.0, 1.8, 8)), {"L4": 1}, 10)


# -- the cheapest fleet within a deadline ----------------------------------------------------------

# Per image, the A10G costs 1.0 / 1.0 and the H100 6.0 / 4.0: the A10G is the cheap type.
A10G = TypeOffer("A10G", images_per_second=1.0, startup_seconds=60.0, price=1.0, available=6)
H100 = TypeOffer("H100", images_per_second=4.0, startup_seconds=60.0, price=6.0, available=3)
L4 = TypeOffer("L4", images_per_second=0.7, startup_seconds=300.0, price=0.6, available=5)


def test_deadline_takes_the_cheap_type_and_only_the_gpus_it_needs() -> None:
    plan = cheapest_within(_offers(H100, A10G), 36_000, 3 * 3600)
    # 60 s + 36,000 / n <= 10,800 s needs n >= 3.35: four A10G (9,060 s); a fifth would only pay its start-up.
    assert plan is not None and plan.counts == {"A10G": 4}
    assert plan.seconds == pytest.approx(9060) and plan.cost == pytest.approx(4 * 9060 / 3600)


def test_deadline_adds_the_expensive_type_when_the_cheap_one_runs_out() -> None:
    plan = cheapest_within(_offers(H100, A10G), 36_000, 3600)
    assert plan is not None and plan.seconds <= 3600
    assert plan == _brute_force(_offers(H100, A10G), 36_000, deadline=3600)
    assert set(plan.counts) == {"A10G", "H100"}


@pytest.mark.parametrize("deadline", [1800.0, 3600.0, 2 * 3600.0, 5 * 3600.0, 12 * 3600.0, 48 * 3600.0])
@pytest.mark.parametrize("rows", [5_000, 36_000, 200_000])
def test_deadline_matches_a_brute_force(deadline: float, rows: int) -> None:
    offers = _offers(H100, A10G, L4)
    expected = _brute_force(offers, rows, deadline=deadline)
    plan = cheapest_within(offers, rows, deadline)
    if expected is None:
        assert plan is None
    else:
        assert plan is not None and plan.counts == expected.counts
        assert plan.cost == pytest.approx(expected.cost)


def test_deadline_ties_go_to_fewer_gpus_then_the_faster() -> None:
    # Without start-up every mix costs the same per image; one GPU beats two, the faster one wins.
    slow = TypeOffer("A", images_per_second=1.0, startup_seconds=0.0, price=1.0, available=2)
    fast = TypeOffer("B", images_per_second=2.0, startup_seconds=0.0, price=2.0, available=1)
    plan = cheapest_within(_offers(slow, fast), 3600, 3600)
    assert plan is not None and plan.counts == {"B": 1} and plan.cost == pytest.approx(1.0)


def test_deadline_that_no_fleet_can_meet() -> None:
    assert cheapest_within(_offers(H100, A10G), 36_000, 59.0) is None  # shorter than the start-up
    assert cheapest_within(_offers(H100, A10G), 36_000, 1000.0) is None  # 18 images/s at most


def test_search_needs_a_price_for_every_usable_type() -> None:
    offers = _offers(A10G, TypeOffer("H100", 4.0, 60.0, None, 3))
    with pytest.raises(ConfigError, match=r"without a price for H100: pass --prices H100=PRICE \(per GPU-hour\)"):
        cheapest_within(offers, 1000, 3600)
    with pytest.raises(ConfigError, match="without a price for H100"):
        fastest_within(offers, 1000, 100.0)
    # A type with no GPU to use takes no part, priced or not.
    offers = _offers(A10G, TypeOffer("H100", 4.0, 60.0, None, 0))
    assert cheapest_within(offers, 1000, 3600) is not None


def test_search_without_a_usable_type() -> None:
    with pytest.raises(ConfigError, match="no GPU type to plan with"):
        cheapest_within(_offers(TypeOffer("A10G", 0.0, 60.0, 1.0, 4)), 1000, 3600)


def test_search_of_negative_rows() -> None:
    with pytest.raises(ConfigError, match="cannot plan -5 rows"):
        cheapest_within(_offers(H100, A10G), -5, 3600)
    with pytest.raises(ConfigError, match="cannot plan -5 rows"):
        fastest_within(_offers(H100, A10G), -5, 10.0)


def test_search_of_nothing_to_render() -> None:
    plan = cheapest_within(_offers(H100, A10G), 0, 3600)
    assert plan is not None and plan.counts == {"A10G": 1} and plan.cost == 0.0


# -- the fastest fleet within a budget -------------------------------------------------------------


@pytest.mark.parametrize("budget", [5.0, 10.0, 12.0, 15.0, 30.0, 100.0])
@pytest.mark.parametrize("rows", [5_000, 36_000])
def test_budget_matches_a_brute_force(budget: float, rows: int) -> None:
    offers = _offers(H100, A10G, L4)
    expected = _brute_force(offers, rows, budget=budget)
    plan = fastest_within(offers, rows, budget)
    if expected is None:
        assert plan is None
    else:
        assert plan is not None and plan.counts == expected.counts
        assert plan.cost is not None and plan.cost <= budget


def test_budget_takes_the_fastest_affordable_mix() -> None:
    plan = fastest_within(_offers(H100, A10G), 36_000, 12.0)
    # 6 A10G + 1 H100: 60 s + 36,000 / 10 = 3,660 s for 12 x 3,660 / 3,600 = 12.2: over. 5 A10G + 1 H100
    # (9 images/s) costs 11 x 4,060 / 3,600 = 12.41: over too; 6 A10G cost 6 x 6,060 / 3,600 = 10.1: within.
    assert plan is not None and plan.counts == {"A10G": 6}
    everything = fleet_estimate(_offers(H100, A10G), {"H100": 3, "A10G": 6}, 36_000)
    assert fastest_within(_offers(H100, A10G), 36_000, 1000.0) == everything


def test_budget_ties_go_to_the_cheaper() -> None:
    # The start-up dwarfs the rendering: either GPU alone fits the budget, the two together do not.
    cheap = TypeOffer("A", images_per_second=1.0, startup_seconds=3600.0, price=1.0, available=1)
    dear = TypeOffer("B", images_per_second=1.0, startup_seconds=3600.0, price=1.5, available=1)
    plan = fastest_within(_offers(dear, cheap), 36, 2.0)
    assert plan is not None and plan.counts == {"A": 1}


def test_budget_too_small() -> None:
    assert fastest_within(_offers(H100, A10G), 36_000, 1.0) is None


# -- the greedy search on large clusters -----------------------------------------------------------

BIG = _offers(
    TypeOffer("A10G", images_per_second=0.5, startup_seconds=90.0, price=1.01, available=200),
    TypeOffer("L4", images_per_second=0.4, startup_seconds=60.0, price=0.8, available=200),
    TypeOffer("H100", images_per_second=2.2, startup_seconds=150.0, price=3.9, available=200),
)


def _fewest(offer: TypeOffer, rows: int, deadline: float) -> int:
    return math.ceil(rows / (offer.images_per_second * (deadline - offer.startup_seconds)))


def test_greedy_deadline_on_a_large_cluster() -> None:
    rows, deadline = 1_000_000, 6 * 3600.0
    assert math.prod(offer.available + 1 for offer in BIG.values()) > cost.EXACT_SEARCH_LIMIT
    plan = cheapest_within(BIG, rows, deadline)
    assert plan is not None and plan.cost is not None and plan.seconds <= deadline
    alternatives = [
        {name: _fewest(offer, rows, deadline)} for name, offer in BIG.items()
    ] + [
        {"A10G": 40, "L4": 40, "H100": 15},
        {"L4": 100, "H100": 20},
        {"A10G": 200, "L4": 200, "H100": 200},
    ]  # fmt: skip
    for counts in alternatives:
        other = fleet_estimate(BIG, counts, rows)
        assert other.seconds <= deadline and other.cost is not None
        assert plan.cost <= other.cost * (1 + 1e-9), counts
    assert cheapest_within(BIG, rows, 100.0) is None


def test_greedy_budget_on_a_large_cluster() -> None:
    rows, budget = 1_000_000, 600.0
    plan = fastest_within(BIG, rows, budget)
    assert plan is not None and plan.cost is not None and plan.cost <= budget * (1 + 1e-9)
    for name in BIG:
        most = max(n for n in range(1, 201) if (fleet_estimate(BIG, {name: n}, rows).cost or 0.0) <= budget)
        assert plan.seconds <= fleet_estimate(BIG, {name: most}, rows).seconds
    assert plan.seconds <= fleet_estimate(BIG, {"L4": 100, "A10G": 50}, rows).seconds
    assert fastest_within(BIG, rows, 1.0) is None


# More GPUs than in the exact tests, so that the greedy search has room to go wrong.
MID = _offers(replace(H100, available=10), replace(A10G, available=20), replace(L4, available=15))


@pytest.mark.parametrize("deadline", [2 * 3600.0, 4 * 3600.0, 8 * 3600.0, 24 * 3600.0])
def test_greedy_deadline_is_close_to_exact(monkeypatch: pytest.MonkeyPatch, deadline: float) -> None:
    exact = cheapest_within(MID, 300_000, deadline)
    monkeypatch.setattr(cost, "EXACT_SEARCH_LIMIT", 0)
    greedy = cheapest_within(MID, 300_000, deadline)
    assert exact is not None and greedy is not None and exact.cost is not None and greedy.cost is not None
    assert greedy.seconds <= deadline and greedy.cost <= exact.cost * 1.02


@pytest.mark.parametrize("budget", [75.0, 80.0, 100.0, 150.0])
def test_greedy_budget_is_close_to_exact(monkeypatch: pytest.MonkeyPatch, budget: float) -> None:
    exact = fastest_within(MID, 300_000, budget)
    monkeypatch.setattr(cost, "EXACT_SEARCH_LIMIT", 0)
    greedy = fastest_within(MID, 300_000, budget)
    assert exact is not None and greedy is not None and greedy.cost is not None
    assert greedy.cost <= budget and greedy.seconds <= exact.seconds * 1.02
