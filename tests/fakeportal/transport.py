"""Transport switches: a portal (or the OAuth server) that answers slowly, hugely or never.

Each ``FakePortal`` and the ``FakeBitrix`` OAuth server has one ``TransportFaults`` as
``.transport``; its switches apply to every REST answer (portal) or every answer (OAuth server)
until switched off:

* ``drip_interval_s``: the answer's headers go out at once, its body one byte at a time with this
  pause before each byte (a portal that "drips"; every read gets a byte well within any read
  timeout).
* ``huge_body_bytes``: the answer is a valid JSON body ``{"result": "xxx…"}`` of exactly this many
  bytes, produced as it is written; ``huge_body_declared`` (True) sends its ``Content-Length``,
  False sends it chunked, without a length.
* ``unresponsive``: requests are accepted and read, recorded (``injected: "unresponsive"``) and
  never answered; the connection is dropped when the switch goes off or the listener stops.

The request's record gets ``sent_bytes`` and ``body_complete`` once the answer's body was written
or the client went away (a client that stops reading a huge body closes its connection:
``body_complete`` is False and ``sent_bytes`` far below the body's size).
"""

from __future__ import annotations

import threading
import time

from .server import Listener, Response

HUGE_PIECE = 64 * 1024


class TransportFaults:
    def __init__(self) -> None:
        self.drip_interval_s: float | None = None
        self.huge_body_bytes: int | None = None
        self.huge_body_declared = True
        self._unresponsive = threading.Event()

    @property
    def unresponsive(self) -> bool:
        return self._unresponsive.is_set()

    @unresponsive.setter
    def unresponsive(self, value: bool) -> None:
        if value:
            self._unresponsive.set()
        else:
            self._unresponsive.clear()

    def off(self) -> None:
        """Every switch off."""
        self.drip_interval_s = None
        self.huge_body_bytes = None
        self.huge_body_declared = True
        self.unresponsive = False

    def hold(self, listener: Listener) -> None:
        """Keep an accepted request unanswered while ``unresponsive`` is on."""
        while self.unresponsive and listener.running and not listener.down:
            time.sleep(0.05)

    def shape(self, resp: Response, record: dict) -> Response:
        """Apply the body switches to an answer about to be written."""
        if self.huge_body_bytes is not None:
            resp = _huge(int(self.huge_body_bytes), self.huge_body_declared)
        if self.drip_interval_s is not None:
            resp.drip_s = float(self.drip_interval_s)
        if self.huge_body_bytes is not None or self.drip_interval_s is not None:

            def on_sent(sent: int, complete: bool) -> None:
                record["sent_bytes"] = sent
                record["body_complete"] = complete

            resp.on_sent = on_sent
        return resp


def _huge(size: int, declared: bool) -> Response:
    head, tail = b'{"result":"', b'"}'
    filler = max(0, size - len(head) - len(tail))

    def pieces():
        yield head
        left = filler
        while left > 0:
            piece = min(left, HUGE_PIECE)
            yield b"x" * piece
            left -= piece
        yield tail

    return Response(
        200,
        headers=[("Content-Type", "application/json; charset=utf-8")],
        stream=pieces,
        stream_length=len(head) + filler + len(tail) if declared else None,
    )
