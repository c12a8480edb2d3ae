"""`toolkit serve --backend ray`: the same Open Inference Protocol, with the models in Ray Serve
replicas, on one machine or a cluster.

One deployment per bundle: each replica holds a `toolkit.load`ed model and merges concurrent requests
with Ray Serve's `@serve.batch` (as the native batcher does: same shapes past the batch axis, up to
max-batch rows, a failing batch rerun one by one). One ingress deployment speaks the protocol: it is
app.py's ASGI app, its served models endpoints that call the replicas through deployment handles.
Validation happens in the ingress (requests that fail it never reach a replica); metrics are the
ingress's, with each batch's size and times reported back by the replica that ran it.

What Ray does for us: replicas that die are replaced, and its router sends a request whose replica
died to another one (what still fails, the ingress answers 503); replicas scale between bounds on
load; `serve.run(application(...))` places replicas on any node of a cluster. Every node that may
run a replica must see the bundle directories at the same path (a shared or synced filesystem).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.serve.app import ServeOptions, protocol_app, warn_payloads
from toolkit.serve.generation import EventStream, Unavailable
from toolkit.serve.metrics import Metrics
from toolkit.serve.tls import TLS

try:
    import ray
    from ray import serve
    from ray.serve.exceptions import BackPressureError, RequestCancelledError
except ImportError as exc:  # the extra is optional; say how to get it
    raise ToolkitError(f"the Ray backend needs the ray extra ({exc.name} is missing): pip install 'toolkit[ray]'.") from None

__all__ = ["RayOptions", "application", "serve_with_ray"]

_log = logging.getLogger("toolkit.serve")
_APP = "toolkit"  # the Ray Serve application's name
_QUIET = {"enable_access_log": False, "log_level": "WARNING"}  # the protocol's metrics count requests; Ray's access log would log each
# What a replica that died, or went away mid-request, looks like to its caller.
_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, RequestCancelledError)


@dataclass(frozen=True)
class RayOptions:
    """How the models run in Ray Serve: fixed replicas or autoscaling bounds, per-replica resources."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, scaled on requests in flight
    num_cpus: float | None = None  # per replica; None: the cluster's CPUs shared among every replica (at most)
    num_gpus: float = 0.0
    variant: str | None = None
    provider: str = "auto"
    threads: int | None = None  # onnxruntime intra-op threads per replica (default: its CPUs, at least 1)
    verify: str | None = None  # a public key (PEM) every replica verifies its bundle's signature with
    key: str | None = None  # an encrypted bundle's key (a path every node can read): replicas decrypt in memory

    def __post_init__(self) -> None:
        if self.replicas < 1 or (self.num_cpus is not None and self.num_cpus <= 0) or self.num_gpus < 0:
            raise ToolkitError("replicas must be >= 1, num-cpus-per-replica > 0 and num-gpus-per-replica >= 0.")
        if self.autoscale is not None and not 0 <= self.autoscale[0] <= self.autoscale[1] or self.autoscale == (0, 0):
            raise ToolkitError(f"autoscale bounds must be MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {self.autoscale}.")

    @property
    def most_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas

    def deployment_options(self, options: ServeOptions) -> dict[str, Any]:
        scale: dict[str, Any] = {"num_replicas": self.replicas} if self.autoscale is None else {"autoscaling_config": {
            "min_replicas": self.autoscale[0], "max_replicas": self.autoscale[1], "target_ongoing_requests": options.max_batch}}
        return {**scale, "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}, "logging_config": _QUIET,
                "max_ongoing_requests": options.max_batch + options.max_queue, "max_queued_requests": options.max_queue}


@serve.deployment
class ModelReplica:
    """One bundle's model in one Ray Serve replica."""

    def __init__(self, path: str, ray_options: RayOptions, max_batch: int, max_delay_s: float, slots: int = 16, max_waiting: int = 256):
        from toolkit.runtime.generate.scheduler import Scheduler
        from toolkit.runtime.model import Model, Signature
        from toolkit.serve.triton import batch_first

        o = ray_options
        self.model = Model(path, variant=o.variant, provider=o.provider, threads=o.threads or max(1, int(o.num_cpus or 1)), verify=o.verify,
                           key=o.key)
        self.signature = Signature(self.model.bundle, self.model.variant)  # what the ingress validates with
        self.batch_axis = batch_first(self.model)
        self.max_batch = max_batch if self.batch_axis else 1
        generates = self.model.bundle.manifest.generation
        self.scheduler = Scheduler(self.model, slots=slots, max_waiting=max_waiting) if generates else None
        self._batched.set_max_batch_size(self.max_batch)
        self._batched.set_batch_wait_timeout_s(max_delay_s)

    def describe(self) -> Any:
        return self.signature

    async def infer(self, feeds: dict[str, Any]) -> tuple[dict[str, Any], int, float, float]:
        """The results, the rows of the batch that ran them (0 but for the batch's first request, so
        that the ingress counts each batch once), the time queued here and the batch's compute time."""
        return await self._batched((feeds, time.monotonic()))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)  # both set per deployment in __init__
    async def _batched(self, requests: list[tuple[dict[str, Any], float]]) -> list[Any]:
        from toolkit.serve.batching import request_rows, run_merged

        started = time.monotonic()
        answers = await asyncio.to_thread(run_merged, self.model.run_validated, [feeds for feeds, _ in requests],
                                          batch_axis=self.batch_axis, max_batch=self.max_batch)
        compute = time.monotonic() - started
        rows = sum(request_rows(feeds, self.batch_axis) for feeds, _ in requests)
        return [answer if isinstance(answer, Exception) else (answer, rows if i == 0 else 0, started - arrived, compute)
                for i, (answer, (_, arrived)) in enumerate(zip(answers, requests, strict=True))]

    async def events(self, request: Any) -> AsyncIterator[Any]:
        """None once the request is queued (bad arguments and a full queue fail before it), then its
        events; the caller closing the stream cancels the request."""
        if self.scheduler is None:
            raise ToolkitError(f"model {self.model.name!r} is not a decoder with a KV cache.")
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue[Any] = asyncio.Queue()
        handle = self.scheduler.submit(request, lambda event: loop.call_soon_threadsafe(arrived.put_nowait, event))
        try:
            yield None
            while True:
                event = await arrived.get()
                yield event
                if event.last:
                    return
        finally:
            handle.cancel()


class _Remote:
    """A served model whose replicas run in Ray Serve: the protocol routes' endpoint for it."""

    def __init__(self, name: str, handle: Any, signature: Any, metrics: Metrics):
        self.name, self.signature, self._handle, self._metrics = name, signature, handle, metrics
        self._in_flight = 0
        self.generates = bool(signature.bundle.manifest.generation)
        self.healthy = True  # Ray Serve replaces replicas that fail their health checks

    @property
    def depth(self) -> int:
        return self._in_flight

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def run(self, feeds: dict[str, Any], deadline: float | None) -> dict[str, Any]:
        self._in_flight += 1
        try:
            results, rows, queued, compute = await self._call(self._handle.infer.remote(feeds), deadline)
        finally:
            self._in_flight -= 1
        if rows:
            self._metrics.batch_run(self.name, rows)
        self._metrics.request_run(self.name, [queued], compute)
        return results

    def generation_stats(self) -> None:
        return None  # the continuous batches are the replicas'; their gauges are not gathered here

    async def events(self, request: Any) -> EventStream:
        pieces = self._handle.options(stream=True).events.remote(request)
        await self._call(pieces.__anext__(), None)  # the replica's acknowledgement: the request is queued

        def cancel() -> None:  # a client that went away stops the generation in the replica too
            with contextlib.suppress(Exception):
                pieces.cancel()

        return EventStream(lambda: self._call(pieces.__anext__(), None), cancel)

    async def _call(self, response: Any, deadline: float | None) -> Any:
        """The response's value within the deadline; a replica's ToolkitError as itself, what Ray says
        of a replica gone, full or cancelled as Unavailable (503)."""
        try:
            if deadline is None:
                return await response
            return await asyncio.wait_for(_awaited(response), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            with contextlib.suppress(Exception):
                response.cancel()
            raise Unavailable(f"model {self.name!r} did not answer before the request's deadline; it was cancelled.") from None
        except BackPressureError:
            raise Unavailable(f"model {self.name!r} has a full queue on every replica; retry later.") from None
        except _GONE as exc:
            raise Unavailable(f"model {self.name!r}: the replica running this request went away ({type(exc).__name__}); "
                              "retry, Ray Serve is replacing it.") from None
        except ray.exceptions.RayTaskError as exc:
            from toolkit.runtime.generate.scheduler import Busy

            cause = exc.cause if isinstance(exc.cause, Exception) else None
            if isinstance(cause, ToolkitError):
                raise ToolkitError(str(cause)) from None
            if isinstance(cause, Busy):
                raise Unavailable(str(cause)) from None
            raise


async def _awaited(response: Any) -> Any:
    return await response


@serve.deployment
@serve.ingress()
class ProtocolIngress:
    """The protocol's HTTP routes, over handles to the models' deployments."""

    def __init__(self, models: dict[str, Any], options: ServeOptions, key: str | None = None):
        self.models, self.options, self.key = models, options, key

    async def __serve_build_asgi_app__(self) -> Any:
        from toolkit.bundle import Bundle

        signatures = await asyncio.gather(*(handle.describe.remote() for handle in self.models.values()))
        for signature in signatures:  # a signature travels without its bundle's data key; the tokenizer needs it here
            if signature.bundle.sealed:
                signature.bundle = Bundle.open(signature.bundle.path, key=self.key)
        sources = [(name, handle, signature) for (name, handle), signature in zip(self.models.items(), signatures, strict=True)]
        return protocol_app([_Source(*s) for s in sources], self.options, endpoint=lambda source, metrics: _Remote(
            source.name, source.handle, source.signature, metrics))


@dataclass(frozen=True)
class _Source:
    name: str
    handle: Any
    signature: Any


def application(paths: Sequence[str | os.PathLike[str]], options: ServeOptions | None = None,
                ray_options: RayOptions | None = None) -> Any:
    """The Ray Serve application serving the bundles at `paths` with the protocol: `serve.run(app)`
    in an app that already uses Ray. Each bundle is a deployment named after its manifest."""
    options, ray_options = options or ServeOptions(), ray_options or RayOptions()
    return _bind(_bundles(paths, options, ray_options), options, ray_options)


def _bundles(paths: Sequence[str | os.PathLike[str]], options: ServeOptions, ray_options: RayOptions) -> dict[str, str]:
    """{manifest name: absolute path} of the bundles, each opened (and verified) here, so that a bad
    bundle or variant fails now, not in a replica's log."""
    from toolkit.bundle import Bundle
    from toolkit.runtime.model import Signature

    if options.repository:
        raise ToolkitError("the Ray backend serves the bundles it is given; the model repository API (--repository) is "
                           "native-only: redeploy to change what Ray serves.")
    names: dict[str, str] = {}
    for path in paths:
        if ray_options.verify:
            from toolkit.bundle.signing import verify

            verify(path, ray_options.verify)
        bundle = Bundle.open(path, key=ray_options.key)  # a wrong key fails here, before Ray starts
        name = Signature(bundle, ray_options.variant).name
        if name in names:
            raise ToolkitError(f"two bundles are both named {name!r}; serve them from separate servers or rename one.")
        names[name] = str(Path(path).resolve())
    if not names:
        raise ToolkitError("nothing to serve: name at least one bundle.")
    return names


def _bind(names: dict[str, str], options: ServeOptions, ray_options: RayOptions) -> Any:
    """The ingress bound over one deployment per bundle, sized to the cluster this process sees."""
    if ray_options.num_cpus is None:
        ray_options = replace(ray_options, num_cpus=_cpus() / (len(names) * ray_options.most_replicas))
    _check_capacity(len(names), ray_options)
    deployments = {name: ModelReplica.options(name=name, **ray_options.deployment_options(options)).bind(
        path, ray_options, options.max_batch, options.max_delay_ms / 1000, options.slots, options.max_queue) for name, path in names.items()}
    # One ingress replica holds the protocol state (admission, metrics); it only routes, so it needs no CPU of its own.
    ingress = ProtocolIngress.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=options.max_in_flight * 2, logging_config=_QUIET)
    return ingress.bind(deployments, options, ray_options.key)


def serve_with_ray(paths: Sequence[str | os.PathLike[str]], *, host: str = "127.0.0.1", port: int = 8000,
                   options: ServeOptions | None = None, ray_options: RayOptions | None = None, address: str | None = None,
                   tls: TLS | None = None) -> None:
    """Starts Ray (a local instance sized to this machine, or joins the cluster at `address`: "auto"
    finds the one `ray start` began here), runs the application behind Ray Serve's HTTP proxy on
    host:port (0: a free one), and serves until SIGINT or SIGTERM. On the way out it removes what it
    deployed, and stops Ray only if it started it."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options, ray_options = options or ServeOptions(), ray_options or RayOptions()
    names = _bundles(paths, options, ray_options)  # a bad bundle or option fails before Ray starts
    if tls is not None and tls.ca is not None:
        raise ToolkitError("--tls-ca (mutual TLS) is native-only: Ray Serve's HTTP proxy does not ask clients for certificates. "
                           "Serve with --backend native, or put a proxy that checks them in front of Ray.")
    warn_payloads(options)
    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    started = not ray.is_initialized() and not address
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **(_local_resources() if started else {}))
    # SIGINT too: a server started in the background by a shell has it ignored, and would never stop on it
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        app = _bind(names, options, ray_options)  # sized to the cluster it now sees
        serve.start(http_options={"host": host, "port": port, **(_ray_tls(tls) if tls else {})})
        serve.run(app, name=_APP, route_prefix="/", blocking=False)
        _log.info("serving %s with Ray Serve at %s://%s:%d", ", ".join(map(str, paths)), "https" if tls else "http", host, port)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _log.info("stopping: Ray Serve finishes the requests in flight")
        with contextlib.suppress(Exception):
            serve.delete(_APP)
        if started:
            serve.shutdown()
            ray.shutdown()


def _ray_tls(tls: TLS) -> dict[str, Any]:
    return {"ssl_certfile": str(tls.cert.resolve()), "ssl_keyfile": str(tls.key.resolve()),
            **({"ssl_keyfile_password": tls.password} if tls.password else {})}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _cpus() -> float:
    """The CPUs of the Ray cluster this process is connected to, or of this machine."""
    if ray.is_initialized():
        return float(ray.cluster_resources().get("CPU", 1.0))
    return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _check_capacity(bundles: int, o: RayOptions) -> None:
    """Refuses, before deploying, replicas the cluster could never place: Ray would wait for them forever."""
    if not ray.is_initialized():
        return
    have = ray.cluster_resources()
    for resource, each, flag in (("CPU", o.num_cpus or 0.0, "--num-cpus-per-replica"), ("GPU", o.num_gpus, "--num-gpus-per-replica")):
        least = o.autoscale[0] if o.autoscale else o.replicas
        need = bundles * max(least, 1) * each
        if need > have.get(resource, 0.0) + 1e-9:
            raise ToolkitError(f"{bundles} bundle(s) × {max(least, 1)} replica(s) × {each:g} {resource} ({flag}) need {need:g} {resource}; "
                               f"the Ray cluster has {have.get(resource, 0.0):g}. Lower {flag} or the replicas, or add nodes.")


def _local_resources() -> dict[str, Any]:
    """A local instance sized to this machine, with an object store that leaves room for the models:
    Ray's default takes 30% of memory, too much beside several sessions on a small machine."""
    cpus = int(_cpus())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"num_cpus": cpus, "object_store_memory": max(78 << 20, min(2 << 30, memory // 10))}
