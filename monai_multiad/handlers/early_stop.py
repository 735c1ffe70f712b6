"""Early stopping whose count survives a resume: :class:`EarlyStop`."""

from __future__ import annotations

from monai.handlers import EarlyStopHandler

__all__ = ["EarlyStop"]


class EarlyStop(EarlyStopHandler):
    """MONAI's ``EarlyStopHandler`` whose count a checkpoint saves and loads (``state_dict``, that of
    the Ignite ``EarlyStopping`` it runs), so a resumed run goes on counting epochs without progress."""

    def state_dict(self) -> dict:
        return self._handler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._handler.load_state_dict(state_dict)
