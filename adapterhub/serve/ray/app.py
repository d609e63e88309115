"""The Ray Serve application: an ingress running the HTTP API (`api.create_app`), the engine replicas, and
the metrics board; `build_app` binds them, `app_builder` does it from a Ray Serve config file's ``args``, and
`start` runs it on a local or remote Ray cluster (`adapterhub serve --replicas N`).

    ingress (1 replica) ──handle.options(multiplexed_model_id=digest)──▶ EngineReplica × N (Engine each)
        │ create_app(ReplicaFront)                                           │ every 0.5 s
        └──────────────────────── MetricsBoard ◀─────────────────────────────┘

Ray Serve does the rest: it places and restarts replicas, scales them (``autoscale``), routes by adapter
digest, and its proxy terminates HTTP. Every replica reads adapters from one registry (``registry``: an
``oci://`` URL when replicas run on several hosts).
"""

from __future__ import annotations

import time

import ray
from ray import serve

from adapterhub.errors import ConfigError
from adapterhub.serve.api import create_app
from adapterhub.serve.limits import HttpLimits
from adapterhub.serve.ray.config import RayServeConfig
from adapterhub.serve.ray.front import ReplicaFront
from adapterhub.serve.ray.metrics import MetricsBoard
from adapterhub.serve.ray.replica import EngineReplica

APP_NAME = "adapterhub"


class _ReplicaApp:
    """The ASGI app `serve.ingress` wraps: it forwards to the HTTP app of the ingress replica it runs in (built
    in that replica's constructor, which `serve.ingress` cannot reach). The app has no startup or shutdown
    work, so lifespan events are answered here."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rpartition(".")[2]  # "startup" | "shutdown"
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        await serve.get_replica_context().servable_object.http_app(scope, receive, send)


@serve.ingress(_ReplicaApp())
class Ingress:
    """The HTTP entry: the one implementation of the API, on a `ReplicaFront` instead of an `Engine`."""

    def __init__(self, config: RayServeConfig, replicas, board, api_key: str | None, limits: HttpLimits) -> None:
        self.front = ReplicaFront(config, replicas, board)
        self.http_app = create_app(self.front, api_key=api_key, limits=limits)

    def __del__(self) -> None:
        self.front.close()


def build_app(config: RayServeConfig, api_key: str | None = None, limits: HttpLimits = HttpLimits()):
    """The bound application for `serve.run`. `api_key` None: the ingress reads ADAPTERHUB_API_KEY from its
    environment (on a cluster, set it in the runtime_env or the pod spec)."""
    board = serve.deployment(MetricsBoard, name="MetricsBoard", num_replicas=1,
                             ray_actor_options={"num_cpus": 0}).bind()
    replicas = serve.deployment(EngineReplica, name="EngineReplica", **config.replica_options()).bind(config, board)
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, max_ongoing_requests=4 * config.max_queue,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(config, replicas, board, api_key, limits)


def app_builder(args: dict):
    """For a Ray Serve config file: ``import_path: adapterhub.serve.ray.app:app_builder`` with ``args`` naming
    `RayServeConfig` fields (deploy/serve-config.yaml)."""
    return build_app(RayServeConfig.from_args(dict(args)))


def start(config: RayServeConfig, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, limits: HttpLimits = HttpLimits(), timeout_s: float = 600.0) -> str:
    """Connects to Ray (`address`: "auto", "ray://host:10001", or None for a new local instance), deploys the
    application and waits until every replica is up; returns the HTTP base URL."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config, api_key, limits), name=APP_NAME, route_prefix="/", blocking=False)
    wait_until_running(timeout_s)
    return f"http://{host}:{port}"


def wait_until_running(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(APP_NAME)
        state = str(getattr(status, "status", "")).rpartition(".")[2]
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY") or time.monotonic() > deadline:
            message = getattr(status, "message", "") or "no status"
            raise ConfigError(f"the Ray Serve application '{APP_NAME}' is {state or 'not running'} after "
                              f"{timeout_s:g} s: {message}; see the Ray logs (/tmp/ray/session_latest/logs)")
        time.sleep(0.5)
