"""Replicas of the serving engine on Ray Serve (``pip install adapterhub[ray]``; ``adapterhub serve --replicas N``).

- ``config.py``   `RayServeConfig`: the settings, validated once, shipped to every replica
- ``replica.py``  `EngineReplica`: one `Engine` per replica, `serve.multiplexed` keyed by adapter digest
- ``front.py``    `ReplicaFront`: what the HTTP app (`serve/api.py`, unchanged) calls, backed by the replicas
- ``metrics.py``  `MetricsBoard` (replicas report to it) and the per-replica /metrics
- ``app.py``      the ingress deployment, `build_app`, `app_builder` (Ray Serve config files), `start`

Importing this package imports ray; nothing else in adapterhub does.
"""

from adapterhub.serve.ray.app import APP_NAME, app_builder, build_app, start
from adapterhub.serve.ray.config import RayServeConfig, parse_autoscale

__all__ = ["APP_NAME", "RayServeConfig", "app_builder", "build_app", "parse_autoscale", "start"]
