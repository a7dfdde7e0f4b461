"""Time and cost of a job on a fleet of GPU types: the arithmetic of `tune` and `estimate`.

The model is deliberately simple, so that a user can redo it by hand. Every GPU of a fleet starts
at once: each loads the model and warms up (its type's `startup_seconds`), and the fleet renders
only once the slowest type has started; from then on the GPUs render together at the sum of their
steady rates. So a job of `rows` images takes

    seconds = max(start-up of the used types) + rows / sum(count * images_per_second)

and, since every GPU is paid for the whole wall time,

    cost = sum(count * price per GPU-hour) * seconds / 3600.

Adding GPUs shortens the rendering, but each added GPU pays the start-up once more, and a type
with a slow start-up delays the whole fleet. So the cheapest fleet for a deadline holds only the
GPUs that save more than their start-up costs, and does not always use the type that is cheapest
per image; the searches below weigh exactly this.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml

from pipeline.core.errors import ConfigError

# Above this many mixes (the product of `available + 1` over the types) the search is greedy.
EXACT_SEARCH_LIMIT = 200_000
# Above this many GPU types the greedy search tries only the cheapest-per-image prefixes of types.
SUBSET_SEARCH_TYPES = 10
_PRICES_FORM = (
    "TYPE=PRICE per GPU-hour, comma-separated, e.g. A10G=1.01,H100=3.90, or a YAML file mapping types to prices"
)
_COUNTS_FORM = "TYPE=COUNT of GPUs, comma-separated, e.g. A10G=16,H100=8"
_DURATION_FORM = "a duration such as 90s, 45m, 6h, 1.5h or 2d; a bare number is seconds"
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TOLERANCE = 1e-9  # relative: a plan that misses a deadline or budget by float rounding still meets it
_PASSES = 20  # at most, of a greedy search's rounds over the types (each round must improve the mix)

_Value = TypeVar("_Value")
Key = tuple[float, ...]  # the order of mixes in a search: lowest first
KeyOf = Callable[[float, float, int], Key]  # (seconds, cost, GPUs) -> Key


def parse_prices(text: str | None) -> dict[str, float]:
    """Prices per GPU-hour by GPU type, from `--prices`.

    A mixed cluster's types cost different amounts, so one `--gpu-hour-price` cannot price it.
    The prices come inline (`A10G=1.01,H100=3.90`) or, for a list kept with the configs, as a
    YAML file mapping types to prices; a text with `=` is the inline form, anything else a path.

    Raises:
        ConfigError: an item or the file cannot be read, or a price is not a number >= 0.
    """
    if not text or not text.strip():
        return {}
    if "=" in text:
        return _parse_pairs(text, "--prices", _PRICES_FORM, _read_price)
    return _read_price_file(text.strip())


def _read_price(text: str) -> float:
    price = float(text)
    if not math.isfinite(price) or price < 0:
        raise ValueError(text)
    return price


def _read_count(text: str) -> int:
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def _parse_pairs(text: str, flag: str, form: str, convert: Callable[[str], _Value]) -> dict[str, _Value]:
    """`TYPE=VALUE,...` as a dict; each type once, so that a typo cannot silently win over a value."""
    values: dict[str, _Value] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, value = (part.strip() for part in item.partition("="))
        try:
            if not name or not value:
                raise ValueError(item)
            converted = convert(value)
        except ValueError:
            raise ConfigError(f"{flag}: cannot read {item!r} ({form})") from None
        if name in values:
            raise ConfigError(f"{flag}: {name!r} is given twice (give each GPU type once: {form})")
        values[name] = converted
    if not values:
        raise ConfigError(f"{flag}: no GPU types given ({form})")
    return values


def _read_price_file(path: str) -> dict[str, float]:
    """A YAML file `{type: price}`; every error names the file, since the flag's text is only its path."""
    file = Path(path).expanduser()
    if not file.exists():
        raise ConfigError(f"--prices: cannot read {path!r} ({_PRICES_FORM}): there is no such file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"--prices: cannot read the file {path}: {error}") from None
    if not isinstance(data, dict) or not data:
        shown = "nothing" if data is None else type(data).__name__
        raise ConfigError(
            f"--prices: the file {path} holds {shown}, not a mapping of GPU types to prices per GPU-hour "
            "(one `TYPE: PRICE` a line, e.g. `A10G: 1.01`)"
        )
    prices: dict[str, float] = {}
    for name, value in data.items():
        # bool is an int to Python, but `A10G: yes` is a mistake, not a price of 1.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ConfigError(
                f"--prices: in the file {path}, the price of {str(name)!r} is {value!r}; "
                f"write a number >= 0 per GPU-hour (e.g. `{name}: 1.01`)"
            )
        prices[str(name)] = float(value)
    return prices


def price_for(prices: dict[str, float], accelerator_type: str, default: float | None) -> float | None:
    """The price per GPU-hour of a GPU type: its own from `--prices`, else the single default price.

    The default (`--gpu-hour-price` / `resources.gpu_hour_price`) keeps a one-type cluster as simple
    as before. Ray spells types in capitals (`A10G`) while users may not, so a type that is not
    listed as spelled is looked up again ignoring case.
    """
    if accelerator_type in prices:
        return prices[accelerator_type]
    folded = {name.casefold(): price for name, price in prices.items()}
    return folded.get(accelerator_type.casefold(), default)


def parse_counts(text: str, flag: str = "--fleet") -> dict[str, int]:
    """GPUs per type, from a flag such as `--fleet A10G=16,H100=8` (counts may be 0).

    Raises:
        ConfigError: naming `flag`, for an item that is not TYPE=COUNT with a whole COUNT >= 0, a type
            given twice, or no item at all.
    """
    return _parse_pairs(text, flag, _COUNTS_FORM, _read_count)


def parse_duration(text: str, flag: str = "--deadline") -> float:
    """Seconds from a human duration (`90`, `90s`, `45m`, `6h`, `1.5h`, `2d`), for deadlines.

    Raises:
        ConfigError: naming `flag`, when the text is not such a duration or is not above zero.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ConfigError(f"{flag}: cannot read {text!r} ({_DURATION_FORM})")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ConfigError(f"{flag}: {text!r} is no time at all; give a duration above zero ({_DURATION_FORM})")
    return seconds


def cost_per_1000(
    images_per_second: float,
    price: float | None,
    *,
    startup_seconds: float = 0.0,
    gpus: int = 1,
    rows: int | None = None,
) -> float | None:
    """The price of 1,000 images on GPUs of one type at `price` per GPU-hour.

    A GPU pays its start-up (model load, compile) once per job, so its share per image depends on
    the job: the start-up of `gpus` GPUs is spread over a job of `rows` images. Without `rows`
    (None or 0) the figure is the steady one, start-up left out.

    Returns:
        None when the price is unknown or the rate is not positive (nothing can be priced).
    """
    if price is None or images_per_second <= 0:
        return None
    seconds = 1000 / images_per_second
    if rows:
        seconds += 1000 * gpus * startup_seconds / rows
    return price / 3600 * seconds


@dataclass(frozen=True)
class TypeOffer:
    """What one GPU type offers a job: its tuned speed, its start-up, its price and how many there are."""

    name: str
    images_per_second: float  # steady, per GPU of this type, at its tuned settings
    startup_seconds: float  # per GPU: model load + warm-up, paid once when the job starts
    price: float | None  # per GPU-hour; None = unknown
    available: int  # GPUs of this type one may use at most

    @property
    def usable(self) -> bool:
        """A type with no GPU to spare or no measured rate cannot add anything to a fleet."""
        return self.available > 0 and self.images_per_second > 0

    @property
    def price_per_image(self) -> float:
        return (self.price or 0.0) / self.images_per_second


@dataclass(frozen=True)
class FleetPlan:
    """A job of `rows` images on `counts` GPUs per type: its time, GPU-hours and cost (module docstring)."""

    counts: dict[str, int]  # GPUs used per type (types with 0 omitted)
    rows: int
    images_per_second: float  # the fleet's: sum of counts * per-GPU rate
    seconds: float  # wall time: the slowest start-up among the used types + rows / images_per_second
    gpu_hours: float  # sum over used GPUs of seconds / 3600
    cost: float | None  # sum of count * price * seconds / 3600; None when a used type has no price
    unpriced: tuple[str, ...] = ()  # the used types without a price: why `cost` is None

    @property
    def gpus(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        """The plan as the CLI prints it, one figure a line."""
        fleet = " + ".join(f"{count} x {name}" for name, count in self.counts.items())
        lines = [f"fleet            {fleet}"]
        if not self.rows:
            return [*lines, "rows to render   0: nothing to render, so no time and no cost"]
        startup = max(0.0, self.seconds - self.rows / self.images_per_second)
        lines += [
            f"rows to render   {self.rows:,}",
            f"throughput       {_number(self.images_per_second)} images/s",
            f"time             {_human_duration(self.seconds)} (start-up {_human_duration(startup)})",
            f"GPU-hours        {_number(self.gpu_hours)}",
        ]
        if self.cost is None:
            lines.append(f"cost             unknown: no price for {', '.join(self.unpriced)} (--prices)")
        else:
            per_1000 = self.cost / self.rows * 1000
            lines.append(f"cost             {_money(self.cost)} ({per_1000:.4f} / 1,000 images)")
        return lines


def _human_duration(seconds: float) -> str:
    """Seconds below two minutes, minutes below two hours, hours above: the unit a person plans in."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _number(value: float) -> str:
    return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def _money(value: float) -> str:
    return f"{value:,.2f}" if value >= 1 else f"{value:.4f}"


def fleet_estimate(offers: dict[str, TypeOffer], counts: dict[str, int], rows: int) -> FleetPlan:
    """The time and cost of `rows` images on `counts` GPUs per type (e.g. from `--fleet`).

    Raises:
        ConfigError: a type has no offer (no tuning result), more GPUs are asked for than are
            available, a used type has no measured rate, or the counts add up to no GPU.
    """
    _check_rows(rows)
    for name, count in counts.items():
        _check_count(offers, name, count)
    if not any(counts.values()):
        raise ConfigError(f"the fleet has no GPU: give at least one type a count above 0 ({_COUNTS_FORM})")
    return _plan(offers, counts, rows)


def _check_rows(rows: int) -> None:
    if rows < 0:
        raise ConfigError(f"cannot plan {rows} rows: the number of rows to render is 0 or more")


def _check_count(offers: dict[str, TypeOffer], name: str, count: int) -> None:
    offer = offers.get(name)
    if offer is None:
        raise ConfigError(
            f"the fleet names {name!r}, a GPU type with no tuned figures; use the tuned types "
            f"({', '.join(offers) or 'none: run `sdxl-batch tune` first'})"
        )
    available = max(offer.available, 0)
    if not 0 <= count <= available:
        raise ConfigError(
            f"the fleet asks for {count} x {name}, but there are {available} {name} GPU(s) to use; "
            f"ask for 0 to {available}"
        )
    if count and offer.images_per_second <= 0:
        raise ConfigError(f"{name} has no measured throughput (0 images/s): tune it again or leave it out of the fleet")


def _plan(offers: dict[str, TypeOffer], counts: dict[str, int], rows: int) -> FleetPlan:
    """The plan of valid counts; the types in the offers' order, so that plans read alike."""
    used = {name: counts[name] for name in offers if counts.get(name)}
    rate = sum(count * offers[name].images_per_second for name, count in used.items())
    startup = max(offers[name].startup_seconds for name in used)
    seconds = startup + rows / rate if rows else 0.0
    unpriced = tuple(name for name in used if offers[name].price is None)
    hourly = sum(count * (offers[name].price or 0.0) for name, count in used.items())
    return FleetPlan(
        counts=used,
        rows=rows,
        images_per_second=rate,
        seconds=seconds,
        gpu_hours=sum(used.values()) * seconds / 3600,
        cost=None if unpriced else hourly * seconds / 3600,
        unpriced=unpriced,
    )


def cheapest_within(offers: dict[str, TypeOffer], rows: int, deadline_seconds: float) -> FleetPlan | None:
    """The cheapest mix of GPUs that renders `rows` images within `deadline_seconds`.

    Every mix of 0..available GPUs per type is tried when there are at most `EXACT_SEARCH_LIMIT`
    mixes; ties go to fewer GPUs, then to the faster mix. Above that, a greedy search per set of
    types (every set, up to `SUBSET_SEARCH_TYPES` types: one slow-starting type can put a deadline
    out of reach, so each set is tried without the others). With a set's start-up fixed, the
    deadline asks for a fleet rate of `rows / (deadline - start-up)`: the search adds GPUs in order
    of lowest price per image (price / rate) until that rate is reached, then goes over the types,
    most expensive per image first, and gives each the count that costs least while the deadline
    holds: GPUs that are not needed go (each pays its start-up), and a cheap-per-image type may
    gain GPUs when they save more than their start-up costs. The greedy plan meets the deadline
    but may cost a little more than the best one.

    Returns:
        None when even every available GPU misses the deadline.

    Raises:
        ConfigError: a usable type has no price (it cannot be costed), or no type is usable.
    """
    _check_rows(rows)
    mixes = _Mixes(_priced_offers(offers), rows)
    if rows == 0:
        return _plan(offers, {mixes.offers[0].name: 1}, 0)

    def fits(seconds: float, cost: float) -> bool:
        return seconds <= deadline_seconds * (1 + _TOLERANCE)

    def key(seconds: float, cost: float, gpus: int) -> Key:
        return (_rounded(cost), gpus, _rounded(seconds))

    if mixes.count <= EXACT_SEARCH_LIMIT:
        counts = mixes.best(mixes.every(), fits, key)
    else:
        counts = mixes.best(mixes.filled(lambda subset: _fill_deadline(mixes, subset, deadline_seconds)), fits, key)
    return None if counts is None else _plan(offers, mixes.by_name(counts), rows)


def fastest_within(offers: dict[str, TypeOffer], rows: int, budget: float) -> FleetPlan | None:
    """The fastest mix of GPUs that renders `rows` images for at most `budget`; ties go to the cheaper.

    Every mix is tried when there are at most `EXACT_SEARCH_LIMIT` mixes. Above that, a greedy
    search per set of types (as in `cheapest_within`): from one GPU of each type of the set (cut
    to the counts that cost least, if that is over the budget: a cheap-per-image type can lower the
    cost), it adds GPUs in order of lowest price per image while the cost stays within the budget,
    as many of each type as fit, over again until none does. The greedy plan keeps to the budget
    but may be a little slower than the best one.

    Returns:
        None when no mix fits the budget.

    Raises:
        ConfigError: a usable type has no price (it cannot be costed), or no type is usable.
    """
    _check_rows(rows)
    mixes = _Mixes(_priced_offers(offers), rows)
    if rows == 0:
        return _plan(offers, {mixes.offers[0].name: 1}, 0)

    def fits(seconds: float, cost: float) -> bool:
        return cost <= budget * (1 + _TOLERANCE)

    def key(seconds: float, cost: float, gpus: int) -> Key:
        return (_rounded(seconds), _rounded(cost), gpus)

    if mixes.count <= EXACT_SEARCH_LIMIT:
        counts = mixes.best(mixes.every(), fits, key)
    else:
        counts = mixes.best(mixes.filled(lambda subset: _fill_budget(mixes, subset, budget)), fits, key)
    return None if counts is None else _plan(offers, mixes.by_name(counts), rows)


def _priced_offers(offers: dict[str, TypeOffer]) -> list[TypeOffer]:
    """The types a fleet can use, cheapest per image first; each must have a price to be compared."""
    usable = [offer for offer in offers.values() if offer.usable]
    if not usable:
        raise ConfigError(
            "no GPU type to plan with: every type has 0 GPUs available or no measured throughput "
            "(run `sdxl-batch tune` on the cluster's GPU types)"
        )
    unpriced = [offer.name for offer in usable if offer.price is None]
    if unpriced:
        raise ConfigError(
            f"cannot cost a fleet without a price for {', '.join(unpriced)}: pass --prices "
            f"{','.join(f'{name}=PRICE' for name in unpriced)} (per GPU-hour), or --gpu-hour-price for every type"
        )
    return sorted(usable, key=lambda offer: (offer.price_per_image, -offer.images_per_second, offer.startup_seconds))


def _rounded(value: float) -> float:
    """Nine significant digits: mixes equal but for float rounding tie, and the tie-break decides."""
    return float(f"{value:.9g}")


def _ceil(value: float) -> int:
    """Whole GPUs for a fractional need; a need of 2.0000000001 by float rounding is 2."""
    return max(0, math.ceil(value - 1e-9))


class _Mixes:
    """The arithmetic of the searches on mixes: a mix is a count per usable type, in `offers` order
    (cheapest per image first). The figures are kept in plain lists, since the exact search prices
    up to `EXACT_SEARCH_LIMIT` mixes."""

    def __init__(self, offers: list[TypeOffer], rows: int) -> None:
        self.offers, self.rows = offers, rows
        self.rates = [offer.images_per_second for offer in offers]
        self.prices = [offer.price or 0.0 for offer in offers]
        self.startups = [offer.startup_seconds for offer in offers]
        self.available = [offer.available for offer in offers]
        self.count = math.prod(available + 1 for available in self.available)

    def measure(self, counts: Sequence[int]) -> tuple[float, float]:
        """(seconds, cost) of a non-empty mix, as `_plan` computes them (module docstring)."""
        rate = hourly = startup = 0.0
        for count, type_rate, price, type_startup in zip(counts, self.rates, self.prices, self.startups, strict=True):
            if count:
                rate += count * type_rate
                hourly += count * price
                startup = max(startup, type_startup)
        seconds = startup + self.rows / rate
        return seconds, hourly * seconds / 3600

    def rate(self, counts: Sequence[int]) -> float:
        return sum(count * rate for count, rate in zip(counts, self.rates, strict=True))

    def by_name(self, counts: Sequence[int]) -> dict[str, int]:
        return {offer.name: count for offer, count in zip(self.offers, counts, strict=True) if count}

    def every(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(*(range(available + 1) for available in self.available))

    def filled(self, fill: Callable[[list[int]], list[int] | None]) -> Iterator[tuple[int, ...]]:
        """`fill`'s mix for each set of types: every non-empty set, or, when there are so many types
        that their sets would be too many to try, the sets of the cheapest per image."""
        types = len(self.offers)
        if types > SUBSET_SEARCH_TYPES:
            sets: Iterable[tuple[int, ...]] = (tuple(range(size)) for size in range(1, types + 1))
        else:
            sets = itertools.chain.from_iterable(itertools.combinations(range(types), n) for n in range(1, types + 1))
        for subset in sets:
            counts = fill(list(subset))
            if counts is not None:
                yield tuple(counts)

    def best(
        self, mixes: Iterable[Sequence[int]], fits: Callable[[float, float], bool], key: KeyOf
    ) -> Sequence[int] | None:
        """The mix that `fits` with the lowest `key` (the empty mix left out)."""
        best: Sequence[int] | None = None
        best_key: Key | None = None
        for counts in mixes:
            gpus = sum(counts)
            if not gpus:
                continue
            seconds, cost = self.measure(counts)
            if fits(seconds, cost) and (best_key is None or key(seconds, cost, gpus) < best_key):
                best, best_key = counts, key(seconds, cost, gpus)
        return best

    def cheapest_count(self, counts: list[int], index: int, low: int) -> int:
        """The count of one type from `low` (>= 1) to all available, other counts fixed, that costs
        least (ties: fewer GPUs).

        With the others' rate R0 and price per hour H0, and the start-up S, k GPUs at rate r and
        price p cost (H0 + k p) (S + rows / (R0 + k r)) / 3600: rising linearly with k, plus a term
        that falls with k when the type is cheaper per image than the others. Over real k the cost is
        least where its derivative, p S + rows (p R0 - r H0) / (R0 + k r)^2, is zero, so only the whole
        numbers around that point and the ends of the range need pricing.
        """
        rate, price, high = self.rates[index], self.prices[index], self.available[index]
        others = [*counts[:index], 0, *counts[index + 1 :]]
        others_rate, others_hourly = self.rate(others), sum(c * p for c, p in zip(others, self.prices, strict=True))
        startup = max(self.startups[i] for i, count in enumerate(counts) if count or i == index)
        candidates = {low, high}
        falling = self.rows * (rate * others_hourly - price * others_rate)
        if price * startup > 0 and falling > 0:
            least = (math.sqrt(falling / (price * startup)) - others_rate) / rate
            candidates |= {min(max(whole, low), high) for whole in (math.floor(least), math.ceil(least))}

        def cost(count: int) -> tuple[float, int]:
            return _rounded(self.measure([*counts[:index], count, *counts[index + 1 :]])[1]), count

        return min(candidates, key=cost)

    def most_count(self, counts: list[int], index: int, budget: float) -> int:
        """The most GPUs of one type, other counts fixed, within the budget, by bisection: the cost as
        a function of this count (`cheapest_count`) is convex or rising, so the counts within the
        budget are a range, and it holds the present count."""
        low, high = counts[index], self.available[index]
        while low < high:
            middle = (low + high + 1) // 2
            if self.measure([*counts[:index], middle, *counts[index + 1 :]])[1] <= budget * (1 + _TOLERANCE):
                low = middle
            else:
                high = middle - 1
        return low


def _fill_deadline(mixes: _Mixes, subset: list[int], deadline: float) -> list[int] | None:
    """The greedy mix of one set of types for a deadline (`cheapest_within`); None if it cannot make it."""
    startup = max(mixes.startups[index] for index in subset)
    if startup >= deadline:
        return None
    need = mixes.rows / (deadline - startup)  # the fleet rate that meets the deadline
    counts = [1 if index in subset else 0 for index in range(len(mixes.offers))]
    for index in subset:
        short = need - mixes.rate(counts)
        if short <= 0:
            break
        counts[index] = min(mixes.available[index], counts[index] + _ceil(short / mixes.rates[index]))
    if mixes.rate(counts) < need * (1 - _TOLERANCE):
        return None
    for _ in range(_PASSES):
        before = list(counts)
        for index in reversed(subset):
            others_rate = mixes.rate(counts) - counts[index] * mixes.rates[index]
            low = max(1, _ceil((need - others_rate) / mixes.rates[index]))
            counts[index] = mixes.cheapest_count(counts, index, low)
        if counts == before:
            break
    return counts


def _fill_budget(mixes: _Mixes, subset: list[int], budget: float) -> list[int] | None:
    """The greedy mix of one set of types for a budget (`fastest_within`); None if none fits it."""
    counts = [1 if index in subset else 0 for index in range(len(mixes.offers))]
    for _ in range(_PASSES):
        if mixes.measure(counts)[1] <= budget * (1 + _TOLERANCE):
            break
        for index in subset:
            counts[index] = mixes.cheapest_count(counts, index, 1)
    if mixes.measure(counts)[1] > budget * (1 + _TOLERANCE):
        return None
    for _ in range(_PASSES):
        before = list(counts)
        for index in subset:
            counts[index] = mixes.most_count(counts, index, budget)
        if counts == before:
            break
    return counts
