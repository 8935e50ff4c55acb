"""How much of the main process's memory the app's tasks will write: a sampled census of
the objects the app's own modules hold.

A forked child copies a page when it first writes to it, and reading a Python object
writes its reference count: a task copies every page holding an object header it reaches,
not what it only reads through a pointer (the items array of a large list, a large dict's
hash table, the payload of a NumPy array or a large byte string). The interpreter's and
the libraries' own objects it mostly leaves alone; what Celery's worker loop touches of
them is a fixed part of the estimate.

So the census walks what the *app's* modules hold (not the standard library, Celery's
stack or installed packages): their classes and functions (the interpreter specialises
the bytecode it runs in place) and the data their globals reach. Large containers are
sampled, so the cost is bounded whatever the size of the data. Pure: a function of the
objects and the module table it is given.
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import site
import sys
import sysconfig
import types
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Packages of Celery's stack and the guard itself: never the app's data.
FRAMEWORK = frozenset(
    {
        "celery", "kombu", "billiard", "vine", "amqp", "click", "click_didyoumean",
        "click_plugins", "click_repl", "redis", "celery_guard", "dateutil", "tzdata",
        "tzlocal", "prompt_toolkit", "wcwidth", "psutil", "six", "packaging",
        "importlib_metadata", "zipp", "typing_extensions", "pkg_resources",
        "setuptools", "_distutils_hack", "prometheus_client", "gevent", "eventlet",
        "greenlet",
    }
)  # fmt: skip

#: pymalloc serves requests up to this size from its pools, in 16-byte steps.
SMALL = 512
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: malloc's bookkeeping per chunk (glibc: size field, 16-byte alignment).
CHUNK = 16

#: libxml2's structures on 64-bit Linux (tree.h), each a glibc chunk: xmlNode (120 bytes)
#: takes 128, xmlAttr (96) takes 112, and an attribute's value is a text node. Text of up
#: to 7 bytes is kept inside its node (lxml parses with XML_PARSE_COMPACT); longer text is
#: a chunk of its own.
XML_ELEMENT = 128
XML_ATTRIBUTE = 112 + XML_ELEMENT


def _chunk(size: int) -> int:
    """A glibc chunk for ``size`` bytes: 8 bytes of header, 16-byte steps, 32 at least."""
    return max(32, -(-(size + 8) // 16) * 16)


def _xml_text(text: str) -> int:
    length = len(text.encode())
    return XML_ELEMENT + (_chunk(length + 1) if length > 7 else 0)


@dataclass(frozen=True)
class Census:
    """Bytes the app's tasks are expected to write in a child, and what was looked at."""

    bytes: int
    modules: int  # app modules found
    visited: int  # objects looked at (sampling keeps this bounded)
    opaque: int  # objects whose memory lives where the census cannot see (C types)


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def library_roots() -> tuple[str, ...]:
    """Where installed code lives: the interpreter's prefixes and every site directory."""
    roots: set[str | None] = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths = sysconfig.get_paths()
    roots.update(paths.get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib"))
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # virtualenv's old site module
        pass
    roots.add(site.getusersitepackages())
    return tuple(sorted(os.path.realpath(r) for r in roots if r))


def is_app_module(name: str, module: object, roots: tuple[str, ...]) -> bool:
    """Not built in, the standard library, Celery's stack, or installed under the
    interpreter's prefixes or a site directory; made at run time (no file) counts."""
    top = name.partition(".")[0]
    if top in FRAMEWORK or top in getattr(sys, "stdlib_module_names", ()):
        return False
    if not isinstance(module, types.ModuleType):
        return False
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None)
    if origin in ("built-in", "frozen"):
        return False
    path = getattr(module, "__file__", None) or (origin if isinstance(origin, str) else None)
    if path is None:
        return spec is None or getattr(spec, "loader", None) is not None
    return not _under(os.path.realpath(path), roots)


def app_modules(
    modules: Mapping[str, object], roots: tuple[str, ...]
) -> list[tuple[str, types.ModuleType]]:
    """The app's modules among ``modules`` (``sys.modules``), in name order."""
    found = []
    for name, module in sorted(modules.items()):
        if is_app_module(name, module, roots):
            assert isinstance(module, types.ModuleType)
            found.append((name, module))
    return found


def _small(size: int) -> int:
    """What a pymalloc block of ``size`` bytes takes: rounded up to 16 bytes."""
    return -(-size // 16) * 16


def _size(obj: object) -> int:
    """``sys.getsizeof`` for the interpreter's own types; a type's ``__basicsize__`` for
    classes that define ``__sizeof__`` in Python (pandas' reports deep memory, slowly)."""
    kind = type(obj)
    if isinstance(getattr(kind, "__sizeof__", None), types.FunctionType):
        return kind.__basicsize__ + (16 if gc.is_tracked(obj) else 0)
    try:
        return sys.getsizeof(obj)
    except TypeError:
        return kind.__basicsize__


def written(obj: object) -> tuple[int, int]:
    """What a reader of ``obj`` copies in a child: (its block, its side block). A small
    object's whole block counts: pymalloc keeps it in a pool of its 16-byte size class,
    among the other objects the app built with it. A larger object is a malloc chunk of
    its own: its header page is written (the reference count), the rest only where it is
    written too (a code object's bytecode, a class's slots). The items array of a list and
    the table of a dict or set are only read: that side block counts only where its size
    class shares pools with written objects."""
    size = _size(obj)
    kind = type(obj)
    if isinstance(obj, (list, dict, set, frozenset)):
        head = kind.__basicsize__ + (16 if gc.is_tracked(obj) else 0)
        side = size - head
        return _small(head), (_small(side) if 0 < side <= SMALL else 0)
    if _is_ndarray(obj):
        own = obj.nbytes if obj.flags.owndata else 0  # type: ignore[attr-defined]
        return _small(max(size - own, 0)), 0
    if isinstance(obj, (types.CodeType, type)):
        return size + CHUNK, 0  # specialised bytecode, type slots: written where executed
    if size <= SMALL:
        return _small(size), 0
    return min(size + CHUNK, PAGE), 0


def _unwrapped(value: object) -> object:
    """The function behind a method, class method, static method or property; anything
    else as it is (a library's own descriptor may raise on any attribute)."""
    try:
        return getattr(value, "__func__", None) or getattr(value, "fget", value)
    except Exception:  # noqa: BLE001 - the census must not fail on a library's object
        return value


def _is_ndarray(obj: object) -> bool:
    kind = type(obj)
    return kind.__name__ == "ndarray" and kind.__module__ == "numpy"


def _distinct(ids: list[int], population: int) -> float:
    """How many distinct objects ``population`` references hold, from the ids of a sample
    drawn with replacement (or of all of them): with ``d`` distinct objects, two draws are
    equal with probability ``1/d`` (strings that repeat, the same default everywhere)."""
    if not ids:
        return 0.0
    counts = Counter(ids)
    if len(ids) >= population:
        return float(len(counts))
    pairs = sum(c * (c - 1) // 2 for c in counts.values())
    drawn = len(ids) * (len(ids) - 1) / 2
    return float(population) if pairs == 0 else min(drawn / pairs, float(population))


#: References drawn from a large container to see how often its items repeat.
DRAW = 16384
#: Items repeat when there are at least this many references per distinct item.
REPEATS = 2


def _pages(ids: list[int], population: int) -> float:
    """How many distinct pages the headers of ``population`` references lie on, from the
    ids (addresses) of a sample drawn with replacement, or of all of them. A sample misses
    the objects referenced less often (strings that repeat unevenly look fewer), but pages
    are well covered: dozens of small objects share one. The Good-Turing coverage (one
    minus the share of pages drawn once) corrects for the pages no draw reached."""
    if not ids:
        return 0.0
    counts = Counter(address // PAGE for address in ids)
    if len(ids) >= population:
        return float(len(counts))
    once = sum(1 for count in counts.values() if count == 1)
    coverage = 1 - once / len(ids)
    if coverage <= 0:
        return float(population)
    return min(len(counts) / coverage, float(population))


@dataclass
class _Drawn:
    """Items standing for a container, and the pages their headers are on: 0 where no item
    repeats or the items are not a sample (a small container, an unordered one strided)."""

    items: list[tuple[object, float]]
    pages: float = 0.0


def _draw(items: Sequence[object], sample: int) -> _Drawn:
    """Up to ``sample`` distinct items of ``items``, each with the weight it stands for:
    the distinct objects of the whole, by :func:`_distinct`, shared among them. All of
    them when they are few: what the walk visits stays bounded whatever one object holds."""
    count = len(items)
    if count <= sample:
        return _Drawn([(item, 1.0) for item in items])
    if count <= DRAW:
        drawn = list(items)
    else:  # with replacement, seeded by the size: the same draws on every run
        rng = random.Random(count)
        drawn = [items[int(rng.random() * count)] for _ in range(DRAW)]
    ids = [id(item) for item in drawn]
    distinct = _distinct(ids, count)
    picked: dict[int, object] = {}
    for item in drawn:
        picked.setdefault(id(item), item)
        if len(picked) == sample:
            break
    weight = distinct / len(picked)
    # Where items do not repeat the count is exact (REPEATS leaves room for the draws with
    # replacement that meet the same item); where they repeat unevenly it is low, and the
    # pages their headers are on bound it.
    pages = _pages(ids, count) if distinct * REPEATS <= count else 0.0
    return _Drawn([(item, weight) for item in picked.values()], pages)


def _strided(items: Iterable[object], count: int, sample: int) -> list[object]:
    """Up to ``sample`` evenly spaced items of ``count``, without building the whole."""
    return list(itertools.islice(items, 0, None, max(count // sample, 1)))[:sample]


def _xml_bytes(element: Any, sample: int) -> float:
    """libxml2 memory of an lxml element and its subtree: a task that reads an element
    makes a Python proxy for it and writes the proxy's address into the C node."""
    count = len(element)
    step = max(count / sample, 1.0)
    picked = [element[int(i * step)] for i in range(min(sample, count))]
    total = 0.0
    for child in picked:
        nodes = 0
        for node in child.iter():
            nodes += XML_ELEMENT
            for value in node.attrib.values():
                nodes += XML_ATTRIBUTE + _xml_text(value) - XML_ELEMENT
            for text in (node.text, node.tail):
                if isinstance(text, str):
                    nodes += _xml_text(text)
        total += nodes * (count / len(picked))
    return total + XML_ELEMENT


@dataclass
class _Walk:
    sample: int
    budget: int
    app_names: frozenset[str]
    seen: set[int] = field(default_factory=set)
    classes: set[int] = field(default_factory=set)  # size classes of written blocks
    side: dict[int, float] = field(default_factory=dict)  # size class -> side-block bytes
    visited: int = 0
    opaque: int = 0
    kinds: dict[type, bool] = field(default_factory=dict)  # class -> a library's?

    def children(self, obj: Any) -> Iterator[tuple[object, float]]:
        """What a reader of ``obj`` reaches, each with the weight it stands for."""
        if isinstance(obj, dict):
            if len(obj) <= self.sample:
                for key, value in obj.items():
                    yield key, 1.0
                    yield value, 1.0
                return
            yield from self._drawn(_strided(obj.keys(), len(obj), self.sample), len(obj))
            yield from self._drawn(_strided(obj.values(), len(obj), DRAW), len(obj))
        elif isinstance(obj, (set, frozenset, deque)):  # a deque's middle is slow to index
            yield from self._drawn(_strided(obj, len(obj), DRAW), len(obj))
        elif _is_ndarray(obj):
            return  # its numbers are its own block; an array of objects is a sequence
        elif isinstance(obj, type):
            yield from _draw(list(vars(obj).values()), self.sample).items
        elif isinstance(obj, types.FunctionType):
            code = obj.__code__
            for item in (code, *code.co_consts, obj.__defaults__, obj.__kwdefaults__):
                yield item, 1.0
        elif isinstance(obj, types.CodeType):
            for item in obj.co_consts:
                if isinstance(item, types.CodeType):
                    yield item, 1.0
        else:
            state = getattr(obj, "__dict__", None)
            if isinstance(state, dict) and type(obj).__module__ in self.app_names:
                # The app's own objects are read through their attributes, not through
                # the bookkeeping a base class keeps in its slots (pydantic's).
                yield state, 1.0
                return
            # A library's objects hold their data in slots and C fields: the garbage
            # collector sees them (a list of one pointer each, no more than the object).
            yield from _draw(gc.get_referents(obj), self.sample).items

    def _drawn(self, items: Sequence[object], population: int) -> Iterator[tuple[object, float]]:
        """Items strided out of an unordered container, standing for ``population``."""
        for item, weight in _draw(items, self.sample).items:
            yield item, weight * population / max(len(items), 1)

    def _sequence(self, obj: Any) -> _Drawn | None:
        """The items drawn from a list, a tuple or an array of objects; None for others."""
        if isinstance(obj, (list, tuple)):
            return _draw(obj, self.sample)
        if _is_ndarray(obj) and obj.dtype.hasobject:
            return _draw(obj.flat, self.sample)  # reshape copies an array not in C order
        return None

    def _page_floor(self, drawn: _Drawn) -> float:
        """Bytes to add where the drawn items are a sample: the pages their headers are
        on set a floor under the bytes they are counted at."""
        fresh = [
            (item, weight)
            for item, weight in drawn.items
            if id(item) not in self.seen and self.follow(item, code=False)
        ]
        if not (drawn.pages and fresh):
            return 0.0
        counted = sum(weight * written(item)[0] for item, weight in fresh)
        unseen = len(fresh) / len(drawn.items)  # the rest was counted elsewhere
        return max(drawn.pages * PAGE * unseen - counted, 0.0)

    def follow(self, obj: object, code: bool) -> bool:
        """Whether ``obj`` is the app's data (or, where ``code``, the app's own code)."""
        if isinstance(obj, (types.ModuleType, types.BuiltinFunctionType)):
            return False
        if isinstance(obj, (type, types.FunctionType)):
            # Counted once, from the module that defines it; a container of classes
            # (a registry) refers to code counted there.
            return code and getattr(obj, "__module__", None) in self.app_names
        if isinstance(obj, (types.MethodType, types.MethodWrapperType)):
            return False
        return type(obj).__module__.partition(".")[0] not in FRAMEWORK

    def size(self, root: object, code: bool) -> float:
        """Blocks a reader of ``root`` writes, itself and what it reaches, by sampling. An
        object that raises when looked at (an unbound proxy) counts as opaque."""
        total = 0.0
        stack: list[tuple[object, float, bool]] = [(root, 1.0, code)]
        while stack and self.visited < self.budget:
            obj, weight, own = stack.pop()
            if id(obj) in self.seen:
                continue
            try:
                found = self._visit(obj, weight, own)
            except Exception:  # noqa: BLE001 - the app's objects may raise on any access
                self.opaque += 1
                continue
            if found is None:
                continue
            written_bytes, children = found
            total += written_bytes
            stack.extend(children)
        return total

    def _visit(
        self, obj: object, weight: float, own: bool
    ) -> tuple[float, list[tuple[object, float, bool]]] | None:
        """What a reader of ``obj`` writes of it, and what it reaches next, weighted; None
        for an object not followed."""
        if not self.follow(obj, own):
            return None
        self.seen.add(id(obj))
        self.visited += 1
        if type(obj).__module__ == "lxml.etree" and hasattr(obj, "iter"):  # an element
            self.opaque += 1
            return weight * _xml_bytes(obj, self.sample), []
        kind = type(obj)
        if kind not in self.kinds:  # asked once per class, not once per object
            self.kinds[kind] = self._library_class(kind)
        block, side = written(obj)
        total = weight * block
        if block <= SMALL:
            self.classes.add(block)
        if side:
            self.side[side] = self.side.get(side, 0.0) + weight * side
        in_class = isinstance(obj, type)
        drawn = self._sequence(obj)
        if drawn is not None:
            total += weight * self._page_floor(drawn)
        reached = drawn.items if drawn is not None else self.children(obj)
        # A class's own methods and nested classes are part of it.
        children = [
            (child, weight * share, in_class and isinstance(child, (type, types.FunctionType)))
            for child, share in reached
        ]
        return total, children

    def _library_class(self, kind: type) -> bool:
        """A class of an installed package (not the standard library, Celery's stack, the
        app or the interpreter's built-in types)."""
        try:
            module = kind.__dict__.get("__module__", getattr(kind, "__module__", None))
        except Exception:  # noqa: BLE001 - a metaclass of a library's own making
            return False
        if not isinstance(module, str) or module in self.app_names:
            return False
        top = module.partition(".")[0]
        return not (
            top in FRAMEWORK or top == "builtins" or top in getattr(sys, "stdlib_module_names", ())
        )

    def library_code(self) -> float:
        """The classes of the library objects the app's data holds, with their bases and
        methods, once each: a task calls them, and the interpreter writes the code it runs
        and the classes it looks methods up on."""
        total, done = 0.0, set()
        for kind in (kind for kind, library in self.kinds.items() if library):
            for klass in kind.__mro__:
                if klass in done or not self._library_class(klass):
                    continue
                done.add(klass)
                total += written(klass)[0]
                for value in list(vars(klass).values()):
                    function = _unwrapped(value)
                    if isinstance(function, types.FunctionType):
                        total += self._function(function)
        return total

    @staticmethod
    def _function(function: types.FunctionType) -> float:
        """A function, its code and the constants it loads (each load writes the
        constant's reference count), nested code included; not the docstrings, which
        the interpreter keeps first among the constants and never loads."""
        total = float(_small(sys.getsizeof(function)))
        codes = [function.__code__]
        while codes:
            code = codes.pop()
            total += written(code)[0]
            consts = code.co_consts
            for const in consts[1:] if consts and isinstance(consts[0], str) else consts:
                if isinstance(const, types.CodeType):
                    codes.append(const)
                elif const is not None and not isinstance(const, (bool, int)):
                    total += written(const)[0]
        return total

    def sides(self) -> float:
        """Side blocks in the size classes of written blocks: their pages are written."""
        return sum(b for size, b in self.side.items() if size in self.classes)


def census(
    modules: Mapping[str, object], roots: tuple[str, ...], sample: int = 32, budget: int = 60_000
) -> Census:
    """What the app's tasks will write, from the app's modules in ``modules``: first the
    data their globals hold, smallest first, so that a large container sampled later meets
    what is already counted; then the classes and functions each module defines, ``2 *
    sample`` of them standing for all. ``budget`` caps the objects looked at."""
    found = app_modules(modules, roots)
    walk = _Walk(sample, budget, frozenset(name for name, _ in found))
    data: list[tuple[int, object]] = []
    code: list[object] = []
    for name, module in found:
        for key, value in list(vars(module).items()):
            if key.startswith("__") and key.endswith("__"):
                continue
            try:
                if isinstance(value, (type, types.FunctionType)):
                    if getattr(value, "__module__", None) == name:
                        code.append(value)
                elif not isinstance(value, types.ModuleType):
                    length = len(value) if isinstance(value, (dict, list, tuple, set)) else 0
                    data.append((length, value))
            except Exception:  # noqa: BLE001 - an unbound proxy, a __len__ that raises
                walk.opaque += 1
    data.sort(key=lambda pair: pair[0])
    total = sum(walk.size(value, code=False) for _, value in data)
    step = max(len(code) / (2 * sample), 1.0)
    picked = [code[int(i * step)] for i in range(min(len(code), 2 * sample))]
    weight = len(code) / max(len(picked), 1)
    total += weight * sum(walk.size(value, code=True) for value in picked)
    total += walk.sides() + walk.library_code()
    return Census(int(total), len(found), walk.visited, walk.opaque)
