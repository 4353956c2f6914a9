"""The driver's writer: trial events go to the database in batches, off Ray Tune's loop.

Tune calls the driver's callback on its own loop, one event at a time. Writing each event
in its own transaction costs a few round trips and a commit per event, which caps the
driver at a few hundred results per second on PostgreSQL (less on a server that flushes
its commits to disk) and stalls Tune's loop meanwhile. :class:`ResultWriter` instead
queues events and a thread writes them: whatever has queued up while the previous
transaction ran goes into the next one (group commit), with the same few statements per
batch (``store.mark_running_many`` / ``store.record_placements`` / ``store.record_results``).
A lone event is written at once, so nothing waits for a batch to fill.

Durability does not depend on the queue: a worker writes its result to a result file
before reporting it, and the file is removed only once its result is committed
(``on_committed``). A driver that dies with events queued loses nothing that the next
launch cannot recover.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from orchestrator.db.engine import session_scope
from orchestrator.db.store import mark_running_many, record_placements, record_results

log = logging.getLogger(__name__)

MAX_BATCH = 500  # events per transaction; bounds a transaction's time and lock holding


@dataclass
class _Event:
    key: str
    result: Mapping[str, Any] | None = None  # None: the trial started (or was placed)
    host: str | None = None
    on_committed: Callable[[], None] | None = None
    gpus: str | None = None
    # The running trial's worker announced its host and GPUs: not a new attempt.
    placed: bool = False

    @property
    def phase(self) -> int:
        """Order of application within a segment: starts, then placements, then results."""
        return 2 if self.result is not None else 1 if self.placed else 0


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


class ResultWriter:
    """Writes one sweep's trial starts and results to the database from a thread.

    ``started`` and ``finished`` return at once; ``flush`` waits until every event given
    before it is committed. A write that fails (for example a result naming an unknown
    trial, or an unreachable database) is logged, its result file stays for the next
    launch, and the error is raised by the next ``started``, ``finished`` or ``flush``:
    the sweep does not go on as if it had been stored. Use as a context manager, or call
    ``close``.
    """

    def __init__(self, engine: Engine, sweep: str, max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.engine = engine
        self.sweep = sweep
        self.max_batch = max_batch
        self.batches = 0  # transactions committed, for benchmarks and tests
        self._queue: queue.SimpleQueue[_Event | _Flush | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"sweep-writer-{sweep}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ driver side

    def started(self, key: str, host: str | None = None, gpus: str | None = None) -> None:
        """Queue "trial ``key`` started" (status running, one more attempt)."""
        self._put(_Event(key, None, host, gpus=gpus))

    def placed(self, key: str, host: str | None, gpus: str | None) -> None:
        """Queue "running trial ``key`` runs on ``host`` with GPUs ``gpus``" (as its worker
        announced); unlike ``started``, this is not a new attempt and keeps the start time."""
        self._put(_Event(key, None, host, gpus=gpus, placed=True))

    def finished(self, key: str, result: Mapping[str, Any],
                 on_committed: Callable[[], None] | None = None) -> None:
        """Queue the result of trial ``key``; ``on_committed`` runs once it is committed."""
        self._put(_Event(key, result, None, on_committed))

    def flush(self) -> None:
        """Wait until everything queued so far is committed; raise the first failed write."""
        marker = _Flush()
        if not self._closed:
            self._queue.put(marker)
            marker.done.wait()
        self._raise_error()

    def close(self) -> None:
        """Write what is queued, stop the thread, and raise the first failed write."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        self._raise_error()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is None:
            self.close()
            return
        # Already failing: still write what is queued, but keep the original error.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the first error is the one worth seeing
            log.exception("writing the queued trial events failed as well")

    def _put(self, event: _Event) -> None:
        if self._closed:
            raise RuntimeError("the result writer is closed")
        self._raise_error()
        self._queue.put(event)

    def _raise_error(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[_Event] = []
            flushes: list[_Flush] = []
            item = self._queue.get()
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, _Flush):
                    flushes.append(item)
                else:
                    batch.append(item)
                # A flush ends the batch: its caller waits for exactly what came before it.
                if stop or flushes or len(batch) >= self.max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
            for marker in flushes:
                marker.done.set()

    def _write(self, batch: list[_Event]) -> None:
        try:
            self._commit(batch)
        except Exception:  # noqa: BLE001 - retried one by one to find and isolate the cause
            # One bad event must not cost the others their write: each alone, in order.
            for event in batch:
                try:
                    self._commit([event])
                except Exception as error:  # noqa: BLE001 - handed to the driver thread
                    what = ("the result" if event.result is not None
                            else "the placement" if event.placed else "the start")
                    log.error("could not write %s of trial %s: %s", what, event.key, error)
                    with self._lock:
                        if self._error is None:
                            self._error = error

    def _commit(self, batch: list[_Event]) -> None:
        with session_scope(self.engine, write=True) as session:
            for segment in _segments(batch):
                starts = [(e.key, e.host, e.gpus) for e in segment if e.phase == 0]
                placements = [(e.key, e.host, e.gpus) for e in segment if e.phase == 1]
                results = [(e.key, e.result) for e in segment if e.result is not None]
                mark_running_many(session, self.sweep, starts)
                record_placements(session, self.sweep, placements)
                record_results(session, self.sweep, results)
        self.batches += 1
        for event in batch:
            if event.on_committed is not None:
                try:
                    event.on_committed()
                except Exception:  # noqa: BLE001 - the result is stored; cleanup may lag
                    log.exception("after storing the result of trial %s", event.key)


def _segments(batch: list[_Event]) -> list[list[_Event]]:
    """Split ``batch`` so that within a segment every start may be applied before every
    placement, and every placement before every result: a new segment begins where an
    event of a trial comes after a later-phase event of the same trial (a start after its
    result, a start after its placement, a placement after its result)."""
    segments: list[list[_Event]] = [[]]
    phases: dict[str, int] = {}  # the latest phase of each trial in the current segment
    for event in batch:
        if phases.get(event.key, -1) > event.phase:
            segments.append([])
            phases = {}
        segments[-1].append(event)
        phases[event.key] = max(phases.get(event.key, -1), event.phase)
    return segments
