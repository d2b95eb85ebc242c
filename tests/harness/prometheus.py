"""Prometheus inside the node, scraping iamlinkd's metrics port as a real deployment would."""

import http.client
import json
import math
import os
import urllib.parse

from .util import Fatal, BASE_PATH, stop_process, tail, wait_until

PROMETHEUS = "/usr/bin/prometheus"


def scrape_config(targets, interval="1s"):
    """prometheus.yml scraping `targets` (["ip:port"]) as job `iamlinkd` every `interval`.

    JSON is YAML, so the file needs no YAML writer.
    """
    return json.dumps({
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": [{"job_name": "iamlinkd", "static_configs": [{"targets": list(targets)}]}],
    }, indent=2) + "\n"


class Prometheus:
    """`/usr/bin/prometheus` in the node: config, TSDB and log in the node's work directory,
    web (and HTTP API) on 198.18.0.1:9090; every call to it is made from inside the node.

    `targets`: iamlinkd's `metrics_listen` addresses ("198.18.0.1:9101").
    """

    HOST = "198.18.0.1"
    PORT = 9090

    def __init__(self, node, targets, interval="1s", start=True):
        self.node = node
        self.targets = list(targets)
        self.dir = os.path.join(node.workdir, "prometheus")
        self.config_path = os.path.join(self.dir, "prometheus.yml")
        self.data_path = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "prometheus.log")
        os.makedirs(self.data_path, exist_ok=True)
        with open(self.config_path, "w") as f:
            f.write(scrape_config(self.targets, interval))
        self.proc = None
        if start:
            self.start()

    def start(self, timeout=60):
        if not os.access(PROMETHEUS, os.X_OK):
            raise FileNotFoundError(f"{PROMETHEUS} missing: run scripts/setup (Debian package prometheus)")
        log = open(self.log_path, "ab")
        self.proc = self.node.spawn(
            [PROMETHEUS, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.data_path}",
             f"--web.listen-address={self.HOST}:{self.PORT}", "--storage.tsdb.retention.time=1h"],
            env={"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": self.node.workdir}, stdout=log, stderr=log)
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise Fatal(f"prometheus exited {self.proc.returncode}:\n{tail(self.log_path)}")
            status, _ = self.node.call(self._get, "/-/ready")
            return status == 200

        wait_until(ready, timeout, f"prometheus ready on {self.HOST}:{self.PORT}", interval=0.1)
        return self

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
            self.node.forget(self.proc)
            self.proc = None

    def log_tail(self, lines=40):
        return tail(self.log_path, lines)

    # -- HTTP API (requests made on the node's worker thread) -----------------------------
    def _get(self, path, params=None):
        """(status, body) of GET path?params to Prometheus; (None, error) when it does not answer."""
        url = path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            conn = http.client.HTTPConnection(self.HOST, self.PORT, timeout=5)
            conn.request("GET", url)
            r = conn.getresponse()
            body = r.read().decode("utf-8", "replace")
            conn.close()
            return r.status, body
        except OSError as e:
            return None, str(e)

    def api(self, path, params=None):
        """`data` of a successful /api/v1 answer; raises with Prometheus's error otherwise."""
        status, body = self.node.call(self._get, "/api/v1/" + path, params)
        try:
            doc = json.loads(body)
        except ValueError:
            raise AssertionError(f"prometheus {path} {params}: {status} {body[:300]!r}") from None
        if status != 200 or doc.get("status") != "success":
            raise AssertionError(f"prometheus {path} {params}: {status} {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, promql):
        """Instant query: the list of {"metric": {...}, "value": [t, "v"]} (a scalar as one entry)."""
        data = self.api("query", {"query": promql})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, promql):
        """The single sample value of `promql` as a float; None when the result is empty."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"{promql} has {len(result)} series, expected one: {result}")
        return float(result[0]["value"][1])

    def wait_value(self, promql, predicate, timeout, what=None):
        """Poll `promql` until predicate(value) holds (value a float or None); returns the value."""
        seen = []

        def probe():
            v = self.value(promql)
            seen[:] = [v]
            return predicate(v) and (True, v)

        try:
            return wait_until(probe, timeout, what or promql, interval=0.5)[1]
        except AssertionError as e:
            raise AssertionError(f"{e}; last value of {promql}: {seen}") from None

    def targets_up(self):
        """Active targets whose last scrape succeeded."""
        data = self.api("targets", {"state": "active"})
        return [t for t in data["activeTargets"] if t.get("health") == "up"]

    def wait_targets_up(self, timeout=30):
        """Until every configured target has been scraped successfully at least once."""

        def probe():
            up = {t["labels"].get("instance") for t in self.targets_up()}
            return set(self.targets) <= up

        try:
            wait_until(probe, timeout, f"prometheus scraping {self.targets}", interval=0.25)
        except AssertionError as e:
            detail = self.api("targets", {"state": "active"})["activeTargets"]
            raise AssertionError(f"{e}; targets: {json.dumps(detail)[:1000]}") from None


def finite(v):
    """A predicate for wait_value: a real number (not None, NaN or ±Inf)."""
    return v is not None and math.isfinite(v)
