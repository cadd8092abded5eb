"""Several OpenAI-compatible servers (replicas of one model) behind one engine: which one a
request goes to, which are up, and what each serves.

``OpenAIEngine`` makes the HTTP calls; this pool only decides, so nothing on a request's path
waits for I/O here. What it decides, and why:

- Health. ``GET {base}/models`` for every replica at start, then on a daemon thread: every
  ``health_interval_s`` while a replica is up (its model list is cached, so an adapter loaded
  on a server later becomes routable) and, once it is down, after a backoff that doubles from
  ``backoff_s`` up to ``max_backoff_s``, so a replica that comes back is used again soon.
  A request that fails on a replica marks it down at once; one that succeeds marks it up.
- Balance. Least outstanding requests among the up replicas that list the model: a slow or
  busy server gets fewer new requests. Ties go round robin, so an idle pool alternates.
- Retry. A request that failed before any of its text reached the caller is tried on a
  replica it has not tried yet; once it tried them all, a new round after a pause
  (``Attempt``). The engine decides what failed and what is safe to retry.
- Adapters. A model name (base or LoRA adapter) goes only to replicas whose list names it.
  One lone server is the exception: it stays the authority on its models, as before several
  were possible (its own 404 names a wrong one).
- Down is a last resort, not a ban: when no up replica serves the model, the down ones are
  tried anyway, so a server that comes back answers at once, without waiting for a probe.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from docent.engine.base import EngineUnavailableError, ReplicaState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaTiming:
    """How often replicas are checked and how long a failed one rests. Tests shorten them."""

    health_interval_s: float = 5.0  # an up replica is listed again this often
    backoff_s: float = 1.0  # a replica that failed is probed again after this...
    max_backoff_s: float = 10.0  # ...doubling per failed probe up to this
    probe_timeout_s: float = 3.0  # a health check slower than this failed
    retry_pause_s: float = 0.5  # pause before a new round of tries, doubling per round
    retries: int = 2  # tries a request gets beyond one per replica
    relist_s: float = 1.0  # a model no up replica lists re-lists them at most this often


class ModelNotServedError(EngineUnavailableError):
    """No replica lists the model (base or LoRA adapter) a request names."""


@dataclass(eq=False)
class Replica:
    url: str
    up: bool = False
    models: tuple[str, ...] | None = None  # ids from GET /models, in its order; None: never
    outstanding: int = 0  # requests picked for it and not finished
    failed_probes: int = 0  # health checks failed in a row: sets the backoff
    epoch: int = 0  # +1 at each failure: a request picked before one cannot mark it up
    probe_at: float = 0.0  # time.monotonic() of its next health check
    error: str | None = None  # why it went down

    def may_serve(self, model: str | None) -> bool:
        return model is None or self.models is None or model in self.models


class ReplicaPool:
    def __init__(
        self,
        urls: Sequence[str],
        headers: dict[str, str] | None = None,
        timing: ReplicaTiming | None = None,
    ) -> None:
        if not urls:
            raise EngineUnavailableError("the openai engine needs --llm-url / DOCENT_LLM_URL")
        self.timing = timing or ReplicaTiming()
        self.replicas = [Replica(url.rstrip("/")) for url in urls]
        self._client = httpx.Client(headers=headers, timeout=self.timing.probe_timeout_s)
        self._lock = threading.Lock()  # guards every Replica field, _turn and _listed_at
        self._changed = threading.Condition(self._lock)  # wakes the prober: a failure, close
        self._turn = 0  # where the round robin starts among equally loaded replicas
        self._listed_at = float("-inf")
        self._closed = False
        self._prober: threading.Thread | None = None

    # Health ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Check every replica once (in parallel), then keep checking them on a thread."""
        self._probe_each(self.replicas)
        self._prober = threading.Thread(target=self._watch, name="llm-replicas", daemon=True)
        self._prober.start()

    def probe(self, replica: Replica) -> bool:
        """``GET {url}/models``: the replica is up and serves what it lists, or is down."""
        try:
            response = self._client.get(f"{replica.url}/models")
            response.raise_for_status()
            models = tuple(str(m["id"]) for m in response.json()["data"])
        except Exception as exc:  # whatever went wrong, this replica cannot be trusted now
            with self._lock:
                replica.failed_probes += 1
                # Capped exponent: a server down for hours must not overflow the float.
                backoff = self.timing.backoff_s * 2 ** min(replica.failed_probes - 1, 16)
                replica.probe_at = time.monotonic() + min(backoff, self.timing.max_backoff_s)
                self._mark_down(replica, f"health check failed: {_describe(exc)}")
            return False
        with self._lock:
            if not replica.up:
                log.info("LLM server %s is up, serving %s", replica.url, ", ".join(models))
            replica.up, replica.models, replica.error = True, models, None
            replica.failed_probes = 0
            replica.probe_at = time.monotonic() + self.timing.health_interval_s
        return True

    def _probe_each(self, replicas: Sequence[Replica]) -> None:
        if len(replicas) <= 1:
            for replica in replicas:
                self.probe(replica)
            return
        with ThreadPoolExecutor(len(replicas)) as pool:  # one slow server delays no other
            list(pool.map(self.probe, replicas))

    def _watch(self) -> None:
        while True:
            with self._changed:
                if self._closed:
                    return
                now = time.monotonic()
                due = [r for r in self.replicas if r.probe_at <= now]
                if not due:
                    self._changed.wait(min(r.probe_at for r in self.replicas) - now)
                    continue
            self._probe_each(due)

    def _mark_down(self, replica: Replica, why: str) -> None:
        """Under the lock. Each failure starts a new epoch (see ``Lease.succeeded``)."""
        if replica.up:
            log.warning("LLM server %s is down: %s", replica.url, why)
        replica.up, replica.error = False, why
        replica.epoch += 1

    def first_model(self) -> str | None:
        """The first model the first up replica lists: the base model, on vLLM."""
        with self._lock:
            return next((r.models[0] for r in self.replicas if r.up and r.models), None)

    def wants_listing(self, model: str | None) -> bool:
        """Whether no up replica lists ``model`` and the lists may be re-read now: an adapter
        loaded on a server a moment ago need not wait for the next health check."""
        if model is None or len(self.replicas) == 1:
            return False
        with self._lock:
            if any(r.up and r.may_serve(model) for r in self.replicas):
                return False
            return time.monotonic() - self._listed_at >= self.timing.relist_s

    def relist(self) -> None:
        """Probe the up replicas now (blocking; at most once per ``relist_s``)."""
        with self._lock:
            now = time.monotonic()
            if now - self._listed_at < self.timing.relist_s:
                return
            self._listed_at = now
            up = [r for r in self.replicas if r.up]
        self._probe_each(up)

    # Choosing --------------------------------------------------------------------------------
    def attempt(self, model: str | None) -> Attempt:
        """The tries of one request for ``model`` (None: any replica, e.g. to list models)."""
        return Attempt(self, model)

    def fitting(self, model: str | None) -> list[Replica]:
        """Replicas that may serve ``model``, up or down."""
        if len(self.replicas) == 1:
            return list(self.replicas)
        with self._lock:
            return [r for r in self.replicas if r.may_serve(model)]

    def pick(self, model: str | None, tried: set[Replica]) -> Replica | None:
        """The replica a try for ``model`` goes to, not one in ``tried``; None if none fits.
        Counted as outstanding in the same step, so concurrent picks see it."""
        with self._lock:
            n = len(self.replicas)
            order = [self.replicas[(self._turn + i) % n] for i in range(n)]
            fit = [r for r in order if r not in tried and (n == 1 or r.may_serve(model))]
            up = [r for r in fit if r.up]
            if up:  # min keeps the first of equals: the round robin
                chosen = min(up, key=lambda r: r.outstanding)
            elif fit:  # all down: the one due back soonest
                chosen = min(fit, key=lambda r: r.probe_at)
            else:
                return None
            self._turn = self.replicas.index(chosen) + 1
            chosen.outstanding += 1
            return chosen

    def states(self) -> list[ReplicaState]:
        with self._lock:
            return [ReplicaState(r.url, r.up, r.outstanding, r.models or ()) for r in self.replicas]

    # Errors ----------------------------------------------------------------------------------
    def not_served_error(self, model: str | None) -> ModelNotServedError:
        with self._lock:
            lists = "; ".join(
                f"{r.url} lists {', '.join(r.models or ()) or 'nothing'}"
                + ("" if r.up else " (down)")
                for r in self.replicas
            )
        return ModelNotServedError(
            f"no LLM server serves model {model!r} ({lists}): check the adapter or --llm-model "
            f"name, or load it on a server (vLLM: --lora-modules {model}=PATH)"
        )

    def exhausted_error(self, model: str | None, errors: dict[str, str]) -> EngineUnavailableError:
        if len(self.replicas) == 1:
            url = self.replicas[0].url
            return EngineUnavailableError(
                f"the LLM server at {url} is unreachable or failing ({errors.get(url)}); "
                "check --llm-url / DOCENT_LLM_URL and that the server is up"
            )
        what = f" for model {model!r}" if model else ""
        tried = "; ".join(f"{url}: {why}" for url, why in errors.items())
        return EngineUnavailableError(
            f"the LLM servers are unreachable or failing{what} ({tried}); check --llm-url / "
            "DOCENT_LLM_URL and that the servers are up"
        )

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._prober is not None and self._prober is not threading.current_thread():
            self._prober.join(timeout=self.timing.probe_timeout_s + 1)
        self._client.close()


class Attempt:
    """One request's tries: a replica it has not tried yet while there is one, then a new
    round after ``retry_pause_s`` (doubling), ``len(replicas) + retries`` tries in all. With
    one server that is three tries with pauses of 0.5 and 1 s, as before replicas."""

    def __init__(self, pool: ReplicaPool, model: str | None) -> None:
        self.pool = pool
        self.model = model
        self.tries_left = len(pool.replicas) + pool.timing.retries
        self.rounds = 0
        self.tried: set[Replica] = set()
        self.errors: dict[str, str] = {}  # url: why its last try failed

    def pause_s(self) -> float:
        """Seconds to wait before the next try. Raises when no try is left, or when no
        replica lists the model."""
        if self.tries_left <= 0:
            raise self.pool.exhausted_error(self.model, self.errors)
        fitting = self.pool.fitting(self.model)
        if not fitting:
            raise self.pool.not_served_error(self.model)
        if all(r in self.tried for r in fitting):
            self.tried.clear()
            self.rounds += 1
            return self.pool.timing.retry_pause_s * 2 ** (self.rounds - 1)
        return 0.0

    @contextlib.contextmanager
    def next(self) -> Iterator[Lease]:
        """The replica for the next try, counted as outstanding until the block ends."""
        # The model lists may have changed during a pause: then any fitting replica will do.
        replica = self.pool.pick(self.model, self.tried) or self.pool.pick(self.model, set())
        if replica is None:
            raise self.pool.not_served_error(self.model)
        self.tried.add(replica)
        self.tries_left -= 1
        with self.pool._lock:
            epoch = replica.epoch
        try:
            yield Lease(self, replica, epoch)
        finally:
            with self.pool._lock:
                replica.outstanding -= 1


@dataclass(eq=False)
class Lease:
    """One try on one replica. The engine reports how it went."""

    attempt: Attempt
    replica: Replica
    epoch: int

    @property
    def url(self) -> str:
        return self.replica.url

    def failed(self, exc: Exception, down: bool = True) -> None:
        """The try failed in a way another replica may not. ``down=False`` for a busy answer
        (429): the replica is alive, only this request goes elsewhere."""
        self.attempt.errors[self.url] = _describe(exc)
        if not down:
            return
        pool = self.attempt.pool
        with pool._changed:
            if self.replica.up:  # the prober looks again after the first backoff
                self.replica.probe_at = time.monotonic() + pool.timing.backoff_s
                pool._changed.notify_all()
            pool._mark_down(self.replica, f"a request failed: {_describe(exc)}")

    def succeeded(self) -> None:
        """It answered: up again, unless a failure was reported since this try began."""
        pool = self.attempt.pool
        with pool._lock:
            if not self.replica.up and self.replica.epoch == self.epoch:
                log.info("LLM server %s answers again", self.url)
                self.replica.up, self.replica.error = True, None


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
