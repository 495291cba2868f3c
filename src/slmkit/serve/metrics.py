"""The server's Prometheus metrics (`GET /metrics`): counters, gauges and histograms, rendered by hand in
Prometheus' text exposition format (0.0.4) rather than through a client library: there are only eight of them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slmkit.serve.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The routes requests are counted by; any other path counts as "other", so a scanner cannot grow the label set.
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/models/{model}", "/v1/completions",
          "/v1/chat/completions", "/v1/embeddings")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def route_label(path: str) -> str:
    """The route label of a request path."""
    return path if path in ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, total = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            total += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {total}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.count}"]
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """What the server counts itself (requests, latency, time to first token, active requests); the token
    counters and the queue depth come from the engine when rendered."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.active = 0
        self.answered: dict[str, int] = {}  # cascade answers by who gave them (serve/escalate.py)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
        self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_answer(self, answered_by: str) -> None:
        self.answered[answered_by] = self.answered.get(answered_by, 0) + 1

    def render(self, engine: Engine) -> str:
        stats = engine.stats
        lines: list[str] = []

        def family(name: str, kind: str, help: str) -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])

        family("slmkit_requests_total", "counter", "HTTP requests answered, by route and status code.")
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'slmkit_requests_total{{route="{_label(route)}",status="{status}"}} {n}')
        family("slmkit_prompt_tokens_total", "counter", "Prompt tokens prefilled (once per choice).")
        lines.append(f"slmkit_prompt_tokens_total {stats.prompt_tokens_total}")
        family("slmkit_prefix_cache_hits_total", "counter", "Prompts that started from a cached prefix.")
        lines.append(f"slmkit_prefix_cache_hits_total {stats.prefix_cache_hits}")
        family("slmkit_prefix_cache_tokens_total", "counter", "Prompt tokens taken from the prefix cache.")
        lines.append(f"slmkit_prefix_cache_tokens_total {stats.prefix_tokens_reused}")
        family("slmkit_completion_tokens_total", "counter", "Tokens generated.")
        lines.append(f"slmkit_completion_tokens_total {stats.completion_tokens_total}")
        if "drafted_tokens" in stats.extra:  # speculative decoding in the batch (--draft ngram)
            family("slmkit_speculative_drafted_tokens_total", "counter", "Tokens drafted by prompt lookup.")
            lines.append(f"slmkit_speculative_drafted_tokens_total {stats.extra['drafted_tokens']}")
            family("slmkit_speculative_accepted_tokens_total", "counter", "Drafted tokens the model kept.")
            lines.append(f"slmkit_speculative_accepted_tokens_total {stats.extra['accepted_tokens']}")
        family("slmkit_engine_busy_seconds_total", "counter", "Seconds the engine spent prefilling and decoding.")
        lines.append(f"slmkit_engine_busy_seconds_total {stats.busy_seconds:.6f}")
        family("slmkit_request_seconds", "histogram", "Time from request to the end of its response, by route.")
        for route, hist in sorted(self.latency.items()):
            lines.extend(hist.lines("slmkit_request_seconds", f'route="{_label(route)}"'))
        family("slmkit_time_to_first_token_seconds", "histogram",
               "Time from a generation request to its first generated token.")
        lines.extend(self.ttft.lines("slmkit_time_to_first_token_seconds", ""))
        family("slmkit_queue_depth", "gauge", "Requests waiting for the engine to admit them.")
        lines.append(f"slmkit_queue_depth {engine.queue_depth}")
        family("slmkit_requests_active", "gauge", "/v1 requests being answered now.")
        lines.append(f"slmkit_requests_active {self.active}")
        if self.answered:
            family("slmkit_cascade_answers_total", "counter",
                   "Chat completions answered by the small model or the escalation target (--escalate-to).")
            for who in ("small", "large"):
                lines.append(f'slmkit_cascade_answers_total{{answered_by="{who}"}} {self.answered.get(who, 0)}')
        return "\n".join(lines) + "\n"
