"""Billing on SQLAlchemy's ORM (SQLite): a task loads a customer's invoices as objects.

- ``customer_totals``: every invoice as ORM objects in one session (a transient peak),
  totals per customer;
- ``invoice``: one invoice by key (reads a part).
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from corpus_common import DATA, built_once, make_app
from sqlalchemy import ForeignKey, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

CUSTOMERS, INVOICES = 5_000, 250_000


def _build(path: Path) -> None:
    rows = random.Random(2)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customer (id INTEGER PRIMARY KEY, name TEXT, country TEXT)")
        db.execute(
            "CREATE TABLE invoice (id INTEGER PRIMARY KEY, customer_id INTEGER, amount REAL,"
            " memo TEXT)"
        )
        db.executemany(
            "INSERT INTO customer VALUES (?, ?, ?)",
            ((i, f"customer {i}", f"country {i % 60}") for i in range(CUSTOMERS)),
        )
        db.executemany(
            "INSERT INTO invoice VALUES (?, ?, ?, ?)",
            (
                (i, rows.randrange(CUSTOMERS), rows.random() * 1000, f"memo {i} " * 4)
                for i in range(INVOICES)
            ),
        )


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customer"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    country: Mapped[str]
    invoices: Mapped[list[Invoice]] = relationship(back_populates="customer")


class Invoice(Base):
    __tablename__ = "invoice"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customer.id"))
    amount: Mapped[float]
    memo: Mapped[str]
    customer: Mapped[Customer] = relationship(back_populates="invoices")


engine = create_engine(f"sqlite:///{built_once(DATA / 'billing-v1.sqlite3', _build)}")
app = make_app("sqlalchemy_billing")


@app.task
def customer_totals(country: int = 0) -> dict[str, float]:
    totals: dict[str, float] = {}
    with Session(engine) as session:
        for invoice in session.scalars(select(Invoice)):
            if invoice.customer_id % 60 == country % 60:
                name = f"customer {invoice.customer_id}"
                totals[name] = totals.get(name, 0.0) + invoice.amount
    return dict(sorted(totals.items())[:10])


@app.task
def invoice(invoice_id: int) -> float:
    with Session(engine) as session:
        found = session.get(Invoice, invoice_id % INVOICES)
        return found.amount if found is not None else 0.0


@app.task
def revenue() -> float:
    with Session(engine) as session:
        return float(session.scalar(select(func.sum(Invoice.amount))) or 0.0)
