"""Scrapes a torchrun-rs health port the way a monitoring system would:
scrape.py PORT prints, as JSON, the status code of each endpoint, /status,
the /metrics samples (parsed by prometheus_client's OpenMetrics parser, so
a malformed exposition fails here) and the 99th percentile of 200 scrapes."""
import json
import sys
import time
import urllib.error
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

base = f"http://127.0.0.1:{sys.argv[1]}"


def get(path):
    try:
        with urllib.request.urlopen(base + path, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


out = {p: get(p)[0] for p in ("/healthz", "/readyz", "/status", "/metrics", "/nope")}
out["status"] = json.loads(get("/status")[1])
samples = {}
for fam in text_string_to_metric_families(get("/metrics")[1]):
    for s in fam.samples:
        key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))
        samples[key] = s.value
out["metrics"] = samples
took = []
for _ in range(200):
    t = time.perf_counter()
    get("/metrics")
    took.append(time.perf_counter() - t)
took.sort()
out["p99_ms"] = took[int(len(took) * 0.99) - 1] * 1000
print(json.dumps(out))
