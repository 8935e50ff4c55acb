"""A shop on Django's ORM (SQLite): products cached at import, reports over orders.

- ``sales_report``: a queryset aggregate over every order, then the product names from
  the module-level cache (reads all of the cache);
- ``product_page``: one product from the cache and its last orders (reads a part);
- ``ping``: reads nothing.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import django
from corpus_common import DATA, built_once, make_app
from django.conf import settings

PRODUCTS, ORDERS = 60_000, 300_000


def _build(path: Path) -> None:
    rows = random.Random(1)
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE shop_product (id INTEGER PRIMARY KEY, name TEXT, category TEXT,"
            " description TEXT, price REAL)"
        )
        db.execute(
            "CREATE TABLE shop_order (id INTEGER PRIMARY KEY, product_id INTEGER,"
            " quantity INTEGER, customer TEXT)"
        )
        db.executemany(
            "INSERT INTO shop_product VALUES (?, ?, ?, ?, ?)",
            (
                (i, f"product {i}", f"category {i % 40}", "lorem ipsum " * 8, i % 997 / 10)
                for i in range(PRODUCTS)
            ),
        )
        db.executemany(
            "INSERT INTO shop_order VALUES (?, ?, ?, ?)",
            (
                (i, rows.randrange(PRODUCTS), rows.randrange(1, 5), f"customer {i % 5000}")
                for i in range(ORDERS)
            ),
        )


settings.configure(
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(built_once(DATA / "django_shop-v1.sqlite3", _build)),
        }
    },
    INSTALLED_APPS=[],
    USE_TZ=True,
)
django.setup()

from django.db import models  # noqa: E402
from django.db.models import Count, Sum  # noqa: E402


class Product(models.Model):
    name = models.TextField()
    category = models.TextField()
    description = models.TextField()
    price = models.FloatField()

    class Meta:
        app_label = "shop"


class Order(models.Model):
    product = models.ForeignKey(Product, on_delete=models.CASCADE)
    quantity = models.IntegerField()
    customer = models.TextField()

    class Meta:
        app_label = "shop"


# The catalogue, cached at import as many apps do: every pool child shares it.
CATALOGUE = {product.id: product for product in Product.objects.all()}

app = make_app("django_shop")


@app.task
def sales_report(top: int = 20) -> list[tuple[str, int]]:
    sold = (
        Order.objects.values("product_id")
        .annotate(units=Sum("quantity"), orders=Count("id"))
        .order_by("-units")
    )
    by_category: dict[str, int] = {}
    for row in sold:
        product = CATALOGUE[row["product_id"]]
        by_category[product.category] = by_category.get(product.category, 0) + row["units"]
    return sorted(by_category.items(), key=lambda item: -item[1])[:top]


@app.task
def product_page(product_id: int) -> dict[str, object]:
    product = CATALOGUE[product_id % PRODUCTS]
    recent = list(Order.objects.filter(product_id=product.id).order_by("-id")[:20])
    return {"name": product.name, "price": product.price, "orders": len(recent)}


@app.task
def ping() -> str:
    return "pong"
