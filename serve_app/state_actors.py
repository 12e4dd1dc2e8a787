"""The app's shared state lives in detached Ray actors on the head node (the usage store, the adapter
registry): no server of their own on a laptop or a cluster, and they outlive ingress and engine replicas."""

from __future__ import annotations

from serve_app.config import HEAD_NODE_RESOURCE

STATE_NAMESPACE = "tuneserve"


def state_uri(path: str | None, app_name: str) -> str | None:
    """Where an app's state actor saves: `<path>/<app>` in storage (path relative to the storage root, or a
    URI); None keeps it in the actor's memory only."""
    from cluster.storage import locate

    return locate(path).join(app_name).uri if path else None


def open_state_actor(actor_class, name: str, head_node: bool, *args):
    """The detached actor `name`, created with `args` (from which it reads its saved state) if it does not
    exist. Restarted by Ray if its process dies; its callers never retry a call on their own."""
    options = {"name": name, "namespace": STATE_NAMESPACE, "lifetime": "detached", "get_if_exists": True,
               "max_restarts": -1, "max_task_retries": 0}
    if head_node:
        options["resources"] = {HEAD_NODE_RESOURCE: 0.001}
    return actor_class.options(**options).remote(*args)
