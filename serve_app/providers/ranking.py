"""Routing: which providers may serve a request, in which order, and what the router has learnt of each.

The router only ranks. serving.py walks the ranked candidates, and reports back what happened so that
live latency/throughput and the circuit breakers stay current.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from serve_app.config import LOCAL_PROVIDER, AppConfig, CircuitBreaker, Price
from serve_app.protocol import LOCAL_PARAMETERS, APIError, ProviderPreferences

EWMA_WEIGHT = 0.2  # weight of the newest sample in the moving averages


@dataclass(frozen=True)
class Candidate:
    provider: str
    model: str  # public id
    upstream: str  # the provider's name for it
    price: Price


@dataclass
class ProviderState:
    """One provider's load: its requests in flight, against its connection cap."""

    max_concurrency: int | None
    in_flight: int = 0

    def load(self) -> float:
        return self.in_flight / self.max_concurrency if self.max_concurrency else 0.0


@dataclass
class RouteState:
    """Live view of one (provider, model): moving TTFT and decode speed, and its circuit breaker. Per model,
    so that one broken model (or one local engine) never blocks the provider's other models."""

    breaker: CircuitBreaker
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    consecutive_failures: int = 0
    open_until: float = 0.0
    opened_at: float = 0.0
    probing: bool = False

    def observe(self, ttft_s: float, tokens_per_s: float | None) -> None:
        self.ttft_s = ttft_s if self.ttft_s is None else (1 - EWMA_WEIGHT) * self.ttft_s + EWMA_WEIGHT * ttft_s
        if tokens_per_s is not None:
            self.tokens_per_s = tokens_per_s if self.tokens_per_s is None else (
                (1 - EWMA_WEIGHT) * self.tokens_per_s + EWMA_WEIGHT * tokens_per_s)

    @property
    def is_open(self) -> bool:
        return self.consecutive_failures >= self.breaker.failure_threshold


@dataclass
class Lease:
    """Permission to send one attempt to a provider for a model; give it back with Router.release."""

    provider: str
    model: str
    probe: bool = False
    started: float = field(default_factory=time.monotonic)


class Router:
    def __init__(self, config: AppConfig, clock=time.monotonic):
        self.clock = clock
        self.aliases = config.aliases
        self.states: dict[str, ProviderState] = {}
        self.routes: dict[tuple[str, str], RouteState] = {}
        self.candidates: dict[str, list[Candidate]] = {}
        self.supported: dict[str, set[str] | None] = {}
        self.owners: dict[str, list[str]] = {}
        # Circuits this replica opened (True) or closed (False) since the usage store last heard: the store
        # shares them with the other ingress replicas.
        self.changes: list[tuple[str, str, bool]] = []
        if config.models:
            self.states[LOCAL_PROVIDER] = ProviderState(max_concurrency=None)
            # What local engines honour: provider.require_parameters skips them for anything else.
            self.supported[LOCAL_PROVIDER] = set().union(*LOCAL_PARAMETERS.values())
        local_breaker = self.local_breaker = config.ingress.local_engines.circuit_breaker
        for model in config.models:
            self._offer(Candidate(LOCAL_PROVIDER, model.id, model.id, model.price), local_breaker)
            for adapter in model.adapters:
                self._offer(Candidate(LOCAL_PROVIDER, adapter.id, adapter.id, adapter.price or model.price),
                            local_breaker)
        for provider in config.providers:
            self.states[provider.name] = ProviderState(max_concurrency=provider.max_concurrency)
            self.supported[provider.name] = (None if provider.supported_parameters is None
                                             else set(provider.supported_parameters))
            for offered in provider.models:
                self._offer(Candidate(provider.name, offered.id, offered.upstream_name, offered.price),
                            provider.circuit_breaker)

    def _offer(self, candidate: Candidate, breaker: CircuitBreaker) -> None:
        self.routes.setdefault((candidate.provider, candidate.model), RouteState(breaker=breaker))
        self.candidates.setdefault(candidate.model, []).append(candidate)
        self.owners.setdefault(candidate.model, []).append(candidate.provider)

    def offer_live(self, adapter_id: str, price: Price) -> None:
        """A live adapter (serve_app/lora_registry.py) on its base model's engines."""
        if adapter_id not in self.candidates:
            self._offer(Candidate(LOCAL_PROVIDER, adapter_id, adapter_id, price), self.local_breaker)

    def withdraw(self, model_id: str) -> None:
        """No new requests for `model_id`; its route state stays for the requests still running."""
        self.candidates.pop(model_id, None)
        self.owners.pop(model_id, None)

    # -- planning -----------------------------------------------------------------------------------

    def expand(self, models: list[str]) -> list[str]:
        """Aliases become their candidate lists; unknown ids are a 404 naming the first one."""
        expanded: list[str] = []
        for model in models:
            if model in self.aliases:
                expanded += self.aliases[model]
            elif model in self.candidates:
                expanded.append(model)
            else:
                raise APIError(404, f"The model '{model}' does not exist or you do not have access to it.",
                               param="model", code="model_not_found")
        return list(dict.fromkeys(expanded))

    def plan(self, models: list[str], prefs: ProviderPreferences | None,
             parameters: set[str]) -> list[Candidate]:
        """The ordered attempts for a request: model by model (model-level fallback), providers ranked
        within each model by the preferences. Raises a 400 that says why, if nothing is left."""
        prefs = prefs or ProviderPreferences()
        self._check_names(prefs)
        plan: list[Candidate] = []
        dropped: dict[str, str] = {}
        for model in self.expand(models):
            eligible = [c for c in self.candidates[model] if self._eligible(c, prefs, parameters, dropped)]
            plan += self._rank(eligible, prefs)
        if not plan:
            reasons = "; ".join(f"{name}: {why}" for name, why in dropped.items()) or "no provider offers it"
            raise APIError(400, f"No provider can serve this request ({reasons}).", param="provider",
                           code="no_provider_available")
        return plan

    def _check_names(self, prefs: ProviderPreferences) -> None:
        for field_name in ("order", "only", "ignore"):
            unknown = [n for n in getattr(prefs, field_name) or [] if n not in self.states]
            if unknown:
                raise APIError(400, f"provider.{field_name} names unknown providers: {', '.join(unknown)}. "
                               f"Known: {', '.join(sorted(self.states))}.", param=f"provider.{field_name}")

    def _eligible(self, c: Candidate, prefs: ProviderPreferences, parameters: set[str],
                  dropped: dict[str, str]) -> bool:
        if prefs.only is not None and c.provider not in prefs.only:
            dropped[c.provider] = "not in provider.only"
        elif prefs.ignore and c.provider in prefs.ignore:
            dropped[c.provider] = "in provider.ignore"
        elif prefs.max_price and prefs.max_price.prompt is not None and c.price.prompt > prefs.max_price.prompt:
            dropped[c.provider] = f"prompt price {c.price.prompt} > max_price.prompt {prefs.max_price.prompt}"
        elif (prefs.max_price and prefs.max_price.completion is not None
              and c.price.completion > prefs.max_price.completion):
            dropped[c.provider] = (f"completion price {c.price.completion} > "
                                   f"max_price.completion {prefs.max_price.completion}")
        elif prefs.require_parameters and self.supported[c.provider] is not None and (
                missing := sorted(parameters - self.supported[c.provider])):
            dropped[c.provider] = f"does not support {', '.join(missing)}"
        else:
            return True
        return False

    def _rank(self, candidates: list[Candidate], prefs: ProviderPreferences) -> list[Candidate]:
        if prefs.sort == "price":
            ranked = sorted(candidates, key=lambda c: (c.price.prompt + c.price.completion, c.provider))
        elif prefs.sort == "latency":  # unmeasured providers first: they get measured
            ranked = sorted(candidates, key=lambda c: self.routes[(c.provider, c.model)].ttft_s or 0.0)
        elif prefs.sort == "throughput":
            ranked = sorted(candidates,
                            key=lambda c: -(self.routes[(c.provider, c.model)].tokens_per_s or float("inf")))
        else:
            ranked = self._default_order(candidates)
        if prefs.order:
            position = {name: i for i, name in enumerate(prefs.order)}
            listed = sorted((c for c in ranked if c.provider in position), key=lambda c: position[c.provider])
            rest = [c for c in ranked if c.provider not in position]
            ranked = listed + (rest if prefs.allow_fallbacks else [])
        elif not prefs.allow_fallbacks:
            ranked = ranked[:1]
        return ranked

    def _default_order(self, candidates: list[Candidate]) -> list[Candidate]:
        """Local first; then remote providers by load, ties broken at random (load balancing)."""
        local = [c for c in candidates if c.provider == LOCAL_PROVIDER]
        remote = [c for c in candidates if c.provider != LOCAL_PROVIDER]
        random.shuffle(remote)
        remote.sort(key=lambda c: self.states[c.provider].load())
        return local + remote

    # -- attempts -----------------------------------------------------------------------------------

    def acquire(self, candidate: Candidate) -> tuple[Lease | None, str]:
        """A lease for one attempt, or None with the reason ("circuit_open", "busy")."""
        state = self.states[candidate.provider]
        route = self.routes[(candidate.provider, candidate.model)]
        probe = False
        if route.is_open:
            if self.clock() < route.open_until or route.probing:
                return None, "circuit_open"
            probe = True  # cooled down: let one request through to probe
            route.probing = True
        if state.max_concurrency is not None and state.in_flight >= state.max_concurrency:
            if probe:
                route.probing = False
            return None, "busy"
        state.in_flight += 1
        return Lease(candidate.provider, candidate.model, probe=probe), "ok"

    def release(self, lease: Lease, ok: bool | None, ttft_s: float | None = None,
                tokens_per_s: float | None = None) -> None:
        """ok: the provider served; False: it failed (counts towards its breaker); None: no verdict
        (it was overloaded: busy, not broken)."""
        self.states[lease.provider].in_flight -= 1
        route = self.routes[(lease.provider, lease.model)]
        if lease.probe:
            route.probing = False
        if ok is None:
            return
        if ok:
            if route.is_open:  # a probe succeeded: closed, here and (through the store) everywhere
                self.changes.append((lease.provider, lease.model, False))
            route.consecutive_failures = 0
            if ttft_s is not None:
                route.observe(ttft_s, tokens_per_s)
        else:
            route.consecutive_failures += 1
            if route.is_open:
                route.open_until = self.clock() + route.breaker.cooldown_s
                route.opened_at = self.clock()
                self.changes.append((lease.provider, lease.model, True))

    # -- circuits shared between ingress replicas -----------------------------------------------------

    def take_changes(self) -> list[tuple[str, str, float | None]]:
        """The changes for the store: an opened circuit with the seconds left in its cooldown (as of now, so
        that the store's clock does not restart it), a closed one with None."""
        now, changes = self.clock(), []
        for provider, model, opened in self.changes:
            left = max(0.0, self.routes[(provider, model)].open_until - now) if opened else None
            changes.append((provider, model, left))
        self.changes = []
        return changes

    def apply_shared(self, opens: dict[tuple[str, str], float], since: float) -> None:
        """The store's open circuits (seconds of cooldown left): open them here too, and close those that it
        no longer holds open (unless this replica opened them after `since`, when it asked)."""
        now = self.clock()
        for key, route in self.routes.items():
            if key in opens:
                if not route.is_open:  # another replica opened it
                    route.consecutive_failures = route.breaker.failure_threshold
                    route.open_until = now + opens[key]
                    route.opened_at = now
                elif route.opened_at < since:
                    route.open_until = now + opens[key]
            elif route.is_open and route.opened_at < since and not route.probing:  # closed elsewhere
                route.consecutive_failures = 0

    def snapshot(self) -> dict[str, dict]:
        """Per provider: requests in flight, and per model its moving figures and circuit. The provider's
        own `circuit` is open when every model's is, partial when some are."""
        view = {}
        for name, state in self.states.items():
            models = {model: {"ttft_s": r.ttft_s, "tokens_per_s": r.tokens_per_s,
                              "consecutive_failures": r.consecutive_failures,
                              "circuit": "open" if r.is_open else "closed"}
                      for (provider, model), r in self.routes.items() if provider == name}
            opened = sum(m["circuit"] == "open" for m in models.values())
            circuit = "closed" if opened == 0 else ("open" if opened == len(models) else "partial")
            view[name] = {"in_flight": state.in_flight, "circuit": circuit, "models": models}
        return view
