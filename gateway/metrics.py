"""What a gateway counts, for Prometheus (``GET /metrics``) and ``GET /v1/status``.

- `DispatchMetrics`: what the dispatcher records as jobs end: attempts by outcome, jobs by
  status, time queued, run and end to end (histograms), megapixel-steps, and the work of the
  last minute (`RecentWork`).
- `RequestCounter`: ASGI middleware counting HTTP requests by API and status.
- `instrument_gateway`: gauges read at each scrape: jobs waiting and running, providers by
  state.
- `instrument_trust`: the spot checks' counts (by outcome, re-runs, strikes, exclusions),
  providers excluded now, and fraud reports by event, read at each scrape.

Label values are fixed sets: `ATTEMPT_OUTCOMES`, `JOB_STATUSES`, `APIS`, `PROVIDER_STATES`,
`CHECK_OUTCOMES`, `REPORT_EVENTS` and HTTP status codes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.errors import (
    AllBusy,
    DeadlinePassed,
    DispatchError,
    NoProvider,
    ProviderFailed,
    Rejected,
)
from gateway.limits import REFUSAL_REASONS
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.metrics import Metrics
from sdcn_p2p.records import AdvertState, Role

if TYPE_CHECKING:
    from gateway.directory import ProviderDirectory
    from gateway.dispatch import Dispatcher
    from gateway.reports import FraudReports
    from gateway.spotcheck import SpotChecker

__all__ = [
    "APIS",
    "ATTEMPT_OUTCOMES",
    "CHECK_OUTCOMES",
    "JOB_STATUSES",
    "PROVIDER_STATES",
    "REPORT_EVENTS",
    "DispatchMetrics",
    "RecentWork",
    "RefusalCounter",
    "RequestCounter",
    "instrument_gateway",
    "instrument_trust",
    "job_status",
]

#: How one attempt on a provider ended: a result, busy (back-pressure: the job stays), failed
#: (the provider broke, refused or dropped the job: the next one is tried), timeout, or
#: cancelled (the client went away, or another part of its batch failed).
ATTEMPT_OUTCOMES = ("ok", "busy", "failed", "timeout", "cancelled")
#: How a job ended; each but "ok" and "cancelled" is one of the `gateway.errors` types.
JOB_STATUSES = ("ok", "rejected", "no_provider", "busy", "failed", "timeout", "cancelled")
_STATUS_OF: dict[type[DispatchError], str] = {
    Rejected: "rejected",
    NoProvider: "no_provider",
    AllBusy: "busy",
    ProviderFailed: "failed",
    DeadlinePassed: "timeout",
}
#: Which API an HTTP request was for: the SDCN API (``/txt2img``, ``/v1/...``), the
#: AUTOMATIC1111 one (``/sdapi/...``), the job service (``/v1/jobs...``), or anything else
#: (``/metrics``, ``/docs``, unknown paths).
APIS = ("sdcn", "a1111", "jobs", "other")
#: What a provider is to this gateway: taking jobs ("online"), online but held back after
#: answering busy or full by its advert ("busy"), banned after failing ("banned"), or as
#: its advert says ("draining", "unavailable").
PROVIDER_STATES = ("online", "busy", "banned", "draining", "unavailable")
#: How a spot check ended (`gateway.spotcheck.TrustStats.outcomes`).
CHECK_OUTCOMES = ("passed", "failed", "upheld", "unsettled", "unavailable", "skipped")
#: What happened to fraud reports (`gateway.reports.ReportStats`): ours published, pushes
#: sent, received, and how each received one ended.
REPORT_EVENTS = (
    "published",
    "sent",
    "received",
    "rate_limited",
    "rejected",
    "ignored",
    "confirmed",
    "refuted",
    "unconfirmed",
)
#: Seconds of finished work `GET /v1/status` sums up.
RECENT_WINDOW = 60


def job_status(error: BaseException | None) -> str:
    """The status (one of JOB_STATUSES) of a job that ended with `error` (None: a result)."""
    if error is None:
        return "ok"
    return next((s for kind, s in _STATUS_OF.items() if isinstance(error, kind)), "cancelled")


class RecentWork:
    """Images and megapixel-steps of the jobs that ended in the last `window` seconds, in
    one-second bins (pure: time passed in, seconds of any monotonic clock)."""

    def __init__(self, window: int = RECENT_WINDOW) -> None:
        self.window = window
        self._bins: deque[list[Any]] = deque()  # [second, images, megapixel-steps], oldest first

    def add(self, now: float, images: int, megapixel_steps: float) -> None:
        second = int(now)
        self._forget(second)
        if self._bins and self._bins[-1][0] == second:
            self._bins[-1][1] += images
            self._bins[-1][2] += megapixel_steps
        else:
            self._bins.append([second, images, megapixel_steps])

    def totals(self, now: float) -> tuple[int, float]:
        """(images, megapixel-steps) of the last `window` seconds."""
        self._forget(int(now))
        return sum(b[1] for b in self._bins), sum(b[2] for b in self._bins)

    def _forget(self, second: int) -> None:
        while self._bins and self._bins[0][0] <= second - self.window:
            self._bins.popleft()


class DispatchMetrics:
    """The dispatcher's instruments in `metrics` (a peer's registry), and its recent work."""

    def __init__(self, metrics: Metrics) -> None:
        self.attempts = metrics.counter(
            "sdcn_gateway_attempts_total",
            "Attempts to run a job on a provider, by outcome",
            ["outcome"],
        )
        self.jobs = metrics.counter(
            "sdcn_gateway_jobs_total", "Jobs the gateway dispatched, by how they ended", ["status"]
        )
        self.queue_seconds = metrics.histogram(
            "sdcn_gateway_job_queue_seconds",
            "Time from a job's arrival until the provider that ran it started running it "
            "(waiting in the gateway's line, failed attempts, the provider's queue); for a job "
            "that never ran, until it gave up",
        )
        self.run_seconds = metrics.histogram(
            "sdcn_gateway_job_run_seconds",
            "Time from a job starting on a provider until its images were back (jobs with a "
            "result)",
        )
        self.job_seconds = metrics.histogram(
            "sdcn_gateway_job_seconds", "Time from a job's arrival until it ended, any way"
        )
        self.megapixel_steps = metrics.counter(
            "sdcn_gateway_megapixel_steps_total",
            "Work of the jobs that returned images: steps x width x height x images / 10^6",
        )
        self.recent = RecentWork()
        # One child per label value, looked up once rather than at each job.
        self._attempts = {o: self.attempts.labels(o) for o in ATTEMPT_OUTCOMES}
        self._jobs = {s: self.jobs.labels(s) for s in JOB_STATUSES}

    def attempt(self, outcome: str) -> None:
        """Count an attempt that ended in `outcome` (one of ATTEMPT_OUTCOMES)."""
        self._attempts[outcome].inc()

    def job_ended(
        self, job: JobRequest, status: str, *, now: float, queue: float, run: float | None
    ) -> None:
        """Record a job that ended in `status` at `now` (trio time) after `queue` seconds
        before it started, and `run` seconds running (None: no result)."""
        self._jobs[status].inc()
        self.queue_seconds.observe(queue)
        self.job_seconds.observe(queue + (run or 0.0))
        if run is not None:
            self.run_seconds.observe(run)
            self.megapixel_steps.inc(job.megapixel_steps)
            self.recent.add(now, job.batch_size, job.megapixel_steps)


def instrument_gateway(
    metrics: Metrics, dispatcher: Dispatcher, wall_clock: Callable[[], float]
) -> None:
    """Add the gauges read at each scrape: `dispatcher`'s jobs waiting and running, and the
    providers its directory knows, by state (see PROVIDER_STATES)."""
    metrics.gauge(
        "sdcn_gateway_jobs_waiting", "Jobs waiting in the gateway's line for a provider with room"
    ).set_function(lambda: dispatcher.waiting)
    metrics.gauge(
        "sdcn_gateway_jobs_running", "Jobs sent to a provider and not back yet"
    ).set_function(lambda: dispatcher.running)
    directory = dispatcher.directory

    def providers() -> list[Metric]:
        family = GaugeMetricFamily(
            "sdcn_gateway_providers", "Providers this gateway knows, by state", labels=["state"]
        )
        for state, count in provider_states(directory, wall_clock()).items():
            family.add_metric([state], count)
        return [family]

    metrics.add_collector("gateway_providers", providers)


def instrument_trust(
    metrics: Metrics,
    checker: SpotChecker,
    reports: FraudReports | None,
    wall_clock: Callable[[], float],
) -> None:
    """Add what `checker` and `reports` count, read at each scrape (see the module
    docstring)."""

    def collect() -> list[Metric]:
        stats = checker.stats
        checks = CounterMetricFamily(
            "sdcn_gateway_spot_checks",
            "Spot checks of clients' jobs (and verifications) by outcome",
            labels=["outcome"],
        )
        outcomes = stats.outcomes()
        for outcome in CHECK_OUTCOMES:
            checks.add_metric([outcome], outcomes[outcome])
        found = [
            checks,
            CounterMetricFamily(
                "sdcn_gateway_check_reruns",
                "Jobs run again on another provider to check a picture (second and third opinions)",
                value=stats.reruns + stats.arbitrations,
            ),
            CounterMetricFamily(
                "sdcn_gateway_strikes",
                "Strikes given to providers found drawing wrong pictures",
                value=stats.strikes,
            ),
            CounterMetricFamily(
                "sdcn_gateway_exclusions",
                "Providers excluded for wrong pictures",
                value=stats.exclusions,
            ),
            GaugeMetricFamily(
                "sdcn_gateway_providers_excluded",
                "Providers this gateway excludes now for wrong pictures",
                value=checker.ledger.excluded(wall_clock()),
            ),
        ]
        if reports is not None:
            family = CounterMetricFamily(
                "sdcn_gateway_fraud_reports", "Fraud reports, by event", labels=["event"]
            )
            counts = reports.stats.counts()
            for event in REPORT_EVENTS:
                family.add_metric([event], counts[event])
            found.append(family)
        return found

    metrics.add_collector("gateway_trust", collect)


def provider_states(directory: ProviderDirectory, now: float) -> dict[str, int]:
    """How many providers `directory` knows in each of PROVIDER_STATES at wall time `now`."""
    counts = dict.fromkeys(PROVIDER_STATES, 0)
    for advert in directory.adverts:
        if Role.PROVIDER not in advert.roles:
            continue
        if advert.state is not AdvertState.ONLINE:
            state = str(advert.state)
        elif directory.is_banned(advert.peer_id, now):
            state = "banned"
        elif advert.full or directory.is_busy(advert.peer_id, now):
            state = "busy"
        else:
            state = "online"
        counts[state] += 1
    return counts


# --- HTTP requests -----------------------------------------------------------------------------


class RefusalCounter:
    """``sdcn_gateway_refused_total``: clients refused (401, 429), by reason only (one of
    `gateway.limits.REFUSAL_REASONS`): never by client, address or key, which would make a
    series per client."""

    def __init__(self, metrics: Metrics) -> None:
        counter = metrics.counter(
            "sdcn_gateway_refused_total",
            "Requests and jobs refused for their client: no or unknown API key (401), over a "
            "limit (429), by reason",
            ["reason"],
        )
        self._children = {reason: counter.labels(reason) for reason in REFUSAL_REASONS}

    def count(self, reason: str) -> None:
        self._children[reason].inc()


def api_of(path: str) -> str:
    """Which of APIS a request for `path` is for."""
    if path.startswith("/sdapi/"):
        return "a1111"
    if path == "/v1/jobs" or path.startswith("/v1/jobs/"):
        return "jobs"
    if path in ("/txt2img", "/img2img", "/healthz") or path.startswith("/v1/"):
        return "sdcn"
    return "other"


class RequestCounter:
    """ASGI middleware: counts each HTTP request in ``sdcn_gateway_requests_total`` by API
    (see `api_of`) and the status answered. A request the app failed on before answering
    counts as 500 (Starlette's outermost middleware answers it so), one cancelled before an
    answer as 499 (the client went away)."""

    def __init__(self, app: Callable[..., Any], metrics: Metrics) -> None:
        self.app = app
        self.requests: Counter = metrics.counter(
            "sdcn_gateway_requests_total", "HTTP requests by API and status", ["api", "status"]
        )
        self._children: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 499

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            if status == 499:
                status = 500
            raise
        finally:
            key = (api_of(scope["path"]), status)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self.requests.labels(key[0], str(status))
            child.inc()
