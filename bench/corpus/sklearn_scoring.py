"""Scoring with scikit-learn: each pool child loads its model when it starts (a dear
fork, as when a model file is read in ``worker_process_init``), tasks predict batches.

- ``score``: a batch of rows through the forest (a transient peak);
- ``explain``: the forest's feature importances (reads the model only).
"""

from __future__ import annotations

import numpy as np
from celery import signals
from corpus_common import make_app
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

app = make_app("sklearn_scoring")
MODEL: RandomForestClassifier | None = None
FEATURES = 30


@signals.worker_process_init.connect
def load_model(**_: object) -> None:
    global MODEL
    x, y = make_classification(n_samples=4000, n_features=FEATURES, random_state=4)
    MODEL = RandomForestClassifier(n_estimators=60, random_state=4).fit(x, y)


def _model() -> RandomForestClassifier:
    if MODEL is None:  # a solo or threads pool: no child was forked
        load_model()
    assert MODEL is not None
    return MODEL


@app.task
def score(rows: int = 20_000, seed: int = 0) -> float:
    batch = np.random.default_rng(seed).random((rows, FEATURES))
    return float(_model().predict_proba(batch)[:, 1].mean())


@app.task
def explain() -> list[float]:
    return [float(v) for v in _model().feature_importances_[:5]]
