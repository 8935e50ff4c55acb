"""Shape ``registry``: a Django-like model registry, imported from many generated modules
of many classes (a large project's models, admin and serializers).

Classes, their dictionaries, field descriptors, functions and code objects are what this
app holds; type objects and larger dictionaries live in the malloc heap, the rest in
pymalloc's arenas. The task builds an instance of every model and calls its methods, as a
serializer or a data-quality job does. At ``SHAPE_SCALE=1``: 150 modules of 20 models
with 8 fields each (3000 classes).
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any, ClassVar

from shape_common import make_app, scaled


class Field:
    """A column: a name, a default, and a check."""

    def __init__(self, kind: str, default: Any, max_length: int | None = None) -> None:
        self.kind, self.default, self.max_length = kind, default, max_length
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def check(self, value: Any) -> bool:
        return self.max_length is None or len(str(value)) <= self.max_length


REGISTRY: dict[str, type] = {}


class ModelBase(type):
    """Collects a class's fields into ``_fields`` and registers it, as Django's does."""

    def __new__(mcs, name: str, bases: tuple[type, ...], attrs: dict[str, Any]) -> type:
        cls = super().__new__(mcs, name, bases, attrs)
        cls._fields = tuple(v for v in attrs.values() if isinstance(v, Field))  # type: ignore[attr-defined]
        if bases:
            REGISTRY[f"{attrs['__module__']}.{name}"] = cls
        return cls


class Model(metaclass=ModelBase):
    _fields: ClassVar[tuple[Field, ...]] = ()

    def __init__(self, **values: Any) -> None:
        for field in self._fields:
            setattr(self, field.name, values.get(field.name, field.default))

    def clean(self) -> bool:
        return all(field.check(getattr(self, field.name)) for field in self._fields)

    def to_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in self._fields}


TEMPLATE = '''
class {name}(Model):
    """Model {name} of {module}: generated, as a large project's models are written."""

    title = Field("char", "untitled {name}", max_length=120)
    slug = Field("char", "{slug}", max_length=50)
    count = Field("int", {number})
    price = Field("decimal", {number}.5)
    active = Field("bool", True)
    owner_id = Field("fk", {number} % 97)
    notes = Field("text", "notes for {name}")
    created = Field("datetime", "2024-01-{day:02d}T00:00:00")

    class Meta:
        ordering = ("-created", "title")
        verbose_name = "{name} entry"
        indexes = [("slug",), ("owner_id", "created")]

    def __str__(self):
        return f"{{self.title}} ({{self.slug}})"

    def get_absolute_url(self):
        return "/{module}/{slug}/%s/" % self.owner_id

    def total(self, quantity=1):
        if not self.active:
            return 0
        return self.price * quantity + self.count
'''


def _generate(modules: int, per_module: int) -> None:
    for m in range(modules):
        module_name = f"generated_app_{m}.models"
        source = "".join(
            TEMPLATE.format(
                name=f"Model{m}x{c}",
                module=f"app{m}",
                slug=f"m{m}-{c}",
                number=m * per_module + c,
                day=c % 28 + 1,
            )
            for c in range(per_module)
        )
        module = types.ModuleType(module_name)
        module.__dict__.update(Model=Model, Field=Field, __name__=module_name)
        exec(compile(source, f"<{module_name}>", "exec"), module.__dict__)
        sys.modules[module_name] = module


_generate(scaled(150), 20)

app = make_app("shape_registry")


@app.task
def use() -> tuple[int, int]:
    """Build, check and serialize one instance of every registered model."""
    total = 0
    for cls in REGISTRY.values():
        instance = cls()
        total += instance.clean() + len(instance.to_dict()) + len(str(instance))
        total += len(instance.get_absolute_url()) + int(instance.total(2))
    return os.getpid(), total
