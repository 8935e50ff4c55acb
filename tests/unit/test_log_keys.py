"""Every key of every line the guard logs has one meaning, written once (issue 24).

The lines are read from the code, not from a list kept by hand: an AST walk over
``celery_guard/*.py`` finds each call that logs a line (``emit``, ``format_event``, a
traceback's literal ``"celery-guard event=..."``) and the keys of the fields it passes. It
follows a name to what it is bound to and what is added to it (``fields["x"] = ...``,
``.update(x=...)``), a call to the function or method that builds the fields (its
``return``), a parameter to the calls that pass it (a wrapper's ``**extra``: the keywords
of each call), and a dataclass field to the constructions that fill it. A form it cannot
read fails, named, rather than hiding keys; the ones it knows to leave are in
``PASSED_AS_VALUES``, each with its reason.

docs/logs.md holds the glossary: one row per key, its one meaning and its unit, which the
key's suffix must say (``_mib`` is MiB wherever it appears).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from celery_guard.logline import PREFIX, parse_line

ROOT = Path(__file__).resolve().parent.parent.parent
PACKAGE = ROOT / "celery_guard"
LOGS = ROOT / "docs" / "logs.md"
GLOSSARY = "## Keys"

#: Parameters whose function is also passed as a value, and called where the walk cannot
#: see it: (module, function, parameter) and why no keys come that way.
PASSED_AS_VALUES = {
    ("telemetry.py", "snapshot", "more"): "metrics.py calls Collector.snapshot through its "
    "`snapshot` attribute with no arguments: `more` stays None there; the guard's call, "
    "which passes the governor's figures, is read",
}

#: The suffixes that say a key's unit, longest first, and the unit the glossary writes.
UNITS = {"_per_s": "per s", "_mib": "MiB", "_kib": "KiB", "_ms": "ms", "_us": "µs", "_s": "s"}

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


class Unreadable(Exception):
    """A form of fields the walk cannot read."""


def _name(node: ast.expr) -> str | None:
    """The name a call or annotation ends in: ``f``, ``x.f`` -> ``f``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _own_nodes(scope: ast.AST) -> Iterator[ast.AST]:
    """The nodes of a function's body, not of the functions and classes inside it."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (*FUNCTIONS, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


class Package:
    """The package's syntax trees, and what the walk asks of them."""

    def __init__(self, root: Path) -> None:
        self.trees = {path.name: ast.parse(path.read_text()) for path in sorted(root.glob("*.py"))}
        self.parent: dict[ast.AST, ast.AST] = {}
        self.module: dict[ast.AST, str] = {}
        self.classes: dict[str, list[ast.ClassDef]] = {}
        self.calls: list[ast.Call] = []
        #: names referred to other than as the function of a call (a callback, a method
        #: passed on): their calls are not all visible
        self.values: set[str] = set()
        called: set[int] = set()
        for module, tree in self.trees.items():
            for node in ast.walk(tree):
                self.module[node] = module
                for child in ast.iter_child_nodes(node):
                    self.parent[child] = node
                if isinstance(node, ast.ClassDef):
                    self.classes.setdefault(node.name, []).append(node)
                elif isinstance(node, ast.Call):
                    self.calls.append(node)
                    called.add(id(node.func))
        for tree in self.trees.values():
            for node in ast.walk(tree):
                if isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in called:
                    if isinstance(node.ctx, ast.Load):
                        self.values.add(_name(node) or "")

    # -- where a node is --------------------------------------------------------------
    def where(self, node: ast.AST) -> str:
        return f"{self.module[node]}:{getattr(node, 'lineno', '?')} {ast.unparse(node)[:80]}"

    def enclosing(self, node: ast.AST, kinds: tuple[type, ...]) -> ast.AST | None:
        while node in self.parent:
            node = self.parent[node]
            if isinstance(node, kinds):
                return node
        return None

    def scope(self, node: ast.AST) -> ast.AST:
        """The function a node is in, else its module."""
        found = self.enclosing(node, FUNCTIONS)
        return found if found is not None else self.trees[self.module[node]]

    def class_named(self, expr: ast.expr, at: ast.AST) -> ast.ClassDef | None:
        """The package's class an expression names: ``mod.C``, or ``C`` of this module
        or of the package."""
        found = self.classes.get(_name(expr) or "", [])
        if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
            found = [c for c in found if self.module[c] == expr.value.id + ".py"]
        elif len(found) > 1:
            found = [c for c in found if self.module[c] == self.module[at]]
        if len(found) > 1:
            raise Unreadable(f"which class {_name(expr)}: {self.where(at)}")
        return found[0] if found else None

    def owner(self, function: ast.AST) -> ast.ClassDef | None:
        """The class a function is a method of."""
        parent = self.parent.get(function)
        return parent if isinstance(parent, ast.ClassDef) else None

    # -- what a name is ---------------------------------------------------------------
    def functions(self, call: ast.Call) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
        """The definitions a call runs: a method of the receiver's class, a function of
        the module named, or the one function of that name in the package."""
        func = call.func
        if isinstance(func, ast.Attribute) and not (
            isinstance(func.value, ast.Name) and func.value.id + ".py" in self.trees
        ):
            return [self.method(self.class_of(func.value), func.attr, call)]
        name = _name(func)
        modules = (
            [func.value.id + ".py"]
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            else [self.module[call], *self.trees]
        )
        for module in modules:
            found = [
                node
                for node in self.trees[module].body
                if isinstance(node, FUNCTIONS) and node.name == name
            ]
            if found:
                return found
        raise Unreadable(f"no function {name}: {self.where(call)}")

    def method(
        self, cls: ast.ClassDef, name: str, at: ast.AST
    ) -> ast.FunctionDef | ast.AsyncFunctionDef:
        for node in cls.body:
            if isinstance(node, FUNCTIONS) and node.name == name:
                return node
        raise Unreadable(f"no method {cls.name}.{name}: {self.where(at)}")

    def class_of(self, expr: ast.expr) -> ast.ClassDef:
        """The class of the object an expression gives (the fields' builders' owners)."""
        if isinstance(expr, ast.Name) and expr.id == "self":
            cls = self.owner(self.scope(expr))
            if cls is not None:
                return cls
        if isinstance(expr, ast.Call):
            cls = self.class_named(expr.func, expr)
            if cls is not None:
                return cls
            (function,) = self.functions(expr)
            return self.annotated(function.returns, expr)
        if isinstance(expr, ast.Name):
            found = {id(c): c for c in self._classes_bound(expr)}
            if len(found) == 1:
                return next(iter(found.values()))
        if isinstance(expr, ast.Attribute):  # annotated: self.x: T = ..., or a field x: T
            cls = self.class_of(expr.value)
            for node in [*cls.body, *ast.walk(cls)]:
                if isinstance(node, ast.AnnAssign) and (
                    _attribute_named(node.target, expr.attr)
                    or (node in cls.body and _named(node.target, expr.attr))
                ):
                    return self.annotated(node.annotation, expr)
        raise Unreadable(f"the class of {self.where(expr)}")

    def _classes_bound(self, name: ast.Name) -> Iterator[ast.ClassDef]:
        scope = self.scope(name)
        for node in _own_nodes(scope):
            if isinstance(node, ast.Assign) and any(_named(t, name.id) for t in node.targets):
                yield self.class_of(node.value)
            elif isinstance(node, ast.For) and _named(node.target, name.id):
                if not isinstance(node.iter, ast.Call):
                    raise Unreadable(f"the items of {self.where(node.iter)}")
                (function,) = self.functions(node.iter)
                returns = function.returns
                if not isinstance(returns, ast.Subscript):  # list[Advice], Iterator[...]
                    raise Unreadable(f"the items of {self.where(node.iter)}")
                yield self.annotated(returns.slice, node.iter)
        if isinstance(scope, FUNCTIONS):
            for arg in [*scope.args.posonlyargs, *scope.args.args, *scope.args.kwonlyargs]:
                if arg.arg == name.id and arg.annotation is not None:
                    yield self.annotated(arg.annotation, name)

    def annotated(self, annotation: ast.expr | None, at: ast.AST) -> ast.ClassDef:
        """The package's class an annotation names (``X | None`` is ``X``)."""
        if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
            sides = [annotation.left, annotation.right]
            kept = [s for s in sides if not (isinstance(s, ast.Constant) and s.value is None)]
            if len(kept) == 1:
                return self.annotated(kept[0], at)
        cls = self.class_named(annotation, at) if annotation is not None else None
        if cls is not None:
            return cls
        raise Unreadable(f"no class of the package in the annotation at {self.where(at)}")

    # -- the keys of the fields -------------------------------------------------------
    def keys(self, expr: ast.expr, seen: frozenset[int] = frozenset()) -> set[str]:
        """Every key the fields an expression gives may have."""
        if id(expr) in seen:  # a cycle: its keys are counted where it started
            return set()
        seen |= {id(expr)}
        if isinstance(expr, ast.Dict):
            found: set[str] = set()
            for key, value in zip(expr.keys, expr.values, strict=True):
                if key is None:
                    found |= self.keys(value, seen)
                elif isinstance(key, ast.Constant) and isinstance(key.value, str):
                    found.add(key.value)
                else:
                    raise Unreadable(f"a key that is not a literal: {self.where(key)}")
            return found
        if isinstance(expr, ast.Constant) and expr.value is None:
            return set()
        if isinstance(expr, ast.IfExp):
            return self.keys(expr.body, seen) | self.keys(expr.orelse, seen)
        if isinstance(expr, ast.BoolOp):
            return set().union(*(self.keys(value, seen) for value in expr.values))
        if isinstance(expr, ast.Call):
            if isinstance(expr.func, ast.Name) and expr.func.id == "dict":
                return self._arguments(expr, seen)
            return set().union(*(self._returned(f, seen) for f in self.functions(expr)))
        if isinstance(expr, ast.Name):
            return self._bound(expr.id, expr, seen)
        if isinstance(expr, ast.Attribute):
            return self._attribute(self.class_of(expr.value), expr, seen)
        raise Unreadable(f"fields the walk cannot read: {self.where(expr)}")

    def _arguments(self, call: ast.Call, seen: frozenset[int]) -> set[str]:
        """``dict(...)`` or ``.update(...)``: the keywords and the mappings given."""
        found = {k.arg for k in call.keywords if k.arg is not None}
        for value in [*call.args, *(k.value for k in call.keywords if k.arg is None)]:
            found |= self.keys(value, seen)
        return found

    def _returned(self, function: ast.AST, seen: frozenset[int]) -> set[str]:
        returns = [n for n in _own_nodes(function) if isinstance(n, ast.Return) and n.value]
        if not returns:
            raise Unreadable(f"returns nothing: {self.where(function)}")
        return set().union(*(self.keys(r.value, seen) for r in returns if r.value))

    def _bound(self, name: str, at: ast.AST, seen: frozenset[int]) -> set[str]:
        """A name's keys where it is used (``at``): the assignments that may reach it
        and the keys added to what they bound; a parameter's, from the calls that pass
        it; a closure's, from the function around."""
        scope = self.scope(at)
        reaching, whole = self._reaching(name, at, scope)
        found = set().union(*(self.keys(a.value, seen) for a in reaching if a.value))
        if reaching:
            found |= self._added(scope, name, min(a.lineno for a in reaching), seen)
        if whole:
            return found
        if isinstance(scope, FUNCTIONS) and name in _parameters(scope):
            return found | self._passed(scope, name, seen) | self._added(scope, name, 0, seen)
        if reaching:
            return found
        if isinstance(scope, FUNCTIONS):  # a closure's name: where the function is defined
            return self._bound(name, scope, seen)
        raise Unreadable(f"where {name} comes from: {self.where(at)}")

    def _reaching(
        self, name: str, use: ast.AST, scope: ast.AST
    ) -> tuple[list[ast.Assign | ast.AnnAssign], bool]:
        """The assignments to a name that may reach its use, going back from it through
        the statements before it, block by block out to the function, and whether one of
        them binds it on every path (one in the use's own block or a block around it)."""
        found: list[ast.Assign | ast.AnnAssign] = []
        node = use
        while node is not scope and node in self.parent:
            parent = self.parent[node]
            for block in _blocks(parent):
                if node not in block:
                    continue
                for before in reversed(block[: block.index(node)]):
                    if _assigns(before, name):
                        return [*found, before], True
                    found += [n for n in _statements(before) if _assigns(n, name)]
            if isinstance(parent, ast.Try) and node not in parent.body:
                # a handler, else or finally: the try's body ran, all or part of it
                found += [n for s in parent.body for n in _statements(s) if _assigns(n, name)]
            node = parent
        return found, False

    def _added(self, scope: ast.AST, name: str, since: int, seen: frozenset[int]) -> set[str]:
        """The keys a function adds to a name's fields from line ``since`` on:
        ``name["key"] = ...``, ``name.update(...)``, ``name |= ...``; a name bound by a
        loop or a ``with`` cannot be read."""
        found: set[str] = set()
        for node in _own_nodes(scope):
            if getattr(node, "lineno", since) < since:
                continue
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    found |= self._stored(target, name)
                    if _unpacks(target, name):
                        raise Unreadable(f"{name} unpacked: {self.where(node)}")
            elif isinstance(node, ast.AugAssign) and _named(node.target, name):
                found |= self.keys(node.value, seen)
            elif isinstance(node, (ast.For, ast.With, ast.NamedExpr)):
                targets = [getattr(node, "target", None)] + [
                    item.optional_vars for item in getattr(node, "items", [])
                ]
                if any(t is not None and (_named(t, name) or _unpacks(t, name)) for t in targets):
                    raise Unreadable(f"{name} bound by {type(node).__name__}: {self.where(node)}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and _named(node.func.value, name)
                and node.func.attr in ("update", "setdefault")
            ):
                if node.func.attr == "update":
                    found |= self._arguments(node, seen)
                elif isinstance(node.args[0], ast.Constant):
                    found.add(str(node.args[0].value))
                else:
                    raise Unreadable(f"a key that is not a literal: {self.where(node)}")
        return found

    def _stored(self, target: ast.expr, name: str) -> set[str]:
        """``name["key"] = ...``: the key."""
        if isinstance(target, ast.Subscript) and _named(target.value, name):
            if isinstance(target.slice, ast.Constant) and isinstance(target.slice.value, str):
                return {target.slice.value}
            raise Unreadable(f"a key that is not a literal: {self.where(target)}")
        return set()

    def _passed(
        self, function: ast.FunctionDef | ast.AsyncFunctionDef, name: str, seen: frozenset[int]
    ) -> set[str]:
        """A parameter's keys, from every call of its function: the argument in its place,
        or for ``**extra`` the keywords the function does not name."""
        known = (self.module[function], function.name, name)
        if function.name in self.values and known not in PASSED_AS_VALUES:
            raise Unreadable(
                f"{function.name} is passed as a value, its calls unseen: {self.where(function)}"
            )
        args = function.args
        positional = [a.arg for a in [*args.posonlyargs, *args.args]]
        if self.owner(function) is not None and "staticmethod" not in {
            _name(d) for d in function.decorator_list
        }:
            positional = positional[1:]  # self, cls
        named = set(positional) | {a.arg for a in args.kwonlyargs}
        calls = [c for c in self.calls if _name(c.func) == function.name]
        if not calls:
            raise Unreadable(f"no call of {function.name} to read {name} from")
        found: set[str] = set()
        for call in calls:
            if any(isinstance(a, ast.Starred) for a in call.args):
                raise Unreadable(f"*args: {self.where(call)}")
            if args.kwarg is not None and args.kwarg.arg == name:
                found |= {k.arg for k in call.keywords if k.arg and k.arg not in named}
                spread = [k.value for k in call.keywords if k.arg is None]
            else:
                index = positional.index(name) if name in positional else len(call.args)
                spread = [k.value for k in call.keywords if k.arg == name]
                spread += call.args[index : index + 1]
            for value in spread:
                found |= self.keys(value, seen)
        return found

    def _attribute(
        self, cls: ast.ClassDef, attribute: ast.Attribute, seen: frozenset[int]
    ) -> set[str]:
        """An attribute's keys: what its class's methods set it to, or for a dataclass
        field, what each construction of the class passes in its place."""
        found: set[str] = set()
        bound = False
        for node in ast.walk(cls):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(_attribute_named(t, attribute.attr) for t in targets):
                    bound = True
                    found |= self.keys(node.value, seen)
        fields = _init_fields(cls)
        if attribute.attr in fields:
            bound = True
            index = fields.index(attribute.attr)
            for call in self.calls:
                if _name(call.func) != cls.name or self.class_named(call.func, call) is not cls:
                    continue
                given = [k.value for k in call.keywords if k.arg == attribute.attr]
                for value in given + call.args[index : index + 1]:
                    found |= self.keys(value, seen)
        if not bound:
            raise Unreadable(f"what sets {cls.name}.{attribute.attr}: {self.where(attribute)}")
        return found


def _named(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _attribute_named(node: ast.AST, attr: str) -> bool:
    """``self.attr``."""
    return isinstance(node, ast.Attribute) and _named(node.value, "self") and node.attr == attr


def _init_fields(cls: ast.ClassDef) -> list[str]:
    """A dataclass's fields in the order its constructor takes them (none for a class
    that is not a dataclass); a ``ClassVar`` or a field left out of ``__init__`` is no
    argument."""
    if "dataclass" not in {
        _name(d.func if isinstance(d, ast.Call) else d) for d in cls.decorator_list
    }:
        return []
    fields = []
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if "ClassVar" in ast.unparse(node.annotation):
            continue
        value = node.value
        if isinstance(value, ast.Call) and any(
            k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
            for k in value.keywords
        ):
            continue
        fields.append(node.target.id)
    return fields


def _assigns(node: ast.AST, name: str) -> bool:
    """An assignment that binds ``name`` to a new value."""
    if isinstance(node, ast.Assign):
        return any(_named(target, name) for target in node.targets)
    return isinstance(node, ast.AnnAssign) and node.value is not None and _named(node.target, name)


def _blocks(node: ast.AST) -> list[list[ast.AST]]:
    """The statement lists of a compound statement (a try's handlers as one)."""
    names = ("body", "orelse", "finalbody", "handlers")
    return [block for block in (getattr(node, n, None) for n in names) if isinstance(block, list)]


def _statements(node: ast.AST) -> Iterator[ast.AST]:
    """A statement and the ones inside it, not inside a function or class it defines."""
    if not isinstance(node, (*FUNCTIONS, ast.ClassDef)):
        yield node
        yield from _own_nodes(node)


def _unpacks(node: ast.AST, name: str) -> bool:
    return isinstance(node, (ast.Tuple, ast.List)) and any(
        _named(n, name) or _unpacks(n, name) for n in node.elts
    )


def _parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    args = function.args
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    return {a.arg for a in every if a is not None}


# -- the lines --------------------------------------------------------------------------
def _logger_call(call: ast.Call) -> bool:
    """``logger.warning(...)`` or ``logging.getLogger("celery_guard").warning(...)``."""
    func = call.func
    if not isinstance(func, ast.Attribute) or func.attr not in LOG_METHODS:
        return False
    target = func.value
    if _named(target, "logger"):
        return True
    return (
        isinstance(target, ast.Call)
        and _name(target.func) == "getLogger"
        and bool(target.args)
        and isinstance(target.args[0], ast.Constant)
        and target.args[0].value == "celery_guard"
    )


#: What the walk finds: event -> key -> the modules whose lines of that event have it.
Lines = dict[str, dict[str, set[str]]]


def walk(package: Package) -> tuple[Lines, list[str]]:
    """Every event the package logs, the keys its lines may have and where they are
    logged; and what the walk could not read."""
    lines: Lines = {}
    unreadable: list[str] = []
    for call in package.calls:
        module, name = package.module[call], _name(call.func)
        if module == "logline.py":  # where emit and format_event are defined
            continue
        if name in ("emit", "format_event"):
            event, fields = call.args[1:3] if name == "emit" else call.args[:2]
        elif _logger_call(call):
            message = call.args[1 if name == "log" else 0]
            text = message.value if isinstance(message, ast.Constant) else None
            if not (isinstance(text, str) and text.startswith(PREFIX + "event=")):
                unreadable.append(f"a guard line that is not a literal: {package.where(call)}")
                continue
            parsed = parse_line(text)  # a traceback's line: "... stage=%s"
            event_keys = lines.setdefault(parsed.pop("event"), {})
            for key in parsed:
                event_keys.setdefault(key, set()).add(module)
            continue
        else:
            continue
        if not (isinstance(event, ast.Constant) and isinstance(event.value, str)):
            unreadable.append(f"an event that is not a literal: {package.where(call)}")
            continue
        try:
            found = package.keys(fields)
        except Unreadable as error:
            unreadable.append(str(error))
            continue
        event_keys = lines.setdefault(event.value, {})
        for key in found:
            event_keys.setdefault(key, set()).add(module)
    return lines, unreadable


@cache
def walked() -> tuple[Lines, tuple[str, ...]]:
    lines, unreadable = walk(Package(PACKAGE))
    return lines, tuple(unreadable)


def emitted() -> dict[str, set[str]]:
    """Every event the package logs, and the keys its lines may have."""
    return {event: set(keys) for event, keys in walked()[0].items()}


def emitted_keys() -> set[str]:
    return set().union(*emitted().values())


@cache
def glossary() -> dict[str, tuple[str, str]]:
    """docs/logs.md's glossary: key -> (meaning, unit)."""
    text = LOGS.read_text()
    assert GLOSSARY in text, f"docs/logs.md has no section {GLOSSARY!r}"
    table = text[text.index(GLOSSARY) :].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \| (.+?) \|$", table, re.M)
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    return {key: (meaning, unit) for key, meaning, unit in rows}


def sections() -> dict[str, str]:
    """docs/logs.md's section of each event, by event."""
    parts = re.split(r"^## ", LOGS.read_text(), flags=re.M)
    return {m.group(1): part for part in parts if (m := re.match(r"`event=(\w+)`\n", part))}


def test_the_walk_reads_every_line() -> None:
    """No line whose event or keys the walk cannot read: write the fields in a form it
    follows (a literal, a name bound in the function, a function that returns them, a
    parameter its calls fill), or list the exception in PASSED_AS_VALUES with why."""
    assert walked()[1] == ()


def test_the_walk_follows_every_way_the_fields_are_built() -> None:
    """Keys that only reach a line through each path the walk follows, so that a path
    it stopped following would show here rather than as missing keys nobody sees."""
    lines = emitted()
    expected = {
        # the contract's startup keys: a method of the class a function's return names
        "startup": {"mode", "pool", "limit_mib", "limit_source", "headroom_mib",
                    "parent_rss_mib", "child_estimate_mib", "child_estimate_source",
                    "requested", "concurrency", "action", "autoscale_min", "error"},
        # a wrapper's **extra from its calls' keywords; .update(); name["key"] = ...
        "pressure": {"held_s", "added", "task_id", "observe", "exit_status", "what"},
        # a parameter from its caller, a method of an annotated attribute, self.planned
        "summary": {"holds", "plan_vanilla_concurrency", "task_limit_top",
                    "alternative_concurrency"},
        # a dataclass field, from each construction of the class
        "advice": {"host_cpus", "prefetch_multiplier", "on", "task", "parent_rss_kib"},
        # a mapping spread from a conditional expression
        "config_error": {"option", "variable", "accepted"},
        # a traceback's literal line
        "error": {"stage", "failures", "task", "effect"},
        # a name bound in an except clause, then again
        "check": {"error", "recommended_memory_limit_mib", "usage_measured"},
    }  # fmt: skip
    for event, keys in expected.items():
        assert keys <= lines.get(event, set()), (event, sorted(keys - lines.get(event, set())))
    assert "fix" not in lines["config_error"]  # another event's fields, in the same function


def test_every_event_has_a_section() -> None:
    events = set(emitted())
    assert {"startup", "summary", "pressure", "config_error", "check", "error"} <= events
    assert events <= set(sections()), sorted(events - set(sections()))


def test_each_section_names_every_key_of_its_event() -> None:
    """An event's section names each key its lines may have (in code: `key` or
    `key=...`); a section may take another's keys by saying "the keys of `event=...`"."""
    found = sections()
    missing = {}
    for event, keys in sorted(emitted().items()):
        text = found.get(event, "")
        for other in re.findall(r"the keys of `event=(\w+)`", text):
            text += found.get(other, "")
        named = set(re.findall(r"`[^`]*`", text))
        lost = {k for k in keys if not any(re.search(rf"\b{k}\b", code) for code in named)}
        if lost:
            missing[event] = sorted(lost)
    assert missing == {}


def test_every_emitted_key_is_in_the_glossary() -> None:
    assert sorted(emitted_keys() - set(glossary())) == []


def test_the_glossary_lists_only_keys_a_line_has() -> None:
    assert sorted(set(glossary()) - emitted_keys()) == []


def test_a_keys_suffix_says_its_unit() -> None:
    """``_mib`` is MiB, ``_ms`` milliseconds... wherever the key appears; and a key
    whose glossary unit is one of those ends in its suffix."""
    wrong = []
    for key, (_, unit) in sorted(glossary().items()):
        suffix = next((s for s in UNITS if key.endswith(s)), None)
        if unit != UNITS.get(suffix or "", unit) or (suffix is None and unit in UNITS.values()):
            wrong.append((key, unit))
    assert wrong == []


#: Keys renamed because they meant different things in different lines (issue 24): the
#: events that may still write each, so that the old meaning does not come back.
RENAMED = {
    # the cgroup's charge; a pressure line's figure is unreclaimable_mib (or rss_mib)
    "usage_mib": {"oom", "summary"},
    # the worker's limit; a task's own is task_limit_mib
    "limit_mib": {"startup", "check", "summary", "pressure", "oom"},
    # the worker's children OOM-killed; the cgroup's own counter is cgroup_oom_kills
    "oom_kills": {"summary"},
    # a process's RSS; what a module's import adds to the main process is main_mib
    "rss_mib": {"child", "oom", "pressure"},
    # tasks a child ran; the tasks a module defines are defined_tasks
    "tasks": {"child", "recycle"},
}


@pytest.mark.parametrize("key", sorted(RENAMED))
def test_a_renamed_key_stays_out_of_the_lines_it_left(key: str) -> None:
    writers = {event for event, keys in emitted().items() if key in keys}
    assert writers <= RENAMED[key], sorted(writers - RENAMED[key])


# -- the walk itself, on a package made up for it --------------------------------------
def _made_up(tmp_path: Path, source: str) -> tuple[Lines, list[str]]:
    (tmp_path / "made_up.py").write_text(source)
    return walk(Package(tmp_path))


def test_the_walk_finds_a_new_key_without_being_told(tmp_path: Path) -> None:
    """Through a wrapper's ``**extra``, a method of a dataclass whose field its
    constructions fill, and a closure: each key a line gets, no list told."""
    lines, unreadable = _made_up(
        tmp_path,
        "def _line(level, **extra):\n"
        "    fields = {'worker': 'w', **extra}\n"
        "    fields['observe'] = True\n"
        "    emit(level, 'made_up', fields)\n"
        "def act():\n"
        "    extra = {'pid': 1}\n"
        "    extra.update(task_id='t')\n"
        "    _line(20, brand_new_mib=1.0, **extra)\n"
        "@dataclass(frozen=True)\n"
        "class Tip:\n"
        "    topic: str\n"
        "    figures: dict\n"
        "    def fields(self):\n"
        "        return {'topic': self.topic, **self.figures}\n"
        "def tips() -> list[Tip]:\n"
        "    return [Tip('a', {'host_cpus': 2}), Tip('b', figures={'on': 'x'})]\n"
        "def advise():\n"
        "    for tip in tips():\n"
        "        emit(30, 'tip', tip.fields())\n"
        "def outer():\n"
        "    fields = {'stage': 'x'}\n"
        "    def inner():\n"
        "        emit(40, 'error', fields)\n",
    )
    assert unreadable == []
    assert set(lines["made_up"]) == {"worker", "observe", "brand_new_mib", "pid", "task_id"}
    assert set(lines["tip"]) == {"topic", "host_cpus", "on"}
    assert set(lines["error"]) == {"stage"}


def test_the_walk_names_what_it_cannot_read(tmp_path: Path) -> None:
    _, unreadable = _made_up(
        tmp_path,
        "FIELDS = [{'a': 1}]\n"
        "def log(name, key, callback):\n"
        "    emit(20, name, {})\n"
        "    emit(20, 'made_up', FIELDS[0])\n"
        "    emit(20, 'made_up', {key: 1})\n"
        "    logger.info(f'celery-guard event=made_up {key}=1')\n"
        "def later(fields):\n"
        "    emit(20, 'made_up', fields)\n"
        "log('x', 'y', later)\n",
    )
    assert len(unreadable) == 5, unreadable
    said = "\n".join(unreadable)
    assert "an event that is not a literal: made_up.py:3" in said
    assert "fields the walk cannot read: made_up.py:4" in said
    assert "a key that is not a literal: made_up.py:5" in said
    assert "a guard line that is not a literal: made_up.py:6" in said
    assert "later is passed as a value" in said


if __name__ == "__main__":  # what the walk finds, to read: event, then its keys
    found, missed = walked()
    for event_name, event_keys in sorted(found.items()):
        print(event_name, " ".join(sorted(event_keys)))
    print(*missed, sep="\n")
