"""The settings of a Ray Serve application: one frozen dataclass, built once at the boundary (the CLI, or the
``args`` of a Ray Serve config file) and shipped to every replica.

Each replica runs the single-process `Engine` on its own copy of the base; these fields say which base,
which registry every replica reads (an ``oci://`` URL across hosts), and how Ray Serve sizes and routes.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapterhub.errors import ConfigError, check_known_keys
from adapterhub.serve.engine import EngineConfig

ROUTINGS = ("multiplexed", "default")


@dataclass(frozen=True)
class RayServeConfig:
    base: str = "tiny"  # 'tiny', an HF checkpoint dir or a cached hub id, readable on every node
    registry: str | None = None  # a path (one host) or oci://host:port/namespace (a cluster); None: ADAPTERHUB_HOME
    dtype: str = "bfloat16"
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas: Ray Serve's autoscaling instead of `replicas`
    max_adapters: int = 16  # the pool of each replica = max_num_models_per_replica of the multiplexing
    max_batch: int = 16  # rows decoded together per replica = the requests Ray Serve sends one replica at once
    max_queue: int = 64  # requests waiting in the ingress for a replica before HTTP 429
    max_seq: int | None = None
    allow_base_mismatch: bool = False
    allow_hub: bool = False
    routing: str = "multiplexed"  # "default": Ray Serve's routing without the adapter affinity (benchmarks)
    replica_cpus: float = 1.0  # Ray CPUs a replica reserves; also its torch threads (at least 1)
    health_check_period_s: float = 2.0  # how soon Ray notices a dead replica and starts another
    max_attempts: int = 3  # tries of a request whose replica died before it sent any token

    def __post_init__(self) -> None:
        problems = []
        if self.routing not in ROUTINGS:
            problems.append(f"routing is {self.routing!r}; use one of {', '.join(ROUTINGS)}")
        if self.dtype not in ("bfloat16", "float32"):
            problems.append(f"dtype is {self.dtype!r}; use bfloat16 or float32")
        if self.replicas < 1:
            problems.append(f"replicas is {self.replicas}; use 1 or more")
        if self.autoscale is not None and not (len(self.autoscale) == 2 and 0 <= self.autoscale[0] <= self.autoscale[1]
                                               and self.autoscale[1] >= 1):
            problems.append(f"autoscale is {self.autoscale!r}; give MIN,MAX with 0 <= MIN <= MAX and MAX >= 1")
        for name in ("max_adapters", "max_batch", "max_queue", "max_attempts"):
            if getattr(self, name) < 1:
                problems.append(f"{name} is {getattr(self, name)}; use 1 or more")
        if self.replica_cpus < 0:
            problems.append(f"replica_cpus is {self.replica_cpus}; use 0 or more")
        if problems:
            raise ConfigError("Ray Serve settings: " + "; ".join(problems))

    @classmethod
    def from_args(cls, args: dict) -> RayServeConfig:
        """From the ``args`` mapping of a Ray Serve config file (`serve deploy`); unknown keys are an error."""
        check_known_keys(cls, args, "Ray Serve args")
        values = dict(args)
        if isinstance(values.get("autoscale"), str):
            values["autoscale"] = parse_autoscale(values["autoscale"])
        elif values.get("autoscale") is not None:
            values["autoscale"] = tuple(values["autoscale"])
        return cls(**values)

    def engine_config(self) -> EngineConfig:
        # A replica's own queue only holds what Ray Serve already admitted (at most max_batch at a time).
        return EngineConfig(max_batch=self.max_batch, max_queue=max(self.max_queue, self.max_batch),
                            max_seq=self.max_seq, base_name=self.base, allow_base_mismatch=self.allow_base_mismatch,
                            allow_hub=False)

    def replica_options(self) -> dict:
        """Ray Serve deployment options of the engine replicas."""
        scale = ({"autoscaling_config": {"min_replicas": self.autoscale[0], "max_replicas": self.autoscale[1],
                                         "initial_replicas": max(1, self.autoscale[0]),
                                         "target_ongoing_requests": max(1, self.max_batch // 2)}}
                 if self.autoscale else {"num_replicas": self.replicas})
        return {
            **scale,
            # A replica takes what one batch holds; beyond that Ray Serve keeps the request and routes it to
            # the next replica with room (first to one holding the adapter), instead of queueing behind a batch.
            "max_ongoing_requests": self.max_batch,
            "max_queued_requests": self.max_queue,  # then BackPressureError: HTTP 429, as the engine's bound
            "ray_actor_options": {"num_cpus": self.replica_cpus},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": max(10.0, 5 * self.health_check_period_s),
            "graceful_shutdown_timeout_s": 5.0,
        }

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.replica_cpus))


def parse_autoscale(text: str) -> tuple[int, int]:
    """'MIN,MAX' → (MIN, MAX)."""
    parts = text.split(",")
    try:
        low, high = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--autoscale is {text!r}; give MIN,MAX replicas, e.g. 1,4") from None
    return low, high
