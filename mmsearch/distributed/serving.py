"""`mmsearch serve --ray ADDRESS --shards DIR`: a sharded index as a Ray Serve application.

    HTTP -> Ray Serve proxy -> router (ingress: mmsearch/serve's app and page) -> shard-0 .. shard-(n-1)
                                   ShardedSearcher over handles           each: R replicas of ShardWorker

One deployment per shard, each with R replicas (`--replicas`), every replica a ShardWorker
(search/shard.py) that memory-maps its shard's vectors (read-only: replicas on one node share the
pages). The router deployment is the ingress: the same FastAPI app `mmsearch serve` runs, whose state
(serve/sharded.py) searches through search/sharded.py's ShardedSearcher with RayClient(handle) as the
shard clients; the scatter/gather, the retries and the partial answers are that module's.

Where replicas run: anywhere by default (the shard folders must then be readable on every node: a
shared filesystem); with `pin=True` a shard's replicas need the custom resource `mmsearch-shard-N`,
which the nodes holding a copy of that shard's folder declare (`ray start --resources
'{"mmsearch-shard-2": 1}'`), and the router's replicas need `mmsearch-router` (the head, say: it reads the
query towers from a shard folder on its node, so it goes where one is).

Ray and Ray Serve are imported only when an application is built (`pip install 'mmsearch[cluster]'`).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Optional, Sequence

from mmsearch.errors import DistributedError
from mmsearch.storage.shardmap import ShardMap

APP_NAME = "mmsearch"
SHARD_RESOURCE = "mmsearch-{name}"  # the custom resource a pinned shard's replicas ask for
ROUTER_RESOURCE = "mmsearch-router"  # ... and the router's, when pinned


def import_serve():
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise DistributedError("--ray with --shards needs Ray Serve on this machine and on every node: "
                               "pip install 'mmsearch[cluster]'") from exc
    return ray, serve


class RayClient:
    """A shard deployment's handle as a ShardedSearcher client: submit(method, *args).result(timeout).

    With `loop` (the router replica's event loop) each call is awaited on that loop, from the request's
    worker thread: Ray Serve's throughput-optimised mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1) runs a
    handle's router in the replica's own loop and refuses calls made outside it."""

    def __init__(self, handle, loop: Optional[asyncio.AbstractEventLoop] = None):
        self.handle, self.loop = handle, loop

    def submit(self, method: str, *args):
        if self.loop is not None and not _on(self.loop):
            return asyncio.run_coroutine_threadsafe(self._call(method, args), self.loop)
        return _Reply(getattr(self.handle, method).remote(*args))

    async def _call(self, method: str, args: tuple):
        return await getattr(self.handle, method).remote(*args)


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread runs `loop` (a blocking wait there for the loop's own work would never end)."""
    return _running_loop() is loop


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _Reply:
    def __init__(self, response):
        self.response = response

    def result(self, timeout: Optional[float] = None):
        return self.response.result(timeout_s=timeout)

    def cancel(self) -> None:
        self.response.cancel()


def open_towers(smap: ShardMap):
    """An IndexStore of the first shard folder this node can open: the query towers and the re-ranker."""
    from mmsearch.errors import MmsearchError
    from mmsearch.storage.shared import ServingStore

    reasons = []
    for name in smap.names:
        try:
            smap.check_shard(name)
            return ServingStore.open_shared(smap.folder(name))
        except MmsearchError as exc:
            reasons.append(str(exc))
    raise DistributedError(f"the router cannot open any shard folder of {smap.root} on this node, and reads the "
                           f"query towers from one ({reasons[0] if reasons else 'no shards'})")


class Router:
    """The ingress deployment: mmsearch/serve's app over handles to the shard deployments."""

    def __init__(self, root: str, handles: list, options: dict):
        from mmsearch.search.sharded import COLD_S, ShardedSearcher

        self.root, self.options = Path(root), dict(options)
        smap = ShardMap.load(self.root)
        loop = _running_loop()  # Ray Serve runs a deployment's constructor on the replica's event loop
        self.searcher = ShardedSearcher([RayClient(h, loop) for h in handles], smap.names, open_towers(smap),
                                        timeout_s=self.options.get("timeout_s", 5.0),
                                        probe_s=self.options.get("probe_s", 0.5), allow_paths=False,
                                        cold_s=self.options.get("cold_s", COLD_S))

    def __serve_build_asgi_app__(self):
        from mmsearch.serve.app import build_app
        from mmsearch.serve.sharded import ShardedServeState

        o = self.options
        state = ShardedServeState(self.searcher, self.root, max_upload_bytes=o.get("max_upload_bytes", 20 << 20))
        return build_app(state=state, token=o.get("token"), allowed_hosts=o.get("allowed_hosts") or (),
                         bind=o.get("bind", "127.0.0.1"), cors_origins=o.get("cors_origins") or (),
                         max_upload_bytes=o.get("max_upload_bytes", 20 << 20), warm=True)


def build_application(root, replicas: int = 2, router_replicas: int = 1, pin: bool = False,
                      replica_cpus: float = 0.5, options: Optional[dict] = None):
    """The Ray Serve application for the layout at `root` (checked first: another model's shard or a
    missing one is refused before anything is deployed)."""
    _, serve = import_serve()
    from mmsearch.search.shard import ShardWorker

    root = Path(root).resolve()
    smap = ShardMap.load(root)
    smap.check()
    if replicas < 1 or router_replicas < 1:
        raise DistributedError("--replicas must be at least 1")
    common = dict(max_ongoing_requests=64, health_check_period_s=2.0, health_check_timeout_s=10.0,
                  graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=5.0)
    shards = []
    for name in smap.names:
        actor = {"num_cpus": replica_cpus}
        if pin:
            actor["resources"] = {SHARD_RESOURCE.format(name=name): 0.001}
        dep = serve.deployment(ShardWorker, name=name, num_replicas=replicas, ray_actor_options=actor, **common)
        shards.append(dep.bind(str(root), name))
    actor = {"num_cpus": replica_cpus, **({"resources": {ROUTER_RESOURCE: 0.001}} if pin else {})}
    router = serve.deployment(serve.ingress()(Router), name="router", num_replicas=router_replicas,
                              ray_actor_options=actor, **common)
    return router.bind(str(root), shards, dict(options or {}))


def connect(address: str) -> None:
    ray, _ = import_serve()
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise DistributedError(f"cannot connect to the Ray cluster at {address}: "
                               f"{type(exc).__name__}: {text[-1] if text else ''}") from exc


def deploy(address: str, root, host: str = "127.0.0.1", port: int = 8000, proxy: str = "HeadOnly",
           replicas: int = 2, router_replicas: int = 1, pin: bool = False, replica_cpus: float = 0.5,
           options: Optional[dict] = None, timeout_s: float = 300.0) -> str:
    """Start Ray Serve's proxy on host:port (the cluster's, or a new one) and run the application; returns
    the URL once every replica is up. A running application of the same name is updated in place."""
    connect(address)
    _, serve = import_serve()
    app = build_application(root, replicas, router_replicas, pin, replica_cpus,
                            dict(options or {}, bind=host))
    try:
        serve.start(proxy_location=proxy, http_options={"host": host, "port": int(port)})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise DistributedError(f"Ray Serve could not start the application: {type(exc).__name__}: "
                               f"{text[-1] if text else ''}") from exc
    shown = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "::") else host)
    return f"http://{shown}:{port}/"


def shard_replicas(app_name: str = APP_NAME) -> dict[str, list[str]]:
    """{deployment: [names of its live replica actors]} of the running application (namespace "serve"):
    what a drill kills with ray.kill(ray.get_actor(name, namespace="serve"))."""
    ray, _ = import_serve()
    out: dict[str, list[str]] = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"] if isinstance(a, dict) else a
        if name.startswith(f"SERVE_REPLICA::{app_name}#"):
            out.setdefault(name.split("#")[1], []).append(name)
    return out


def stop(app_name: str = APP_NAME) -> None:
    _, serve = import_serve()
    serve.delete(app_name)


__all__: Sequence[str] = ("build_application", "deploy", "stop", "RayClient", "Router", "open_towers")
