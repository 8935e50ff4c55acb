"""What a forked child writes of its parent's memory, object by object.

Usage (root: the page map's "exclusively mapped" bit needs it)::

    .venv/bin/python bench/dirty.py [--shape pandas] [--scale 1] [--tasks 3] [--top 15]

It imports a shape app (``examples/shape_*.py``) as the worker's main process would,
collects and freezes the garbage collector as the guard does, lists the objects alive at
that moment (every object the collector tracks, the code of every function, the items of
the shape's large containers), and forks. The child runs the shape's ``use`` task, trims
its heap, and reads ``/proc/self/pagemap``: a page that became exclusively mapped was
copied. Each copied page is charged to the kinds of the objects whose headers lie on it
(a page can hold several kinds), which tells what the census should count and what it
misses: for the pandas shape, the strings of the object column, and pandas' own code,
functions and classes that the group-by runs.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import importlib
import os
import struct
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
EXCLUSIVE, PRESENT = 1 << 56, 1 << 63
LIBRARIES = ("pandas", "numpy", "lxml", "pydantic", "celery", "kombu", "billiard")


def writable_regions() -> list[tuple[int, int, str]]:
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if "w" in fields[1]:
                regions.append((start, end, fields[5] if len(fields) > 5 else "[anon]"))
    return regions


def exclusive_pages(regions: list[tuple[int, int, str]]) -> set[int]:
    """Page numbers present and mapped by this process alone."""
    found = set()
    with open("/proc/self/pagemap", "rb") as pagemap:
        for start, end, _ in regions:
            pagemap.seek(start // PAGE * 8)
            data = pagemap.read((end - start) // PAGE * 8)
            for index, (entry,) in enumerate(struct.iter_unpack("<Q", data)):
                if entry & PRESENT and entry & EXCLUSIVE:
                    found.add(start // PAGE + index)
    return found


def kind(obj: object) -> str:
    """The object's type, and for code, functions and classes the library they belong to."""
    name = type(obj).__name__
    if isinstance(obj, (types.FunctionType, type, types.CodeType)):
        where = getattr(obj, "co_filename", None) or str(getattr(obj, "__module__", ""))
        owner = next((lib for lib in LIBRARIES if lib in where), "other")
        return f"{name} ({owner})"
    return name


def alive(module: types.ModuleType) -> list[object]:
    """What the collector tracks, the code of every function, and the items of the
    module's large lists and object arrays (strings and numbers, which it does not track)."""
    objects = gc.get_objects()
    objects += [o.__code__ for o in objects if isinstance(o, types.FunctionType)]
    for value in vars(module).values():
        columns = [value]
        if hasattr(value, "columns") and hasattr(value, "__getitem__"):  # a DataFrame
            columns = [value[name].array for name in value.columns]
        for column in columns:
            items = getattr(column, "_ndarray", column)
            array = type(items).__name__ == "ndarray" and items.dtype.hasobject
            if isinstance(items, list) or array:
                objects += list({id(item): item for item in items}.values())
    return objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="pandas")
    parser.add_argument("--scale", default="1")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    options = parser.parse_args()
    os.environ.update(SHAPE_SCALE=options.scale, HEAVY_APP_GUARD="0")
    sys.path[:0] = [str(ROOT / "examples"), str(ROOT)]
    module = importlib.import_module(f"shape_{options.shape}")
    gc.collect()
    objects = alive(module)
    gc.freeze()
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    regions = writable_regions()
    before = exclusive_pages(regions)
    for _ in range(options.tasks):
        module.use.run()
    ctypes.CDLL(None).malloc_trim(0)
    copied = exclusive_pages(regions) - before
    by_kind: dict[str, set[int]] = collections.defaultdict(set)
    for obj in objects:
        page = id(obj) // PAGE
        if page in copied:
            by_kind[kind(obj)].add(page)
    charged = set().union(*by_kind.values()) if by_kind else set()
    print(f"{options.shape}: the child copied {len(copied) * PAGE / MIB:.1f} MiB "
          f"after {options.tasks} tasks; pages by the kinds of object on them:")  # fmt: skip
    ranked = sorted(by_kind.items(), key=lambda item: -len(item[1]))
    for name, pages in ranked[: options.top]:
        print(f"  {name:<32} {len(pages) * PAGE / MIB:6.1f} MiB")
    mappings: collections.Counter[str] = collections.Counter()
    for page in copied - charged:
        name = next((n for s, e, n in regions if s // PAGE <= page < e // PAGE), "?")
        mappings[Path(name).name or name] += 1
    print(f"  pages with no object header listed: {len(copied - charged) * PAGE / MIB:.1f} MiB",
          ", ".join(f"{n} {c * PAGE / MIB:.1f}" for n, c in mappings.most_common(4)))  # fmt: skip
    os._exit(0)


if __name__ == "__main__":
    main()
