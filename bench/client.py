"""Client overhead per call: our ``BitrixClient`` beside the official SDK and a bare session.

The same classic call (``profile``) and the same REST 3.0 call (``tasks.task.result.list`` of a
task with 5 results) go to the same fake portal endpoint on 127.0.0.1, sequentially, through

* ``BitrixClient`` with a shared session from ``build_session`` and the in-process
  ``LocalLeakyBucket`` limiter, once with the app's logging as configured (the per-call INFO
  line, masked and formatted, written to /dev/null instead of stdout) and once with the
  ``b24app.bitrix`` logger at WARNING;
* the official SDK ``b24pysdk``: ``BitrixToken.call_method``, its one-call entry point (the
  same level as ``BitrixClient.call``: a method name and parameters in, the decoded answer out),
  with ``prefer_version=3`` for the REST 3.0 call, as shipped (its own retries, request id,
  error mapping, and a new ``requests`` session, so a new connection, per call);
* a bare ``requests.Session`` posting the same JSON body and decoding the JSON answer (the floor).

``b24pysdk`` builds every REST URL as ``https://{domain}/rest`` and has no setting for the
scheme, so for the run the bench replaces that one property (``_MethodCaller._base_url``) with
its ``http://`` twin; nothing else of the SDK is changed.

Variants run interleaved in blocks so that drift (heap growth, CPU frequency, other load) hits
them alike. The fake portal runs in this process; its handling time is measured by wrapping its
listener's request handler, so the server share of a call can be told apart.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.common import (
    HandlerTimer,
    b24pysdk_over_http,
    fmt,
    print_table,
    record,
    require_loopback,
    setup_django,
    start_fake,
    summary,
)

BENCH_ORDER = 10
TITLE = "client overhead per call"

CALLS = int(os.environ.get("BENCH_CALLS", "1000"))
WARMUP = 200
BLOCK = 50
"""Calls of one variant in a row before switching to the next one."""
NO_LIMIT = (10**6, 10**6)
RESULTS = 5
V3_METHOD = "tasks.task.result.list"
BITRIX_LOGGER = "b24app.bitrix"
FLOOR = "requests.Session (floor)"
HANDLER = "fake portal handler only"
SDK = "b24pysdk"
"""Variant label prefix; the label carries the installed version."""


def _portal_listener(portal: Any) -> Any | None:
    """The fake portal's current listener (a private attribute; ``None`` if it moved)."""
    listeners = getattr(portal, "_listeners", None)
    if not listeners or not hasattr(listeners[-1], "app"):
        return None
    return listeners[-1]


@dataclass
class Series:
    """One variant calling one API, and the time each of its measured calls took (us)."""

    variant: str
    api: str
    call: Callable[[], Any]
    log_level: int
    samples: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    """CPU time of the calling thread per call (us): the client's own work, without the fake's."""


def main(argv: list[str]) -> int:
    calls = max(1, min(CALLS, 100_000))
    fake = start_fake()
    try:
        portal = fake.add_portal(rate_limit=NO_LIMIT)
        portal.set_rate_limit(*NO_LIMIT)
        require_loopback(portal.url)
        user = portal.add_user(name="Anna", last_name="Smirnova", admin=True)
        task = portal.add_task(title="Benchmark task", created_by=user, responsible_id=user)
        for number in range(1, RESULTS + 1):
            portal.add_result(task, author_id=user, text=f"Result {number}")
        token = portal.issue_tokens(user)["access_token"]
        setup_django(fake.oauth_url)

        series = _series(fake, portal, task, token)
        listener = _portal_listener(portal)
        timer = HandlerTimer(listener) if listener is not None else None
        started = time.monotonic()
        with b24pysdk_over_http():
            _measure(series, fake, portal, user, timer, calls)
        elapsed = time.monotonic() - started
    finally:
        fake.stop()
    _print(series, timer, calls, elapsed)
    _record(series)
    return 0


def _series(fake: Any, portal: Any, task: int, token: str) -> list[Series]:
    import b24pysdk
    import requests
    from b24pysdk.constants.version import B24APIVersion

    from b24app.portals.bitrix import BitrixClient, BitrixConfig, build_session
    from b24app.portals.ratelimit import LocalLeakyBucket

    config = BitrixConfig(
        client_id=os.environ["B24_CLIENT_ID"],
        client_secret=os.environ["B24_CLIENT_SECRET"],
        oauth_servers=(fake.oauth_url,),
        allow_private=True,
    )
    client = BitrixClient(
        portal.client_endpoint,
        token,
        config=config,
        session=build_session(config),
        limiter=LocalLeakyBucket(),
        limiter_key=portal.member_id,
        rate=NO_LIMIT,
    )
    v3_params = {"filter": [["taskId", task]]}
    bare = requests.Session()
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": config.user_agent,
    }
    urls = {
        "classic": require_loopback(f"{portal.client_endpoint}profile"),
        "v3": require_loopback(f"{portal.url}/rest/api/{V3_METHOD}"),
    }

    def bare_call(api: str, params: dict[str, Any]) -> Any:
        response = bare.post(
            urls[api],
            json={**params, "auth": token},
            headers=headers,
            timeout=config.timeout,
            allow_redirects=False,
        )
        return response.json()["result"]

    # An OAuth token of a Market app (not a webhook): the SDK sends it as ``auth`` in the body.
    sdk_token = b24pysdk.BitrixToken(
        domain=portal.domain,
        auth_token=token,
        bitrix_app=b24pysdk.BitrixApp(
            client_id=config.client_id, client_secret=config.client_secret
        ),
    )

    def sdk_call(method: str, params: dict[str, Any], version: B24APIVersion) -> Any:
        return sdk_token.call_method(method, params, prefer_version=version)["result"]

    sdk = f"{SDK} {b24pysdk.__version__}"
    configured = logging.getLogger(BITRIX_LOGGER)
    level = configured.level
    logged = f"BitrixClient, log {logging.getLevelName(configured.getEffectiveLevel())}"
    quiet = "BitrixClient, log WARNING"
    return [
        Series(logged, "classic", lambda: client.call("profile"), level),
        Series(logged, "v3", lambda: client.call_v3(V3_METHOD, v3_params), level),
        Series(quiet, "classic", lambda: client.call("profile"), logging.WARNING),
        Series(quiet, "v3", lambda: client.call_v3(V3_METHOD, v3_params), logging.WARNING),
        Series(sdk, "classic", lambda: sdk_call("profile", {}, B24APIVersion.V2), level),
        Series(sdk, "v3", lambda: sdk_call(V3_METHOD, v3_params, B24APIVersion.V3), level),
        Series(FLOOR, "classic", lambda: bare_call("classic", {}), level),
        Series(FLOOR, "v3", lambda: bare_call("v3", v3_params), level),
    ]


def _measure(series: list[Series], fake: Any, portal: Any, user: int, timer, calls: int) -> None:
    """Warm up every series (checking its answers), then time them in rotating blocks, with the
    app's log stream handlers writing to /dev/null."""
    bitrix_logger = logging.getLogger(BITRIX_LOGGER)
    configured_level = bitrix_logger.level
    with open(os.devnull, "w") as devnull:
        streams = _redirect_log_streams(devnull)
        try:
            for one in series:
                bitrix_logger.setLevel(one.log_level)
                for _ in range(WARMUP):
                    result = one.call()
                _check(one.api, result, user)
            if timer is not None:
                timer.recording = True
            for block in range(0, calls, BLOCK):
                size = min(BLOCK, calls - block)
                turn = (block // BLOCK) % len(series)
                for one in series[turn:] + series[:turn]:
                    bitrix_logger.setLevel(one.log_level)
                    call, samples, cpu = one.call, one.samples, one.cpu
                    for _ in range(size):
                        cpu_before = time.thread_time_ns()
                        before = time.perf_counter_ns()
                        call()
                        samples.append((time.perf_counter_ns() - before) / 1000)
                        cpu.append((time.thread_time_ns() - cpu_before) / 1000)
                with fake.lock:
                    portal.requests.clear()  # the fake records every request; keep heap flat
            if timer is not None:
                timer.recording = False
        finally:
            bitrix_logger.setLevel(configured_level)
            _restore_log_streams(streams)


def _check(api: str, result: Any, user: int) -> None:
    if api == "classic" and str(result.get("ID")) != str(user):
        raise RuntimeError(f"profile answered {result!r}")
    if api == "v3" and len(result.get("items") or []) != RESULTS:
        raise RuntimeError(f"{V3_METHOD} answered {result!r}")


def _redirect_log_streams(stream: Any) -> list[tuple[logging.StreamHandler, Any]]:
    """Point the app's stream handlers (stdout) at ``stream``; returns what to restore."""
    handlers: dict[int, logging.StreamHandler] = {}
    loggers = [logging.getLogger(), *map(logging.getLogger, ("django", "celery", "b24app"))]
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler:
                handlers[id(handler)] = handler
    return [(handler, handler.setStream(stream)) for handler in handlers.values()]


def _restore_log_streams(saved: list[tuple[logging.StreamHandler, Any]]) -> None:
    for handler, stream in saved:
        if stream is not None:
            handler.setStream(stream)


def _print(series: list[Series], timer: HandlerTimer | None, calls: int, elapsed: float) -> None:
    rows = []
    for api, method in (("classic", "profile"), ("v3", V3_METHOD)):
        mine = [one for one in series if one.api == api]
        floor = _floor(series, api)
        floor_cpu = summary(floor.cpu)["median"]
        for one in mine:
            figures, cpu = summary(one.samples), summary(one.cpu)["median"]
            extra = ["-", "-", fmt(cpu), "-"]
            if one is not floor:
                overhead, ratio = _against_floor(one, floor)
                extra = [fmt(overhead), f"{ratio:.2f}x", fmt(cpu), fmt(cpu - floor_cpu)]
            rows.append([method, one.variant, figures["n"], *_figures(figures), *extra])
        if timer is not None:
            figures = summary(timer.samples(api))
            rows.append([method, HANDLER, figures["n"], *_figures(figures), "-", "-", "-", "-"])
    notes = [
        f"{calls} sequential calls per variant and method after {WARMUP} warm-up calls each, "
        f"interleaved in rotating blocks of {BLOCK}; {elapsed:.1f} s in all",
        "wall-clock time per call in microseconds (us); overhead = median - floor median;",
        "ratio = median / floor median; cpu = median CPU time of the calling thread per call",
        "(the client's own work: the fake's threads are not in it), cpu over = cpu - floor cpu",
        "fake portal on 127.0.0.1 in this process, its rate limit raised to 10^6/10^6;",
        "BitrixClient: one shared build_session() session, LocalLeakyBucket at 10^6/10^6;",
        f"'{series[0].variant}': the app's LOGGING config, its stdout handler writing to",
        "/dev/null; 'log WARNING': the b24app.bitrix logger raised to WARNING",
        f"'{_sdk_series(series).variant}': BitrixToken.call_method (prefer_version=3 for REST 3.0)"
        " as shipped,",
        "except its hard-coded https:// base URL made http:// for the loopback fake; it opens",
        "a new requests session and TCP connection per call (the fake's thread per connection",
        "is in its wall time, not in the handler-only row)",
        f"'{HANDLER}': the fake's request handler (routing, REST logic, its request",
        "log) without http.server parsing and socket I/O; it is inside every row above",
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs",
    ]
    if timer is None:
        notes.append("fake portal handling time: not measured (its listener was not found)")
    print_table(
        TITLE,
        [
            "method",
            "variant",
            "n",
            "median us",
            "p95 us",
            "p99 us",
            "overhead us",
            "ratio",
            "cpu us",
            "cpu over us",
        ],
        rows,
        notes,
    )


def _record(series: list[Series]) -> None:
    """Headline figures: each client's median overhead over the floor, per method, with its
    CPU overhead beside it (wall-clock medians drift with the machine's load; CPU time less)."""
    for api, method in (("classic", "profile"), ("v3", V3_METHOD)):
        floor = _floor(series, api)
        floor_cpu = summary(floor.cpu)["median"]
        for one in series:
            if one.api != api or one is floor:
                continue
            overhead, ratio = _against_floor(one, floor)
            cpu_over = summary(one.cpu)["median"] - floor_cpu
            ours = one.variant.startswith("BitrixClient")
            record(
                "client",
                f"{method}: overhead over the floor, {one.variant}",
                f"{fmt(overhead)} us ({ratio:.2f}x), cpu {fmt(cpu_over)} us",
                target=f"<= {SDK}" if ours else "",
            )


def _floor(series: list[Series], api: str) -> Series:
    return next(one for one in series if one.api == api and one.variant == FLOOR)


def _sdk_series(series: list[Series]) -> Series:
    return next(one for one in series if one.variant.startswith(SDK))


def _against_floor(one: Series, floor: Series) -> tuple[float, float]:
    """The series' median minus the floor's median (us), and its median / the floor's."""
    median, floor_median = summary(one.samples)["median"], summary(floor.samples)["median"]
    return median - floor_median, median / floor_median


def _figures(figures: dict[str, float]) -> list[str]:
    return [fmt(figures["median"]), fmt(figures["p95"]), fmt(figures["p99"])]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
