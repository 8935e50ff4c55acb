"""Tests for celery_guard.census: which modules are the app's, what a reader of an object
writes, how repeats are told from a sample, and the census of modules built here.

The modules are real ``types.ModuleType`` objects made in the test, with the file paths
the table gives; ``roots`` stands for where installed code lives. Expected figures are
computed from ``sys.getsizeof`` of the very objects, so they hold on any 64-bit CPython.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import needs
import pytest

from celery_guard import census
from celery_guard.census import (
    PAGE,
    XML_ATTRIBUTE,
    XML_ELEMENT,
    _chunk,
    _distinct,
    _pages,
    _xml_text,
    app_modules,
    is_app_module,
    written,
)

HERE = Path(__file__).parent
ROOTS = ("/usr/lib/python3.11", "/srv/venv/lib/python3.11/site-packages")


def module(name: str, path: str | None = None, origin: str | None = None, **values: Any) -> Any:
    made = types.ModuleType(name)
    if path is not None:
        made.__file__ = path
    if origin is not None:
        made.__spec__ = types.SimpleNamespace(origin=origin, loader=object())  # type: ignore[assignment]
    made.__dict__.update(values)
    return made


# id, name, file, spec origin, expected
APP_MODULES = [
    ("project-source", "proj.tasks", "/srv/app/proj/tasks.py", None, True),
    ("cwd-module", "heavy_app", "/work/examples/heavy_app.py", None, True),
    ("generated-no-file", "generated.models", None, None, True),
    ("site-packages", "numpy.core", "/srv/venv/lib/python3.11/site-packages/numpy/core.py",
     None, False),
    ("stdlib-by-path", "mylib", "/usr/lib/python3.11/mylib.py", None, False),
    ("stdlib-by-name", "json.decoder", "/elsewhere/json/decoder.py", None, False),
    ("celery", "celery.app.base", "/srv/app/celery/app/base.py", None, False),
    ("the-guard", "celery_guard.census", "/work/celery_guard/census.py", None, False),
    ("kombu", "kombu", "/srv/app/kombu/__init__.py", None, False),
    ("built-in", "_testbuiltin", None, "built-in", False),
    ("frozen", "_frozen_thing", None, "frozen", False),
    ("prefix-is-not-a-parent", "proj", "/usr/lib/python3.11-app/proj.py", None, True),
]  # fmt: skip


@pytest.mark.parametrize(
    "name,path,origin,expected", [a[1:] for a in APP_MODULES], ids=[a[0] for a in APP_MODULES]
)
def test_is_app_module(name: str, path: str | None, origin: str | None, expected: bool) -> None:
    """The app's modules: not installed, not the standard library, not Celery's stack."""
    assert is_app_module(name, module(name, path, origin), ROOTS) is expected


def test_is_app_module_needs_a_module() -> None:
    """A placeholder in sys.modules (None after a failed import) is nobody's data."""
    assert not is_app_module("proj.missing", None, ROOTS)


def test_app_modules_in_name_order() -> None:
    modules = {
        "zeta": module("zeta", "/srv/app/zeta.py"),
        "numpy": module("numpy", "/srv/venv/lib/python3.11/site-packages/numpy/__init__.py"),
        "alpha": module("alpha", "/srv/app/alpha.py"),
    }
    assert [name for name, _ in app_modules(modules, ROOTS)] == ["alpha", "zeta"]


def _small(size: int) -> int:
    return -(-size // 16) * 16


LIST_HEAD = _small(list.__basicsize__ + 16)
DICT_HEAD = _small(dict.__basicsize__ + 16)

# id, object, expected (block, side block)
WRITTEN: list[tuple[str, Any, tuple[int, int]]] = [
    ("small-int", 10**10, (_small(sys.getsizeof(10**10)), 0)),
    ("float", 1.5, (_small(sys.getsizeof(1.5)), 0)),
    ("short-str", "name-1", (_small(sys.getsizeof("name-1")), 0)),
    ("tuple", (1, "a", 2.0), (_small(sys.getsizeof((1, "a", 2.0))), 0)),
    ("medium-str-one-chunk", "x" * 1000, (sys.getsizeof("x" * 1000) + 16, 0)),
    ("large-bytes-header-page-only", b"x" * (1 << 20), (PAGE, 0)),
    ("small-list-items-apart", [1, 2, 3], (LIST_HEAD, _small(sys.getsizeof([1, 2, 3]) - 56))),
    ("large-list-items-read-only", list(range(1000)), (LIST_HEAD, 0)),
    ("large-dict-table-read-only", {i: [i] for i in range(1000)}, (DICT_HEAD, 0)),
]


@pytest.mark.parametrize("obj,expected", [w[1:] for w in WRITTEN], ids=[w[0] for w in WRITTEN])
def test_written(obj: Any, expected: tuple[int, int]) -> None:
    """Small blocks whole, larger chunks their header page, containers' storage apart."""
    assert written(obj) == expected


def test_written_class_and_code_count_whole() -> None:
    """The interpreter writes a class's slots and a function's bytecode where they run."""

    class Local:
        def method(self) -> int:
            return 1

    assert written(Local) == (sys.getsizeof(Local) + 16, 0)
    code = Local.method.__code__
    assert written(code) == (sys.getsizeof(code) + 16, 0)


def test_written_ndarray_header_only() -> None:
    """A NumPy array's payload is read, never written: only its header counts."""
    numpy = needs.module("numpy")
    array = numpy.zeros(1 << 20)
    block, side = written(array)
    assert side == 0 and block == _small(sys.getsizeof(array) - array.nbytes)
    assert block < 256


# id, sampled ids, population, expected distinct objects
DISTINCT = [
    ("empty", [], 10, 0.0),
    ("whole-population", [1, 2, 2, 3], 4, 3.0),
    ("no-repeat-in-sample", [1, 2, 3, 4], 1000, 1000.0),
    # 4 drawn, 6 pairs, 1 equal: 6 / 1
    ("one-pair", [1, 1, 2, 3], 1000, 6.0),
    ("all-the-same", [7] * 10, 10**6, 1.0),
    ("never-above-population", [1, 1, *range(2, 200)], 300, 300.0),
]


@pytest.mark.parametrize(
    "ids,population,expected", [d[1:] for d in DISTINCT], ids=[d[0] for d in DISTINCT]
)
def test_distinct(ids: list[int], population: int, expected: float) -> None:
    assert _distinct(ids, population) == pytest.approx(expected)


def test_distinct_recovers_repeats() -> None:
    """A million references to 200k objects (each five times), drawn as the census
    draws: the estimate is within 20% of 200k."""
    objects = [object() for _ in range(200_000)]
    refs = [objects[i % len(objects)] for i in range(1_000_000)]
    drawn = census._draw(refs, 32).items
    total = sum(weight for _, weight in drawn)
    assert 160_000 <= total <= 240_000
    assert len(drawn) == 32


def _at(*pages: int) -> list[int]:
    """Addresses inside the given pages (what ``id`` returns), one per page given."""
    return [page * PAGE + 64 for page in pages]


# id, addresses, population, expected pages
PAGES = [
    ("none", [], 10, 0.0),
    ("all-drawn-is-exact", _at(1, 1, 2, 3), 4, 3.0),
    ("every-page-seen-twice", _at(1, 1, 2, 2, 3, 3), 100, 3.0),
    # 4 of 8 draws met a page once: coverage 1/2, twice the 6 pages seen
    ("coverage", _at(1, 1, 2, 2, 3, 4, 5, 6), 100, 12.0),
    ("never-above-population", _at(*range(10)), 12, 12.0),
]


@pytest.mark.parametrize(
    "ids,population,expected", [d[1:] for d in PAGES], ids=[d[0] for d in PAGES]
)
def test_pages(ids: list[int], population: int, expected: float) -> None:
    assert _pages(ids, population) == pytest.approx(expected)


def test_pages_only_where_items_repeat() -> None:
    """Distinct items are counted exactly from their bytes: their pages hold what the walk
    counts apart (their contents, allocated alongside), so they set no floor."""
    for count in (10_000, 20_000, 75_000, 300_000):  # drawn whole, with replacement
        rows = [[i, f"row {i}"] for i in range(count)]
        assert census._draw(rows, 32).pages == 0.0, count
        repeated = [rows[i % (count // 3)] for i in range(count)]
        assert census._draw(repeated, 32).pages > 0.0, count


def test_census_counts_the_pages_that_uneven_repeats_hide() -> None:
    """A column of 1M references to 200k strings, each drawn at random (so some strings
    repeat more than others, as in a pandas column): counting distinct objects from pairs
    in the sample sees 10-25% fewer strings than there are, but a child copies every page
    that holds one. The census counts within 5% of those pages. Run in a fresh
    interpreter: where the strings land depends on the heap the tests before left."""
    found = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {[str(HERE), str(HERE.parent)]!r}; "
         "from unit import test_census; print(*test_census.uneven_repeats())"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    from_pairs, distinct, counted, pages = map(int, found.stdout.split())
    assert 0.75 * distinct <= from_pairs <= 0.9 * distinct, (from_pairs, distinct)
    assert abs(counted - pages) <= 0.05 * pages, (counted, pages)


def uneven_repeats() -> tuple[int, int, int, int]:
    """(strings seen from pairs, strings there are, bytes counted, bytes of their pages)."""
    import random

    strings = [f"customer-{i:06d}@example.com" for i in range(200_000)]
    rng = random.Random(7)
    column = [strings[rng.randrange(len(strings))] for _ in range(1_000_000)]
    distinct = len({id(text) for text in column})
    from_pairs = sum(weight for _, weight in census._draw(column, 32).items)
    modules = {"shop": module("shop", "/srv/app/shop.py", COLUMN=column)}
    pages = len({id(text) // PAGE for text in column}) * PAGE
    header = _small(sys.getsizeof(column) - 8 * len(column))
    counted = census.census(modules, ROOTS).bytes - header
    return int(from_pairs), distinct, counted, pages


# id, size, expected glibc chunk
CHUNKS = [("tiny", 1, 32), ("24-fits-32", 24, 32), ("25", 25, 48), ("120", 120, 128)]


@pytest.mark.parametrize("size,expected", [c[1:] for c in CHUNKS], ids=[c[0] for c in CHUNKS])
def test_chunk(size: int, expected: int) -> None:
    assert _chunk(size) == expected


def test_xml_text_compact_below_eight_bytes() -> None:
    assert _xml_text("t3") == XML_ELEMENT
    assert _xml_text("product 12") == XML_ELEMENT + _chunk(11)


def test_xml_tree_estimate() -> None:
    """An lxml tree: elements, attributes and text by libxml2's structure sizes."""
    etree = needs.module("lxml.etree")
    items = "".join(f'<item id="{i}"><name>product {i:05d}</name></item>' for i in range(100))
    root = etree.fromstring(f"<catalog>{items}</catalog>")
    per_item = XML_ELEMENT + XML_ATTRIBUTE + XML_ELEMENT + _xml_text("product 00001")
    walk = census._Walk(32, 1000, frozenset())
    assert walk.size(root, code=False) == pytest.approx(100 * per_item + XML_ELEMENT)
    assert walk.opaque == 1


def _tuples(count: int) -> dict[str, tuple[int, str, float]]:
    return {f"key-{i:06d}": (i + 10**6, f"name-{i:06d}", i + 0.5) for i in range(count)}


def _exact(catalog: dict[str, tuple[int, str, float]]) -> int:
    """What a reader of every entry writes: the dict's header, each key, tuple and item."""
    total = DICT_HEAD
    for key, value in catalog.items():
        total += _small(sys.getsizeof(key)) + _small(sys.getsizeof(value))
        total += sum(_small(sys.getsizeof(item)) for item in value)
    return total


@pytest.mark.parametrize("count", [10, 5000, 50_000])
def test_census_of_a_catalogue(count: int) -> None:
    """Small catalogues are walked whole (exact), large ones sampled (within 5%)."""
    catalog = _tuples(count)
    modules = {"proj.data": module("proj.data", "/srv/app/proj/data.py", CATALOG=catalog)}
    result = census.census(modules, ROOTS)
    exact = _exact(catalog)
    assert result.modules == 1
    if count <= 32:
        assert result.bytes == exact
    else:
        assert abs(result.bytes - exact) <= 0.05 * exact
        assert result.visited < 200  # sampled, whatever the size


def test_census_skips_installed_and_framework_data() -> None:
    """Data held by an installed package or by Celery is not the app's."""
    catalog = _tuples(1000)
    modules = {
        "lib": module("lib", "/srv/venv/lib/python3.11/site-packages/lib.py", DATA=catalog),
        "celery.cache": module("celery.cache", "/srv/app/celery/cache.py", DATA=catalog),
    }
    assert census.census(modules, ROOTS).bytes == 0


def test_census_counts_shared_data_once() -> None:
    """Two modules holding the same catalogue: it is counted once."""
    catalog = _tuples(10)
    one = {"a": module("a", "/srv/app/a.py", CATALOG=catalog)}
    two = {**one, "b": module("b", "/srv/app/b.py", ALIAS=catalog)}
    assert census.census(two, ROOTS).bytes == census.census(one, ROOTS).bytes


def test_census_counts_classes_where_defined() -> None:
    """A registry of classes in another module adds itself, not the classes again."""
    made = module("proj.models", "/srv/app/proj/models.py")
    classes = {}
    for i in range(10):
        cls = type(f"Model{i}", (), {"__module__": "proj.models", "field": f"f{i}"})
        setattr(made, cls.__name__, cls)
        classes[cls.__name__] = cls
    alone = census.census({"proj.models": made}, ROOTS).bytes
    registry = module("proj.registry", "/srv/app/proj/registry.py", REGISTRY=classes)
    both = census.census({"proj.models": made, "proj.registry": registry}, ROOTS).bytes
    assert alone >= 10 * sys.getsizeof(classes["Model0"])
    # The registry's header, table and keys, not the classes again.
    assert 0 < both - alone < sys.getsizeof(classes["Model0"])


def test_census_of_this_process_is_bounded() -> None:
    """The census of the test process itself looks at a bounded number of objects."""
    result = census.census(sys.modules, census.library_roots())
    assert result.visited <= 60_000
    assert result.bytes >= 0


def _library(**methods: Any) -> type:
    """A class of an installed package (``vendorlib``), with a base of its own."""

    def describe(self: object) -> str:
        return f"{type(self).__name__}: {len(vars(self))} fields"

    base = type("NDFrame", (), {"__module__": "vendorlib.generic", "describe": describe})
    return type("Frame", (base,), {"__module__": "vendorlib.frame", **methods})


def _total(frame_type: type, count: int = 1) -> int:
    frames = [frame_type() for _ in range(count)]
    return census.census({"shop": module("shop", "/srv/app/shop.py", FRAMES=frames)}, ROOTS).bytes


def _total_by_group(self: object, column: str = "amount") -> dict[str, float]:
    groups: dict[str, float] = {}
    for key, value in getattr(self, column, {}).items():
        groups[key] = groups.get(key, 0.0) + value
    return groups


@pytest.mark.parametrize(
    "method",
    [_total_by_group, property(_total_by_group), classmethod(_total_by_group)],
    ids=["function", "property", "classmethod"],
)
def test_census_counts_a_library_class_and_its_bases_once(method: object) -> None:
    """A task that reads a library's object calls its methods: the class and its bases,
    with their methods' code, count once, however many of its objects the app holds."""
    plain, with_method = _library(), _library(total_by_group=method)
    code = sys.getsizeof(_total_by_group.__code__)
    assert _total(with_method) - _total(plain) >= code
    base = type("Base", (), {"__module__": "vendorlib.generic", "total": _total_by_group})
    derived = type("Frame", (base,), {"__module__": "vendorlib.frame"})
    bare = type("Frame", (), {"__module__": "vendorlib.frame"})
    assert _total(derived) - _total(bare) >= code  # the base's methods count too
    one, two = _total(plain), _total(plain, count=2)
    assert 0 < two - one < sys.getsizeof(plain)  # one more object, not its class again


def test_census_counts_no_library_code_for_standard_library_objects() -> None:
    """The standard library's classes are not an installed package's: a Counter counts
    as the dict it is (a subclass's instance is a little larger), not with its methods."""
    import collections

    counter = collections.Counter({"a": 1, "b": 2})
    as_dict = dict(counter)
    counted = census.census({"s": module("s", "/srv/app/s.py", DATA=counter)}, ROOTS).bytes
    plain = census.census({"s": module("s", "/srv/app/s.py", DATA=as_dict)}, ROOTS).bytes
    assert 0 <= counted - plain < sys.getsizeof(collections.Counter.most_common.__code__)


class _Hostile:
    """A library's descriptor that raises on any attribute looked up on it."""

    def __getattr__(self, name: str) -> object:
        raise RuntimeError(f"no {name} here")


def test_census_survives_a_library_class_whose_attributes_raise() -> None:
    frame = _library(lazy=_Hostile(), total=_total_by_group)
    assert _total(frame) - _total(_library()) >= sys.getsizeof(_total_by_group.__code__)


class _LenRaises(list):  # type: ignore[type-arg]
    def __len__(self) -> int:
        raise RuntimeError("no length here")


class _SlotsKeyError:
    __slots__ = ("value",)

    def __getattr__(self, name: str) -> object:
        raise KeyError(name)


def test_census_counts_app_objects_that_raise_on_access_as_opaque() -> None:
    """An unbound Werkzeug/Flask ``LocalProxy`` raises RuntimeError on any access, a list
    whose ``__len__`` raises, a class whose ``__getattr__`` raises KeyError: each is opaque,
    and the rest of the app's data is still counted."""
    from contextvars import ContextVar

    local = needs.module("werkzeug.local")
    catalog = _tuples(10)
    hostile = {
        "PROXY": local.LocalProxy(ContextVar("request")),
        "ITEMS": _LenRaises([1, 2, 3]),
        "SLOTS": _SlotsKeyError(),
    }
    alone = census.census({"proj": module("proj", "/srv/app/proj.py", CATALOG=catalog)}, ROOTS)
    made = module("proj", "/srv/app/proj.py", CATALOG=catalog, **hostile)
    result = census.census({"proj": made}, ROOTS)
    assert result.opaque >= len(hostile)
    assert result.bytes >= alone.bytes == _exact(catalog)


def test_census_memory_is_bounded_on_a_huge_deque_and_an_f_ordered_object_array() -> None:
    """Five million items in a deque, ten million in an object array in Fortran order:
    the census allocates a few MiB at most (it pushed every item of the deque, about
    550 MiB, and copied the array) and looks at a bounded number of objects."""
    import collections
    import tracemalloc

    numpy = needs.module("numpy")
    queue = collections.deque(range(5_000_000))
    objects = numpy.empty((2_000, 5_000), dtype=object, order="F")
    objects[:] = "same"
    made = module("proj", "/srv/app/proj.py", QUEUE=queue, OBJECTS=objects)
    tracemalloc.start()
    try:
        result = census.census({"proj": made}, ROOTS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20
    assert result.visited < 1_000
    # the deque's five million distinct ints are what a reader of it writes
    assert result.bytes >= 5_000_000 * sys.getsizeof(10**6) * 0.9
