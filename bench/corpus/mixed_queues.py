"""Cheap and hungry tasks in one worker: the mail renderer's fast tasks and the
analytics' group-by, as one deployment runs them side by side."""

from __future__ import annotations

import jinja_mail
import pandas_analytics
from corpus_common import make_app

app = make_app("mixed_queues")
app.conf.include = []
render_invoice = app.task(name="mixed_queues.render_invoice")(jinja_mail.render_invoice.run)
daily_summary = app.task(name="mixed_queues.daily_summary")(pandas_analytics.daily_summary.run)
