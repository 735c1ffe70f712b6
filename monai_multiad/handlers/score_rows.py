"""One row per test image of an evaluation: :class:`ScoreRows`, what ``scores.csv`` lists."""

from __future__ import annotations

from typing import Any

from ignite.engine import Events

__all__ = ["ScoreRows"]


class ScoreRows:
    """Evaluator handler: one row per test image (``path``, ``label``, ``score``, ``index`` in the
    data set, and ``case``, ``slice_index`` for a slice of a volume), what ``scores.csv`` lists."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        o = engine.state.output
        for i, score in enumerate(o["score"].tolist()):
            row = {"path": o["path"][i], "label": int(o["label"][i]), "score": score, "index": len(self.rows)}
            if "case" in o:  # a slice of a volume
                row.update(case=o["case"][i], slice_index=int(o["slice_index"][i]))
            self.rows.append(row)
