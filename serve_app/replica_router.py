"""How the requests of a local model are spread over its engine replicas: Ray Serve request routers
(Serve's public `ray.serve.request_router` API), chosen per model by `routing` in the config.

**prefix** (the default for a model with more than one replica): each vLLM engine keeps its own prefix
cache, so a conversation's next turn is cheapest on the replica that answered its last one. The router
keys a request by what stays the same over a conversation: its `x-session-id` header when the client sends
one, else the start of its prompt, up to and including the first user message (the system prompt and the
conversation's opening; the first 1,024 characters of a raw prompt), plus the model and adapter id. It ranks
the replicas by rendezvous hashing of that key: the top one is the key's home, and when a replica goes, only
the keys whose home it was move. The choice needs no state shared between the ingress replicas, each of which
routes on its own: all of them send a conversation to the same engine, at no cost per request (a hash of at most
16 KiB per replica). Why not a prefix tree of everything sent, as Ray's PrefixCacheAffinityRouter keeps: a tree
per ingress replica would send a conversation wherever that replica had seen it, and a shared tree costs an actor
call per request. What keying on the opening gives up: requests that share a long prefix but open differently
(few-shot prompts with different questions in one message) are spread, not gathered; each engine prefills
that shared part once and then has it cached itself.

Load guard: a replica with more than `routing_load_gap` requests in flight beyond the least loaded one (the higher
of Serve's queue-length cache and this router's own count) is skipped for the next replica in the key's order,
and a full one (max_ongoing_requests) is skipped by Serve itself. When load evens out the key goes home again.

**round_robin**: replicas in turn. **power_of_two**: Serve's own router (no request_router_config).

Adapters: with live adapters, Serve's multiplexing first narrows the candidates to replicas holding the
adapter; the adapter id (and the model id of a static adapter) is part of the key either way.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, OrderedDict
from typing import Any

from ray.serve.request_router import MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

KEY_CHARS = 16_384  # at most this much of a prompt is hashed per request
RAW_PROMPT_KEY_CHARS = 1_024  # a raw prompt has no turns: its start (~256 tokens) stands for the conversation
RAW_PROMPT_KEY_TOKENS = 256
SEEN_KEYS = 65_536  # keys remembered per router, for the hit metric only
UNROUTED_S = 600.0  # a request chosen for but never routed (cancelled while queued) stops counting after this
ROUTER_CLASSES = {"prefix": "serve_app.replica_router:PrefixAffinityRouter",
                  "round_robin": "serve_app.replica_router:RoundRobinRouter"}


def request_router_config(model) -> Any:
    """The deployment's request_router_config for the model's routing, or None for Serve's default."""
    from ray.serve.config import RequestRouterConfig

    policy = model.effective_routing()
    if policy == "power_of_two":
        return None
    kwargs = {"load_gap": model.routing_load_gap, "model": model.id} if policy == "prefix" else {}
    return RequestRouterConfig(request_router_class=ROUTER_CLASSES[policy], request_router_kwargs=kwargs)


# -- the key --------------------------------------------------------------------------------------------------

def _text(content: Any) -> str:
    """A message's content as text: strings as they are, text parts joined, other parts (images, audio) as
    their JSON, so that two different images do not share a key."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) and isinstance(part.get("text"), str)
                       else json.dumps(part, sort_keys=True, default=str) for part in content)
    return json.dumps(content, sort_keys=True, default=str)


def _opening(messages: list) -> str:
    """The messages up to and including the first user message, as role-tagged text."""
    parts = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = str(message.get("role", ""))
        parts.append(f"\x1e{role}\x1f{_text(message.get('content'))}")
        if role == "user":
            break
    return "".join(parts)


def prompt_opening(endpoint: str, body: dict) -> str | None:
    """What stays the same over a conversation's turns, or None (embeddings, or nothing to key on)."""
    if endpoint == "chat":
        messages = body.get("messages")
        return _opening(messages) if isinstance(messages, list) and messages else None
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:  # a batch of prompts, or one prompt as token ids
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt[:RAW_PROMPT_KEY_CHARS] or None
        if isinstance(prompt, list):
            return ",".join(map(str, prompt[:RAW_PROMPT_KEY_TOKENS])) or None
        if isinstance(prompt, int):
            return str(prompt)
        return None
    if endpoint == "responses":
        instructions = body.get("instructions") or ""
        given = body.get("input")
        if isinstance(given, str):
            opening = f"\x1euser\x1f{given}"
        elif isinstance(given, list):
            opening = _opening(given)
        else:
            return None
        return f"\x1einstructions\x1f{instructions}{opening}"
    return None


def routing_key(endpoint: str, body: dict, session_id: str = "", adapter_id: str = "") -> bytes | None:
    """The request's key (a 16-byte digest), or None when it has none."""
    model = f"{body.get('model', '')}\x1d{adapter_id}\x1d"
    if session_id:
        text = f"{model}session\x1d{session_id}"
    else:
        opening = prompt_opening(endpoint, body)
        if opening is None:
            return None
        text = f"{model}prompt\x1d{opening[:KEY_CHARS]}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def rendezvous_order(key: bytes, replica_ids: list[str]) -> list[str]:
    """The replicas from the key's most preferred to its least (highest random weight hashing)."""
    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(replica_id.encode(), key=key, digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


def _request_key(pending_request: PendingRequest | None) -> bytes | None:
    """The key of an engine call `serve(endpoint, body, request_id, client_wants_usage)`."""
    if pending_request is None:
        return None
    args = pending_request.args
    if len(args) < 2 or not isinstance(args[0], str) or not isinstance(args[1], dict):
        return None
    metadata = pending_request.metadata
    return routing_key(args[0], args[1], metadata.session_id or "", metadata.multiplexed_model_id or "")


# -- metrics ----------------------------------------------------------------------------------------------------

_decisions = None


def _decision_counter():
    """tuneserve_routing_decisions_total{model, decision, app}: hit (the key's replica, which this router sent it
    to before), miss (the key's replica, the key new to this router), spilled (another replica: the key's was
    loaded or full), no_key. The router's prefix-hit rate is hit / (hit + miss + spilled)."""
    global _decisions
    if _decisions is None:
        from ray.util import metrics

        _decisions = metrics.Counter("tuneserve_routing_decisions_total",
                                     description="Engine requests by the prefix router's decision.",
                                     tag_keys=("model", "decision", "app"))
    return _decisions


# -- the routers ------------------------------------------------------------------------------------------------

class _Candidates(MultiplexMixin, RequestRouter):
    """Candidates as Serve's multiplexing narrows them for a live adapter's request."""

    def _candidates(self, candidate_replicas: list[RunningReplica],
                    pending_request: PendingRequest | None) -> list[RunningReplica]:
        if pending_request is None:
            return candidate_replicas
        if pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
            narrowed = [r for r in candidate_replicas if r.replica_id in ids]
            if narrowed:
                return narrowed
        # Every replica is offered at once: when all of them refuse (full), Serve should back off before it
        # asks again, not probe them in a tight loop (Serve's own routers say so the same way).
        pending_request.routing_context.should_backoff = True
        return candidate_replicas


class PrefixAffinityRouter(_Candidates):
    def initialize_state(self, load_gap: int = 8, model: str = ""):
        self.load_gap = load_gap
        self.model = model
        # This router's own requests per replica, counted from the moment it chooses (Serve's queue-length
        # cache counts a request only once it is sent, so requests routed together would all see the same
        # replica idle), and the requests behind the counts: chosen (internal id -> key, home, replica counted,
        # when) and routed (internal id -> replica). A request cancelled before it is routed is let go after
        # UNROUTED_S.
        self._in_flight: Counter[ReplicaID] = Counter()
        self._chosen: OrderedDict[str, tuple[bytes, ReplicaID, ReplicaID, float]] = OrderedDict()
        self._routed: dict[str, ReplicaID] = {}
        self._seen: OrderedDict[bytes, ReplicaID] = OrderedDict()  # key -> where it last went (hit metric)

    def _load(self, replica: RunningReplica) -> int:
        """Requests on the replica: Serve's figure (every router's requests, as of its last report) or this
        router's own count, whichever is higher."""
        return max(self.replica_queue_len_cache.get(replica.replica_id) or 0, self._in_flight[replica.replica_id])

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        candidates = self._candidates(candidate_replicas, pending_request)
        key = _request_key(pending_request)
        if key is None or not candidates:
            return [candidates]  # Serve takes the least loaded
        by_id = {r.replica_id.unique_id: r for r in candidates}
        order = [by_id[i] for i in rendezvous_order(key, list(by_id))]
        loads = [self._load(r) for r in order]
        ceiling = min(loads) + self.load_gap
        ranked = [r for r, q in zip(order, loads) if q <= ceiling] + [r for r, q in zip(order, loads) if q > ceiling]
        request_id = pending_request.metadata.internal_request_id
        self._release_choice(request_id)  # chosen again (its replica refused it, or backoff)
        self._in_flight[ranked[0].replica_id] += 1
        self._chosen[request_id] = (key, order[0].replica_id, ranked[0].replica_id, time.monotonic())
        self._forget_unrouted()
        return [[r] for r in ranked]

    def _uncount(self, replica_id: ReplicaID) -> None:
        self._in_flight[replica_id] -= 1
        if self._in_flight[replica_id] <= 0:
            del self._in_flight[replica_id]

    def _release_choice(self, request_id: str) -> tuple | None:
        chosen = self._chosen.pop(request_id, None)
        if chosen is not None:
            self._uncount(chosen[2])
        return chosen

    def _forget_unrouted(self) -> None:
        cutoff = time.monotonic() - UNROUTED_S
        while self._chosen and (next(iter(self._chosen.values()))[3] < cutoff or len(self._chosen) > SEEN_KEYS):
            self._release_choice(next(iter(self._chosen)))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        request_id = pending_request.metadata.internal_request_id
        chosen = self._release_choice(request_id)
        self._in_flight[replica_id] += 1
        self._routed[request_id] = replica_id
        if chosen is None:
            decision = "no_key"
        else:
            key, home = chosen[0], chosen[1]
            if replica_id != home:
                decision = "spilled"
            else:
                decision = "hit" if self._seen.get(key) == replica_id else "miss"
            self._seen[key] = replica_id
            self._seen.move_to_end(key)
            if len(self._seen) > SEEN_KEYS:
                self._seen.popitem(last=False)
        _decision_counter().inc(tags={"model": self.model, "decision": decision, "app": self.app_name})

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._routed.pop(internal_request_id, None) is not None:
            self._uncount(replica_id)


class RoundRobinRouter(_Candidates):
    def initialize_state(self):
        self._turn = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        candidates = sorted(self._candidates(candidate_replicas, pending_request),
                            key=lambda r: r.replica_id.unique_id)
        if not candidates:
            return []
        start = self._turn % len(candidates)
        self._turn += 1
        return [[r] for r in candidates[start:] + candidates[:start]]
