"""The trainer's named events and the table of who listens to them (loggers, notes, benchmarks).

    events = Events()
    events.add(CsvLogger(exp).handlers())          # {"on_epoch_end": ..., ...}: names checked against EVENTS
    events.fire("on_epoch_end", row, state)        # rank 0 only: the trainer fires, listeners never decide

A listener is a plain mapping from event name to a callable; nothing is looked up by attribute name.
EVENTS lists the events in the order a run fires them, with their arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

# name -> the arguments its handlers get (the trainer fires them on rank 0 only)
EVENTS: dict[str, str] = {
    "on_train_start": "(state: TrainState) the run is set up and about to train (state: where it starts)",
    "on_epoch_start": "(epoch: int) 0-based",
    "on_eval_end": "(metrics: dict, state: TrainState) a validation while training; metrics of val + negatives",
    "on_epoch_end": "(row: dict, state: TrainState) the epoch's history row: losses, LRs, metrics, times",
    "on_save_state": "(training: dict) last.pt is about to be written: add this listener's own resume state",
    "on_checkpoint": "(path: Path) best.pt or last.pt was just written",
    "on_train_end": "(results: dict, step: int) best.pt's final metrics per split ({split: {metric: value}})",
    "on_teardown": "() the run ends, however it ends: flush and close",
}

Handler = Callable[..., None]


class Events:
    """Handlers per event, called in the order they were added."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {name: [] for name in EVENTS}

    def on(self, event: str, handler: Handler) -> None:
        if event not in self._handlers:
            raise ValueError(f"unknown training event {event!r}; the events are {', '.join(EVENTS)}")
        self._handlers[event].append(handler)

    def add(self, handlers: Mapping[str, Handler]) -> None:
        """Every (event, handler) of a listener's table."""
        for event, handler in handlers.items():
            self.on(event, handler)

    def fire(self, event: str, *args) -> None:
        for handler in self._handlers[event]:
            handler(*args)
