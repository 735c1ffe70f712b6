"""The scores of a MONAI evaluator's inputs as ``scores.csv`` and ``scores.json``: :class:`ScoreWriter`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["ScoreWriter"]


class ScoreWriter:
    """Evaluator handler: one row per input (its file, score, the decision against ``threshold`` and, for a
    scan, the top slices), taken from each decollated item's ``pred`` ``MetaTensor`` (the ``scan_score`` a
    :class:`~monai_multiad.inferers.VolumeSliceInferer` or the ``score`` an :class:`ImageAnomalyInferer`
    puts in its ``meta``), written atomically to ``output_dir`` as ``scores.csv`` and ``scores.json`` once
    the engine completes. ``threshold``: a number, a :class:`~monai_multiad.inferers.Threshold` or ``None``."""

    def __init__(self, output_dir: str | Path, threshold: Any = None, pred_key: str = "pred",
                 name: str = "scores") -> None:
        self.output_dir = Path(output_dir)
        self.threshold = getattr(threshold, "value", threshold)
        self.source = getattr(threshold, "description", None)
        self.pred_key, self.name = pred_key, name
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.write())

    def __call__(self, engine) -> None:
        items = engine.state.output
        for item in items if isinstance(items, list) else [items]:
            meta = getattr(item[self.pred_key], "meta", {})
            score = float(meta["scan_score"] if "scan_score" in meta else meta["score"])
            thr = self.threshold
            row = {"path": str(meta.get("filename_or_obj", "")), "score": score,
                   "anomalous": bool(thr is not None and score > float(thr)), "threshold": thr}
            if "top_slices" in meta:
                row["top_slices"] = [int(v) for v in torch.as_tensor(meta["top_slices"]).reshape(-1).tolist()]
            if meta.get("saved_to"):
                row["map"] = str(meta["saved_to"])
            self.rows.append(row)

    def write(self) -> None:
        import csv
        import io

        from monai_multiad.outputs import write_json, write_text

        fields = ["path", "score", "anomalous", "threshold", "top_slices", "map"]
        text = io.StringIO()
        writer = csv.DictWriter(text, fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({**r, "top_slices": " ".join(map(str, r.get("top_slices", [])))})
        write_text(self.output_dir / f"{self.name}.csv", text.getvalue())
        write_json(self.output_dir / f"{self.name}.json", {"threshold": self.threshold,
                                                          "threshold_source": self.source, "rows": self.rows})
