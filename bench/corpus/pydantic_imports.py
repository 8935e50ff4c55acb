"""Imports validated with pydantic: batches of records per task; the ids seen are kept in
module state (it grows for the child's life: a leak through module state).

- ``import_batch``: validates a batch into models (a transient peak) and remembers its ids;
- ``validate_one``: one record.
"""

from __future__ import annotations

from datetime import date

from corpus_common import make_app
from pydantic import BaseModel, Field


class Address(BaseModel):
    street: str
    city: str
    postcode: str = Field(pattern=r"^\d{5}$")


class Person(BaseModel):
    id: int
    name: str
    email: str
    born: date
    addresses: list[Address]
    tags: list[str] = []


SEEN: set[str] = set()  # ids imported by this child, for deduplication
app = make_app("pydantic_imports")


def _record(i: int) -> dict[str, object]:
    return {
        "id": i, "name": f"person {i}", "email": f"p{i}@example.org", "born": "1990-01-02",
        "addresses": [{"street": f"{i} main st", "city": "Springfield", "postcode": "12345"}],
        "tags": ["a", "b", f"t{i % 7}"],
    }  # fmt: skip


@app.task
def import_batch(start: int = 0, count: int = 20_000) -> int:
    people = [Person.model_validate(_record(i)) for i in range(start, start + count)]
    SEEN.update(f"{start}:{person.id}" for person in people)
    return len(SEEN)


@app.task
def validate_one(i: int = 0) -> str:
    return Person.model_validate(_record(i)).name
