"""Prefix-cache-aware routing. The router itself runs on a real Serve deployment of three replicas that
say who they are, with the engine's calling convention (`serve(endpoint, body, request_id, wants_usage)`),
called through a real handle as the ingress calls an engine. The router in front of a real vLLM engine (its
decisions and vLLM's own prefix-cache hits in /metrics) is the last test, on the app."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from pydantic import ValidationError
from ray import cloudpickle

from serve_app.config import ModelConfig
from serve_app.replica_router import RAW_PROMPT_KEY_CHARS, rendezvous_order, request_router_config, routing_key
from tests.conftest import MODEL_ID, TEST_KEY, scrape

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test deployment below, by value

REPLICAS = 3
LOAD_GAP = 2
SYSTEM = ["You are a terse assistant. " * 20, "You answer in French. " * 20]


class WhoAmI:
    """Answers with its replica id, after holding the request `hold_s` seconds (load, for the guard)."""

    def __init__(self):
        from ray import serve

        self.replica = serve.get_replica_context().replica_id.unique_id

    async def serve(self, endpoint: str, body: dict, request_id: str, client_wants_usage: bool):
        await asyncio.sleep(body.get("hold_s", 0))
        yield self.replica


def _deploy(routing: str, name: str):
    from ray import serve

    model = ModelConfig(id=name, num_replicas=REPLICAS, routing=routing, routing_load_gap=LOAD_GAP)
    deployment = serve.deployment(WhoAmI).options(name=name, num_replicas=REPLICAS, max_ongoing_requests=16,
                                                 ray_actor_options={"num_cpus": 0})
    router = request_router_config(model)
    if router is not None:
        deployment = deployment.options(request_router_config=router)
    return serve.run(deployment.bind(), name=name, route_prefix=None)


@pytest.fixture(scope="module")
def prefix_handle(server):
    from ray import serve

    handle = _deploy("prefix", "route-prefix")
    yield handle
    serve.delete("route-prefix")


def _ask(handle, body: dict, session_id: str = "", endpoint: str = "chat") -> str:
    for attempt in range(3):  # a replica killed under a request that was on its way: sent again, bounded
        try:
            pieces = list(handle.options(stream=True, session_id=session_id).serve.remote(endpoint, body, "r", False))
            return pieces[0]
        except Exception:
            if attempt == 2:
                raise
            time.sleep(1)


def _turns(session: int, turns: int, model: str = "m") -> list[dict]:
    """A chat session's requests: each carries the whole conversation so far."""
    messages = [{"role": "system", "content": SYSTEM[session % 2]}]
    bodies = []
    for turn in range(turns):
        messages = messages + [{"role": "user", "content": f"session {session} question {turn}"}]
        bodies.append({"model": model, "messages": messages})
        messages = messages + [{"role": "assistant", "content": f"answer {turn}"}]
    return bodies


def _replica_ids(handle, bodies) -> set[str]:
    return {_ask(handle, body) for body in bodies}


# -- the key, without Ray ---------------------------------------------------------------------------------------

def test_the_key_is_a_conversations_opening():
    first, second, third = _turns(0, 3)
    assert routing_key("chat", first) == routing_key("chat", second) == routing_key("chat", third)
    assert routing_key("chat", _turns(2, 1)[0]) != routing_key("chat", first)  # another opening question
    assert routing_key("chat", {**first, "model": "adapter-a"}) != routing_key("chat", first)  # adapter id
    assert routing_key("chat", first, adapter_id="live-a") != routing_key("chat", first)  # live adapter id
    assert routing_key("chat", first, session_id="s1") == routing_key("chat", _turns(5, 1)[0], session_id="s1")
    long_prompt = "x" * RAW_PROMPT_KEY_CHARS
    assert routing_key("completions", {"prompt": long_prompt + "turn 1"}) == \
        routing_key("completions", {"prompt": long_prompt + "turn 1 ... turn 2"})
    assert routing_key("responses", {"instructions": "a", "input": "hi"}) != \
        routing_key("responses", {"instructions": "b", "input": "hi"})
    assert routing_key("embeddings", {"input": "hi"}) is None  # nothing to gain: Serve's least loaded
    assert routing_key("chat", {"messages": "not a list"}) is None
    # rendezvous: removing a replica moves only the keys whose home it was
    keys = [routing_key("chat", _turns(s, 1)[0]) for s in range(60)]
    before = {k: rendezvous_order(k, ["a", "b", "c"])[0] for k in keys}
    after = {k: rendezvous_order(k, ["a", "c"])[0] for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "b")
    assert {before[k] for k in keys} == {"a", "b", "c"}


def test_routing_config():
    assert ModelConfig(id="m", num_replicas=2).effective_routing() == "prefix"
    assert ModelConfig(id="m").effective_routing() == "power_of_two"
    assert ModelConfig(id="m", autoscaling_config={"max_replicas": 4}).effective_routing() == "prefix"
    assert ModelConfig(id="m", num_replicas=4, routing="round_robin").effective_routing() == "round_robin"
    assert request_router_config(ModelConfig(id="m", num_replicas=2, routing="power_of_two")) is None
    with pytest.raises(ValidationError, match="routing"):
        ModelConfig(id="m", routing="fancy")
    with pytest.raises(ValidationError, match="routing_load_gap"):
        ModelConfig(id="m", routing_load_gap=-1)


def test_cpu_engine_replicas_get_their_own_cores():
    from serve_app.engine import cpu_cores_for_replica

    assert cpu_cores_for_replica(1, 1, 0, [0, 1]) is None  # alone: every core, vLLM's own binding
    assert [cpu_cores_for_replica(1, 2, rank, [0, 1]) for rank in (0, 1)] == ["0", "1"]
    assert [cpu_cores_for_replica(2, 3, rank, [0, 1, 2, 3, 4, 5]) for rank in (0, 1, 2)] == ["0,1", "2,3", "4,5"]
    assert cpu_cores_for_replica(1, 3, 2, [4, 5]) == "4"  # more replicas than cores: they share, in turn
    assert cpu_cores_for_replica(0, 2, 1, [0, 1]) == "1"  # num_cpus 0 still runs on a core


# -- the router, on a real deployment ------------------------------------------------------------------------------

def test_a_session_keeps_to_one_replica_and_sessions_spread(prefix_handle):
    homes = {}
    for session in range(40):
        replicas = _replica_ids(prefix_handle, _turns(session, 3))
        assert len(replicas) == 1, f"session {session}'s turns went to {replicas}"
        homes[session] = replicas.pop()
    ids = sorted(set(homes.values()))
    assert len(ids) == REPLICAS, Counter(homes.values())  # 40 sessions over 3 replicas: all are used
    # each went where rendezvous hashing of its key puts it: the router's choice, not chance
    for session, home in homes.items():
        assert rendezvous_order(routing_key("chat", _turns(session, 1)[0]), ids)[0] == home
    # a session id holds a session together whatever its prompts
    assert len({_ask(prefix_handle, _turns(s, 1)[0], session_id="chat-42") for s in range(8)}) == 1


def test_a_loaded_replica_is_avoided_even_with_a_match(prefix_handle):
    key = routing_key("chat", _turns(7, 1)[0])
    body = {**_turns(7, 1)[0], "hold_s": 3}
    home = _ask(prefix_handle, _turns(7, 1)[0])
    bursts = []
    # Twice at most: on a busy 2-core CI machine one of Serve's 100-ms queue-length probes can time out, and
    # Serve then sends that request to the next replica in the key's order. A router that does not prefer
    # the home, or does not spill, fails both bursts.
    for _ in range(2):
        with ThreadPoolExecutor(12) as pool:
            counts = Counter(pool.map(lambda _: _ask(prefix_handle, body), range(12)))
        bursts.append(counts)
        assert len(counts) == REPLICAS, bursts  # the home was loaded: the others took requests
        order = rendezvous_order(key, sorted(counts))
        assert order[0] == home, (home, bursts)  # the unloaded ask went home
        # held for 3 s, the 12 requests were in flight together: none took more than its load gap (plus one,
        # as routing tasks may read the queue lengths before the other's request is counted)
        assert max(counts.values()) - min(counts.values()) <= LOAD_GAP + 2, bursts
        # ...and the key's order still shows: its first replica took more than its last. (Not "the most": with a
        # gap of 2 the ideal split of 12 is 5/5/2, a tie between the first two, so one late queue-length probe
        # can leave the home one short: 4/5/3 in the key's order.) A router that
        # balances load alone splits 4/4/4.
        if counts[order[0]] > counts[order[-1]]:
            break
    else:
        raise AssertionError(f"the key's first replica {home} did not take more than its last in either burst: {bursts}")
    # Load even again: home. Serve's queue-length cache and the router's own count both trail the finished
    # requests by a moment, so the next turn may still spill; within a few seconds it must be home.
    answered = [_ask(prefix_handle, _turns(7, 2)[1])]
    deadline = time.monotonic() + 10
    while answered[-1] != home and time.monotonic() < deadline:
        time.sleep(0.5)
        answered.append(_ask(prefix_handle, _turns(7, 2)[1]))
    assert answered[-1] == home, (home, answered)


def test_a_removed_replica_moves_only_its_sessions(prefix_handle):
    import ray
    from ray.util.state import list_actors

    homes = {s: _ask(prefix_handle, _turns(s, 1)[0]) for s in range(30)}
    victim = Counter(homes.values()).most_common(1)[0][0]
    actor = next(a for a in list_actors(filters=[("class_name", "=", "ServeReplica:route-prefix:route-prefix"),
                                                 ("state", "=", "ALIVE")]) if a.name.endswith(victim))
    ray.kill(ray.get_actor(actor.name, namespace="serve"), no_restart=True)
    survivors = set(homes.values()) - {victim}
    for turn in (1, 2):  # while Serve replaces it, and after
        for session, home in homes.items():
            now = _ask(prefix_handle, _turns(session, turn + 1)[turn])
            assert now != victim
            if home in survivors:  # kept its home, or went to the new replica: never to another survivor
                assert now == home or now not in survivors, (session, home, now)


def test_round_robin_takes_turns(server):
    from ray import serve

    handle = _deploy("round_robin", "route-rr")
    try:
        counts = Counter(_ask(handle, _turns(1, 1)[0]) for _ in range(3 * REPLICAS))
        assert len(counts) == REPLICAS and set(counts.values()) == {3}, counts
    finally:
        serve.delete("route-rr")


# -- in front of a real engine ---------------------------------------------------------------------------------

def test_the_app_reports_router_hits_and_vllm_prefix_cache_hits(server):
    headers = {"Authorization": f"Bearer {TEST_KEY}", "X-Session-Id": "prefix-test"}
    body = {"model": MODEL_ID, "max_tokens": 2, "provider": {"only": ["local"]},
            "messages": [{"role": "system", "content": "You are a helpful assistant. " * 40},
                         {"role": "user", "content": "Say hi."}]}
    for _ in range(2):
        response = httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
    too_long = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30,
                          headers={**headers, "X-Session-Id": "s" * 257})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "X-Session-Id"

    def value(text: str, prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    deadline = time.monotonic() + 30  # Ray exports metrics every few seconds
    while True:
        text = scrape(server, [f'ray_tuneserve_routing_decisions_total{{app="tuneserve",decision="hit",'
                               f'model="{MODEL_ID}"}}', "ray_vllm_prefix_cache_hits_total{"])
        if value(text, "ray_vllm_prefix_cache_hits_total{") > 0:  # the second request's prompt was cached
            break
        assert time.monotonic() < deadline, "vLLM reported no prefix-cache hit"
        time.sleep(1)
