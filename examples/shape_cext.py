"""Shape ``cext``: C-extension-heavy imports, lxml and pydantic, holding their data in C.

An lxml tree lives in libxml2's own malloc'd nodes, not in Python objects: reading an
element makes a Python proxy for it and writes the proxy's address into the C node, so a
task that walks the tree copies the malloc heap pages that hold the nodes. The pydantic
records are Python objects whose fields pydantic-core's validators filled. At
``SHAPE_SCALE=1``: a document of 60k elements, 40k validated records.
"""

from __future__ import annotations

import os

from lxml import etree
from pydantic import BaseModel
from shape_common import make_app, scaled


class Record(BaseModel):
    id: int
    name: str
    price: float
    tags: list[str]


_items = "".join(
    f'<item id="{i}" price="{i * 0.5}"><name>product {i}</name><tag>t{i % 13}</tag></item>'
    for i in range(scaled(60_000))
)
TREE = etree.fromstring(f"<catalog>{_items}</catalog>".encode())
RECORDS = [
    Record(id=i, name=f"record {i}", price=i * 0.25, tags=[f"t{i % 7}", f"u{i % 11}"])
    for i in range(scaled(40_000))
]
del _items

app = make_app("shape_cext")


@app.task
def use() -> tuple[int, float]:
    """Walk the document and every record, as an export or a price check would."""
    total = 0.0
    for item in TREE.iter("item"):
        total += float(item.get("price", "0")) + len(item.findtext("name") or "")
    for record in RECORDS:
        total += record.price + len(record.name) + len(record.tags)
    return os.getpid(), total
