"""Prometheus metrics of one server, and its periodic throughput log line.

What. `ServerMetrics` owns its own `CollectorRegistry` (two apps in one process, as in the tests, never share
or clash) with
    nanoseek_requests_total{status, adapter}            finished HTTP generation requests (status = HTTP code)
    nanoseek_prompt_tokens_total, nanoseek_generation_tokens_total
    nanoseek_time_to_first_token_seconds                histogram, per request
    nanoseek_inter_token_latency_seconds                histogram, per generated token after the first
    nanoseek_requests_running, nanoseek_requests_waiting          engine gauges ...
    nanoseek_cache_blocks_used, nanoseek_cache_blocks_free, nanoseek_prefix_cache_hit_rate
                                                        ... read from the engine's last published stats when
                                                        /metrics is scraped (a collector, no polling thread)
    nanoseek_spec_draft_tokens_total{position}          speculative engines (--speculative): MTP drafts proposed
    nanoseek_spec_accepted_tokens_total{position}       ... and accepted, by draft position 1..k
    nanoseek_spec_verifications_total                   decode rows that verified drafts (one per row per step)
    nanoseek_spec_mean_accepted_length                  tokens per verify row: 1 + accepted / verifications
`throughput_line()` gives the "every few seconds" log line: token rates since the previous call.

Rejected: the default global registry (a second app in the same process raises "Duplicated timeseries");
updating the gauges from the engine thread (the scrape-time collector reads one consistent snapshot).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _EngineCollector:
    """Gauges computed from the engine's stats dict at scrape time."""

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        queries = s.get("prefix_queries", 0)
        for name, doc, value in (
            ("nanoseek_requests_running", "requests being decoded or prefilled", s.get("running", 0)),
            ("nanoseek_requests_waiting", "requests waiting for a slot or cache blocks", s.get("waiting", 0)),
            ("nanoseek_cache_blocks_used", "KV-cache blocks held by requests", s.get("blocks_used", 0)),
            ("nanoseek_cache_blocks_free", "KV-cache blocks free (including evictable cached prefixes)",
             s.get("blocks_free", 0)),
            ("nanoseek_prefix_cache_hit_rate", "prefix-cache hits / queries since start",
             s.get("prefix_hits", 0) / queries if queries else 0.0),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        yield from _speculative_metrics(s)


def _speculative_metrics(s: dict):
    """Acceptance counters of a speculative engine (no samples when speculation is off)."""
    for name, doc, key in (("nanoseek_spec_draft_tokens", "MTP draft tokens proposed, by draft position",
                            "spec_draft_tokens"),
                           ("nanoseek_spec_accepted_tokens", "MTP draft tokens accepted, by draft position",
                            "spec_accepted_tokens")):
        family = CounterMetricFamily(name, doc, labels=["position"])
        for j, value in enumerate(s.get(key, []), start=1):
            family.add_metric([str(j)], value)
        yield family
    if s.get("spec_num_tokens"):
        yield CounterMetricFamily("nanoseek_spec_verifications", "decode rows that verified drafts",
                                  value=s.get("spec_verify_rows", 0))
        yield GaugeMetricFamily("nanoseek_spec_mean_accepted_length",
                                "tokens emitted per verifying row per step (1 + accepted drafts)",
                                value=s.get("spec_mean_accepted_length", 0.0))


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nanoseek_requests", "finished generation requests", ["status", "adapter"],
                                registry=r)
        self.prompt_tokens = Counter("nanoseek_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("nanoseek_generation_tokens", "generated tokens", registry=r)
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds", "time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("nanoseek_inter_token_latency_seconds", "time between consecutive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(stats))
        self._stats = stats
        self.prompt_total = self.generated_total = 0  # the counters' values, for the throughput line
        self._last = (time.perf_counter(), 0, 0)

    def request_done(self, status: int, adapter: str | None, prompt_tokens: int = 0) -> None:
        self.requests.labels(status=str(status), adapter=adapter or "base").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.prompt_total += prompt_tokens

    def tokens(self, n: int, first: bool, since_s: float) -> None:
        """n new tokens of one request arrived, `since_s` after its arrival (first) or its previous tokens."""
        if n <= 0:
            return
        self.generation_tokens.inc(n)
        self.generated_total += n
        if first:
            self.ttft.observe(since_s)
            n -= 1
        for _ in range(n):  # several tokens in one output (stop-string hold-back): spread the gap evenly
            self.itl.observe(since_s / max(n, 1))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def throughput_line(self) -> str | None:
        """'gen X tok/s, prompt Y tok/s, running, waiting, blocks' since the last call; None when idle."""
        now = time.perf_counter()
        gen, prompt = self.generated_total, self.prompt_total
        t0, gen0, prompt0 = self._last
        self._last = (now, gen, prompt)
        s = self._stats()
        if gen == gen0 and prompt == prompt0 and not s.get("running") and not s.get("waiting"):
            return None
        dt = max(now - t0, 1e-9)
        queries = s.get("prefix_queries", 0)
        hit = f"{100 * s.get('prefix_hits', 0) / queries:.0f}%" if queries else "n/a"
        return (f"throughput: generation {(gen - gen0) / dt:.1f} tok/s, prompt {(prompt - prompt0) / dt:.1f} tok/s, "
                f"running {s.get('running', 0)}, waiting {s.get('waiting', 0)}, cache blocks used "
                f"{s.get('blocks_used', 0)}/{s.get('blocks_total', 0)}, prefix-cache hit rate {hit}")
