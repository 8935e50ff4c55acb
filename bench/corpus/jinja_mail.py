"""Mail rendering with Jinja2: fast tasks (ms) over customers loaded at import.

- ``render_invoice``: one customer's invoice mail (reads a part);
- ``newsletter``: one mail for each of a slice of customers.
"""

from __future__ import annotations

from corpus_common import make_app
from jinja2 import DictLoader, Environment, select_autoescape

CUSTOMERS = [
    {"id": i, "name": f"Customer {i}", "lines": [{"item": f"item {j}", "price": j * 1.5}
                                                   for j in range(i % 12)]}
    for i in range(50_000)
]  # fmt: skip
TEMPLATES = Environment(
    loader=DictLoader(
        {
            "invoice.txt": "Dear {{ c.name }},\n{% for l in c.lines %}{{ l.item }}: "
            "{{ '%.2f' % l.price }}\n{% endfor %}Total: {{ c.lines|sum(attribute='price') }}",
            "news.html": "<h1>Hello {{ c.name }}</h1>{% for l in c.lines %}<p>{{ l.item }}"
            "</p>{% endfor %}",
        }
    ),
    autoescape=select_autoescape(["html"]),
)
app = make_app("jinja_mail")


@app.task
def render_invoice(customer: int) -> int:
    return len(TEMPLATES.get_template("invoice.txt").render(c=CUSTOMERS[customer % len(CUSTOMERS)]))


@app.task
def newsletter(start: int = 0, count: int = 200) -> int:
    template = TEMPLATES.get_template("news.html")
    return sum(len(template.render(c=c)) for c in CUSTOMERS[start : start + count])
