"""Feeds with lxml and BeautifulSoup: a catalogue feed parsed at import, pages scraped
per task.

- ``search``: an XPath query over the whole parsed feed (reads all of the tree);
- ``scrape``: a page built per task, parsed by BeautifulSoup (a transient peak);
- ``item``: one element by position (reads a part).
"""

from __future__ import annotations

from bs4 import BeautifulSoup
from corpus_common import make_app
from lxml import etree

ITEMS = 60_000


def _feed() -> bytes:
    items = "".join(
        f"<item id='{i}'><title>Item {i}</title><price>{i % 500}.99</price>"
        f"<tags><tag>t{i % 13}</tag><tag>t{i % 29}</tag></tags></item>"
        for i in range(ITEMS)
    )
    return f"<catalogue>{items}</catalogue>".encode()


FEED = etree.fromstring(_feed())
app = make_app("lxml_feeds")


@app.task
def search(tag: str = "t7") -> int:
    return len(FEED.xpath("//item[tags/tag=$tag]", tag=tag))


@app.task
def item(position: int) -> str:
    return FEED[position % ITEMS].findtext("title") or ""


@app.task
def scrape(rows: int = 3000) -> int:
    page = (
        "<html><body><table>"
        + "".join(
            f"<tr><td class='name'>row {i}</td><td><a href='/r/{i}'>link</a></td></tr>"
            for i in range(rows)
        )
        + "</table></body></html>"
    )
    soup = BeautifulSoup(page, "html.parser")
    return len(soup.select("td.name"))
