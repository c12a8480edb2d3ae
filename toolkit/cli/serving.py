"""`toolkit serve` and `toolkit package`: a bundle behind HTTP here, or in a Triton model repository."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from toolkit.cli.commands import Backend, KeyOption, Provider, _command, err, out
from toolkit.errors import ToolkitError


@_command
def serve(
    bundle_dirs: list[Path] | None = typer.Argument(None, metavar="DIR...", help="Bundles to serve, each under its manifest name (or none, with --repository)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the server beyond this machine."),
    port: int = typer.Option(8000, help="TCP port (0: a free one, printed once the server has started)."),
    variant: str | None = typer.Option(None, help="Variant of every bundle (default fp32; 'best' after toolkit build)."),
    provider: Provider = typer.Option(Provider.auto, help="Execution provider."),
    max_batch: int = typer.Option(32, "--max-batch", help="Rows per merged batch (1 turns dynamic batching off)."),
    max_delay_ms: float = typer.Option(0.0, "--max-delay-ms", help="How long the oldest request may wait for more to join its batch (0: a batch is what queued while the last one ran)."),
    max_queue: int = typer.Option(256, "--max-queue", help="Requests waiting per model before new ones get 503."),
    timeout_ms: float | None = typer.Option(None, "--timeout-ms", help="Drop a request that waited this long in the queue (503)."),
    token: str | None = typer.Option(None, envvar="TOOLKIT_TOKEN", show_envvar=True,
                                     help="Bearer token required on every route but /v2/health (one key with every scope; see --keys)."),
    keys: Path | None = typer.Option(None, "--keys", metavar="FILE", help="Scoped API keys (`toolkit keys add FILE ...`): each key may "
                                     "infer, generate or explain on named models, read /metrics or administer the repository; 401 for an "
                                     "unknown key, 403 outside its scopes. Read again on SIGHUP."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", metavar="PEM", help="Serve over TLS only, with this certificate (chain)."),
    tls_key: Path | None = typer.Option(None, "--tls-key", metavar="PEM", help="The certificate's private key (a password in TOOLKIT_TLS_KEY_PASSWORD)."),
    tls_ca: Path | None = typer.Option(None, "--tls-ca", metavar="PEM", help="Mutual TLS: require a client certificate issued by this CA."),
    log_payloads: bool = typer.Option(False, "--log-payloads", help="Log request and response bodies (inputs, prompts, generated "
                                      "text) for debugging; off by default, where the access log carries no payload."),
    body_timeout_s: float = typer.Option(30.0, "--body-timeout-s", help="The longest a request body may take to arrive (408 beyond)."),
    key: KeyOption = None,
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body accepted (413 beyond)."),
    threads: int | None = typer.Option(None, help="onnxruntime intra-op threads per model (default: the CPUs this process may use; `toolkit bench --threads 1,2` shows which count is fastest)."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="CUDA: capture each batch shape's run as a CUDA graph and replay it (one launch per request batch); decoders' generate routes use CUDA graphs on CUDA anyway."),
    verify: Path | None = typer.Option(None, "--verify", metavar="PUB", help="Serve only bundles signed with this public key (PEM) and unchanged since (`toolkit sign`)."),
    repository: list[Path] | None = typer.Option(None, "--repository", metavar="REPO", help="A directory of bundles (REPO/<name>/) that POST /v2/repository/models/<name>/load and /unload may load and unload while serving (repeatable)."),
    max_in_flight: int = typer.Option(256, "--max-in-flight", help="Requests being read, queued or run at once, all models together (503 beyond)."),
    max_in_flight_mb: float = typer.Option(2048.0, "--max-in-flight-mb", help="Memory those requests may hold at once, a JSON body counted at 14× its size, what decoding it may hold (503 beyond)."),
    slots: int = typer.Option(16, "--slots", help="A decoder's cache slots: generations decoded together in one continuous batch (more wait "
                              "for a slot up to --timeout-ms, else 30 s, then 503; --max-queue of them)."),
    max_prompt_mb: float = typer.Option(1.0, "--max-prompt-mb", help="Largest prompt (or rendered chat) a generate request may send, in UTF-8 (413 beyond)."),
    backend: Backend = typer.Option(Backend.native, help="native: this process (uvicorn). ray: Ray Serve, each bundle a deployment of "
                                    "replicas, on this machine or a cluster (--address); needs the ray extra. Same routes either way."),
    replicas: int | None = typer.Option(None, "--replicas", help="ray: replicas per bundle (default 1)."),
    autoscale: str | None = typer.Option(None, "--autoscale", metavar="MIN:MAX", help="ray: scale each bundle's replicas between MIN and MAX on requests in flight."),
    address: str | None = typer.Option(None, "--address", help="ray: join this Ray cluster (HOST:PORT of `ray start --head`, or 'auto') instead of starting one sized to this machine."),
    num_cpus: float | None = typer.Option(None, "--num-cpus-per-replica", help="ray: CPUs each replica reserves (default: the cluster's CPUs shared among all replicas; its whole part is also the replica's onnxruntime threads unless --threads)."),
    num_gpus: float | None = typer.Option(None, "--num-gpus-per-replica", help="ray: GPUs each replica reserves (default 0; fractions share a GPU)."),
) -> None:
    """Serve bundles over the Open Inference Protocol (KServe v2 REST), with Triton's binary tensor and
    generate extensions, dynamic batching and Prometheus /metrics, and the OpenAI API (/v1/completions,
    /v1/chat/completions, /v1/embeddings, /v1/models); decoders generate in continuous batches.
    Ctrl-C drains requests in flight. `--backend ray` runs the models in Ray Serve replicas behind the same routes."""
    import importlib.util

    missing = [m for m in ("uvicorn", "starlette") if importlib.util.find_spec(m) is None]
    if missing:
        raise ToolkitError(f"toolkit serve needs the serve extra ({', '.join(missing)} missing): pip install 'toolkit[serve]'.")
    from toolkit.runtime.model import load
    from toolkit.serve.app import ServeOptions
    from toolkit.serve.app import serve as run_server
    from toolkit.serve.keys import Keys
    from toolkit.serve.tls import TLS

    options = ServeOptions(max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue, timeout_ms=timeout_ms,
                           token=token, max_body_bytes=int(max_body_mb * (1 << 20)), max_in_flight=max_in_flight,
                           max_in_flight_bytes=int(max_in_flight_mb * (1 << 20)), slots=slots, max_prompt_bytes=int(max_prompt_mb * (1 << 20)),
                           repository=tuple(repository or ()), keys=keys.resolve() if keys else None, log_payloads=log_payloads, body_timeout_s=body_timeout_s)
    tls = TLS.of(tls_cert, tls_key, tls_ca)
    if keys is not None:
        Keys.from_file(keys)  # a bad keys file fails now, not at the first request
    ray_flags = {"--replicas": replicas, "--autoscale": autoscale, "--address": address, "--num-cpus-per-replica": num_cpus,
                 "--num-gpus-per-replica": num_gpus}
    if backend == Backend.ray:
        _serve_with_ray(bundle_dirs or [], host, port, options, variant=variant, provider=provider.value, threads=threads,
                        verify=verify, cuda_graph=cuda_graph, replicas=replicas, autoscale=autoscale, address=address, num_cpus=num_cpus,
                        num_gpus=num_gpus, key=key, tls=tls)
        return
    given = [flag for flag, value in ray_flags.items() if value is not None]
    if given:
        raise ToolkitError(f"{given[0]} is an option of the Ray backend; add --backend ray.")
    missing = [str(r) for r in options.repository if not r.is_dir()]
    if missing:
        raise ToolkitError(f"--repository {missing[0]} is not a directory.")
    if not bundle_dirs and not options.repository:
        raise ToolkitError("give the bundles to serve (DIR...), or a --repository to load them from.")

    def loader(path: Path) -> Any:
        return load(path, variant=variant, provider=provider.value, threads=threads, cuda_graph=cuda_graph, verify=verify, key=key)

    models = [loader(d) for d in bundle_dirs or []]
    scheme = "https" if tls else "http"
    where = f"{scheme}://{host}:{port}" if port else f"{scheme}://{host} on a free port (below)"
    for m in models:
        threads_note = f", {threads} thread" + "s" * (threads > 1) if threads else ""
        graphs = ", CUDA graphs" if m.cuda_graph else ""
        err.print(f"serving {m.name} ({m.variant} on {m.provider}{threads_note}{graphs}) at {where}/v2/models/{m.name}"
                  + (f" and {where}/v1 (OpenAI)" if m.bundle.manifest.generation else ""))
    run_server(models, host=host, port=port, options=options, loader=loader, tls=tls)


def _serve_with_ray(bundle_dirs: list[Path], host: str, port: int, options: Any, *, variant: str | None, provider: str,
                    threads: int | None, verify: Path | None, cuda_graph: bool, replicas: int | None, autoscale: str | None,
                    address: str | None, num_cpus: float | None, num_gpus: float | None, key: Path | None, tls: Any) -> None:
    if cuda_graph:
        raise ToolkitError("--cuda-graph is native-only; the Ray backend runs each replica's session without CUDA graphs.")
    if replicas is not None and autoscale is not None:
        raise ToolkitError("give --replicas or --autoscale, not both.")
    bounds = None
    if autoscale is not None:
        low, _, high = autoscale.partition(":")
        if not (low.isdigit() and high.isdigit()):
            raise ToolkitError(f"--autoscale takes MIN:MAX, two whole numbers (e.g. 1:4), got {autoscale!r}.")
        bounds = (int(low), int(high))
    from toolkit.serve.ray_backend import RayOptions, serve_with_ray

    ray_options = RayOptions(replicas=replicas or 1, autoscale=bounds, num_cpus=num_cpus,
                             num_gpus=num_gpus or 0.0, variant=variant, provider=provider, threads=threads,
                             verify=str(verify) if verify else None, key=str(key.resolve()) if key else None)
    where = "the cluster at " + address if address else "a local Ray instance"
    err.print(f"serving {', '.join(map(str, bundle_dirs))} with Ray Serve on {where}, "
              f"{f'{bounds[0]} to {bounds[1]}' if bounds else ray_options.replicas} replica(s) each")
    serve_with_ray(bundle_dirs, host=host, port=port, options=options, ray_options=ray_options, address=address, tls=tls)


@_command
def package(
    bundle_dir: Path = typer.Argument(..., metavar="DIR", help="Bundle to package."),
    triton: Path = typer.Option(..., "--triton", metavar="REPO", help="Triton model repository to write <name>/ into (and <name>-<part>/ for each part of the bundle, e.g. an encoder)."),
    variant: str | None = typer.Option(None, help="Variant to package (default fp32; 'best' after toolkit build)."),
    max_batch: int = typer.Option(32, "--max-batch", help="Triton max_batch_size (0: no batching)."),
    max_delay_ms: float = typer.Option(0.0, "--max-delay-ms", help="dynamic_batching max queue delay."),
    instances: int = typer.Option(1, help="Model instances (instance_group count)."),
    kind: str = typer.Option("KIND_AUTO", help="instance_group kind: KIND_AUTO, KIND_GPU or KIND_CPU."),
    force: bool = typer.Option(False, "--force", help="Replace REPO/<name> if it exists."),
    key: KeyOption = None,
) -> None:
    """Write a Triton Inference Server model repository entry (config.pbtxt and 1/model.onnx). An
    encrypted bundle is decrypted with --key in memory, straight into REPO, which then holds it in the
    clear: Triton's onnxruntime backend reads only plain files."""
    from toolkit.serve.triton import package_triton

    target = package_triton(bundle_dir, triton, variant=variant, max_batch=max_batch, max_delay_ms=max_delay_ms,
                            instances=instances, kind=kind, force=force, key=key)
    if key is not None:
        err.print(f"note: {target} holds the model decrypted; protect that repository as you would the key.")
    out.print(f"wrote {target}: config.pbtxt and 1/model.onnx; serve with `tritonserver --model-repository {triton}`")
