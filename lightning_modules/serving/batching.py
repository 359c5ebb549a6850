"""How a worker gathers a batch: LitServe's batched loop, waiting for requests instead of polling for them.

LitServe 0.2's `BatchedLoop` gathers a batch by asking its request queue (a `multiprocessing` manager's, so each ask
is a round trip to another process) every millisecond with a 1 ms timeout, and asks again at once when nothing
came: an idle worker keeps a core busy, and a busy one takes time from decoding and the forward pass. On two cores
that cost more throughput than batching gained. `WaitingBatchedLoop` overrides its public `get_batch_requests`
only: block until a first request, then take more until `max_batch_size` or `batch_timeout` after that first one,
then whatever is already waiting. The rest (decode, batch, predict, unbatch, encode, errors) is LitServe's loop.
"""

from __future__ import annotations

import time
from queue import Empty, Queue
from typing import Any

from litserve import LitAPI
from litserve.loops import BatchedLoop
from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, LoopResponseType
from typing_extensions import override

IDLE_WAIT = 1.0  # seconds an idle worker blocks on its queue before it asks again


class WaitingBatchedLoop(BatchedLoop):
    """LitServe's batched loop with a blocking wait for the first request of a batch and for each next one."""

    @override
    def get_batch_requests(
        self, lit_api: LitAPI, request_queue: Queue, transport: MessageTransport
    ) -> tuple[list[Any], list[Any]]:
        """The next batch's `(response_queue_id, uid, payload)` triples, and the requests that waited past the
        request timeout (LitServe answers those with a 504)."""
        payloads: list[Any] = []
        timed_out: list[Any] = []
        deadline: float | None = None
        while len(payloads) < lit_api.max_batch_size:
            wait = IDLE_WAIT if deadline is None else deadline - time.monotonic()
            try:
                item = request_queue.get(timeout=wait) if wait > 0 else request_queue.get_nowait()
            except Empty:
                break
            response_queue_id, uid, timestamp, payload = item
            deadline = deadline or time.monotonic() + lit_api.batch_timeout
            self.put_response(transport, response_queue_id, uid, (), LitAPIStatus.START, LoopResponseType.REGULAR)
            limit = lit_api.request_timeout
            if limit not in (-1, False, None) and time.monotonic() - timestamp > limit:
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, payload))
        return payloads, timed_out
