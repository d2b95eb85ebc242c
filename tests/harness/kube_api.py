"""KubeApi: an emulated Kubernetes API server in the node, for iamlinkd's view of pods,
namespaces and service accounts.

There is no real API server on these machines. `kube_api_server.py` (kmock's KubernetesEmulator
with our resourceVersions, selectors, resumable watches and persistence; its docstring says which
part is whose) runs in the node namespace through `ip netns exec` with the interpreter of
`.build/kube-api-venv` (kmock and aiohttp, kept out of the test runner's interpreter). It speaks
kube-apiserver's JSON wire format over plain HTTP without auth on 198.18.0.5:6443;
`kubeconfig_path` points a client at it. Objects are created, patched and deleted over that HTTP
API, so watchers get real events. `requests()` is the server's request log.

Lifecycle: `stop()` has the server write its state file, then kills it (the API is down, open
watches break); `start()` brings it back with the objects and resourceVersions it had (they are
kept in that file, as etcd would)
but without the event history, so a client that resumes a watch from a version older than the
restart gets 410 Gone and relists; `restart()` is both. While it is stopped the object helpers
still work: they edit the state file, as if another API server of the cluster took the change;
clients see such changes only by relisting.
"""

import datetime
import http.client
import json
import os
import uuid

from .merge_patch import merged
from .util import BASE_PATH, REPO, Fatal, json_lines, stop_process, tail, wait_until

KUBE_API_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kube_api_server.py")
# kmock lives in a venv of its own (scripts/setup): its pytest plugin would break the test runner's.
KUBE_API_PYTHON = os.path.join(REPO, ".build", "kube-api-venv", "bin", "python")

# What kube sends for metadata-only lists (kube-core request.rs JSON_METADATA_LIST_MIME).
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"

POD_ROLE = "iam.amazonaws.com/role"
SA_ROLE = "eks.amazonaws.com/role-arn"


class KubeApiError(AssertionError):
    def __init__(self, status, body):
        super().__init__(f"Kubernetes API answered {status}: {body}")
        self.status = status
        self.body = body


class KubeApi:
    """The emulated API server on HOST:PORT in `node`; see the module docstring."""

    HOST = "198.18.0.5"  # on the node's lo (netns.Node.LO_ADDRESSES)
    PORT = 6443

    def __init__(self, node, start=True):
        self.node = node
        self.url = f"http://{self.HOST}:{self.PORT}"
        self.state_path = os.path.join(node.workdir, "kube-api-state.json")
        self.log_path = os.path.join(node.workdir, "kube-api-requests.jsonl")
        self.stderr_path = os.path.join(node.workdir, "kube-api.log")
        self.kubeconfig_path = os.path.join(node.workdir, "kubeconfig")
        with open(self.kubeconfig_path, "w") as f:
            json.dump({  # JSON is YAML: kube reads it as a kubeconfig
                "apiVersion": "v1", "kind": "Config",
                "clusters": [{"name": "bench", "cluster": {"server": self.url}}],
                "users": [{"name": "bench", "user": {}}],
                "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench",
                                                            "namespace": "default"}}],
                "current-context": "bench",
            }, f, indent=1)
        self.proc = None
        if start:
            self.start()

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout=20):
        if self.running:
            return
        if not os.access(KUBE_API_PYTHON, os.X_OK):
            raise Fatal(f"{KUBE_API_PYTHON} missing: run scripts/setup (venv with kmock)")
        err = open(self.stderr_path, "ab")
        self.proc = self.node.spawn(
            [KUBE_API_PYTHON, KUBE_API_SERVER, "--listen", f"{self.HOST}:{self.PORT}",
             "--state", self.state_path, "--log", self.log_path],
            env={"PATH": BASE_PATH, "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}, stdout=err, stderr=err)
        err.close()

        def ready():
            if self.proc.poll() is not None:
                raise Fatal(f"kube_api_server exited {self.proc.returncode}:\n{tail(self.stderr_path)}")
            try:
                return self._request("GET", "/version", timeout=1)[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout, f"emulated Kubernetes API on {self.HOST}:{self.PORT}", interval=0.05)

    def stop(self):
        """Abrupt: SIGKILL, so open watches break as with a crashed or unreachable server; the
        state file is written first (the server writes it only shortly after changes)."""
        if self.running:
            try:
                self._request("POST", "/_emulator/save", timeout=60)
            except OSError:
                pass  # not answering: it keeps what it last wrote
        if self.proc is not None:
            stop_process(self.proc, timeout=5, sig=9)
            self.node.forget(self.proc)
            self.proc = None

    def restart(self):
        self.stop()
        self.start()

    # -- HTTP (from inside the node) ----------------------------------------------------------
    def _request(self, method, path, body=None, content_type="application/json", timeout=5,
                 accept="application/json"):
        def call():
            conn = http.client.HTTPConnection(self.HOST, self.PORT, timeout=timeout)
            try:
                headers = {"Accept": accept}
                data = None
                if body is not None:
                    data = json.dumps(body).encode()
                    headers["Content-Type"] = content_type
                conn.request(method, path, body=data, headers=headers)
                r = conn.getresponse()
                raw = r.read()
                try:
                    return r.status, json.loads(raw) if raw else None
                except ValueError:
                    return r.status, raw.decode("utf-8", "replace")
            finally:
                conn.close()

        return self.node.call(call, timeout=timeout + 5)

    def api(self, method, path, body=None, content_type="application/json", ok=(200, 201),
            accept="application/json"):
        """One API call; returns the decoded body, raises KubeApiError on another status."""
        status, out = self._request(method, path, body, content_type, accept=accept)
        if status not in ok:
            raise KubeApiError(status, out)
        return out

    @staticmethod
    def _path(plural, namespace=None, name=None):
        base = f"/api/v1/namespaces/{namespace}/{plural}" if namespace else f"/api/v1/{plural}"
        return f"{base}/{name}" if name else base

    # -- objects ----------------------------------------------------------------------------
    def create_pod(self, namespace, name, node, service_account="default", uid=None, annotations=None,
                   labels=None, volumes=None):
        """A pod bound to `node`; returns the created object (its metadata.uid is `uid` if given).
        `volumes`: the spec's volumes (a projected service-account token, say)."""
        obj = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4()),
                            "annotations": dict(annotations or {}), "labels": dict(labels or {})},
               "spec": {"nodeName": node, "serviceAccountName": service_account,
                        "containers": [{"name": "app", "image": "busybox"}]},
               "status": {"phase": "Running"}}
        if volumes:
            obj["spec"]["volumes"] = list(volumes)
        return self._create("pods", namespace, obj)

    def create_namespace(self, name, annotations=None, labels=None):
        obj = {"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": name, "annotations": dict(annotations or {}), "labels": dict(labels or {})}}
        return self._create("namespaces", None, obj)

    def create_service_account(self, namespace, name, annotations=None):
        obj = {"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": name, "namespace": namespace, "annotations": dict(annotations or {})}}
        return self._create("serviceaccounts", namespace, obj)

    def annotate(self, plural, namespace, name, annotations):
        """Merge-patch annotations (a value None removes the key); namespace None for Namespaces."""
        return self.patch(plural, namespace, name, {"metadata": {"annotations": annotations}})

    def patch(self, plural, namespace, name, merge_patch):
        if not self.running:
            return self._offline(plural, namespace, name, merge_patch)
        return self.api("PATCH", self._path(plural, namespace, name), merge_patch,
                        content_type="application/merge-patch+json")

    def delete(self, plural, namespace, name):
        if not self.running:
            return self._offline(plural, namespace, name, None)
        return self.api("DELETE", self._path(plural, namespace, name))

    def get(self, plural, namespace, name):
        """The object, or None when the API answers 404 NotFound."""
        status, out = self._request("GET", self._path(plural, namespace, name))
        if status == 404:
            return None
        if status != 200:
            raise KubeApiError(status, out)
        return out

    def list(self, plural, namespace=None, field_selector=None, label_selector=None, metadata_only=False):
        """metadata_only: as `Api<PartialObjectMeta<K>>` asks, a PartialObjectMetadataList."""
        query = "&".join(f"{k}={v}" for k, v in (("fieldSelector", field_selector),
                                                  ("labelSelector", label_selector)) if v)
        accept = METADATA_LIST if metadata_only else "application/json"
        return self.api("GET", self._path(plural, namespace) + (f"?{query}" if query else ""), accept=accept)

    def events(self, namespace):
        """The events.k8s.io/v1 Events of `namespace` (what `kubectl describe` lists for its objects)."""
        return self.api("GET", f"/apis/events.k8s.io/v1/namespaces/{namespace}/events")["items"]

    def _create(self, plural, namespace, obj):
        if not self.running:
            return self._offline(plural, namespace, obj["metadata"]["name"], obj, create=True)
        return self.api("POST", self._path(plural, namespace), obj)

    def _offline(self, plural, namespace, name, change, create=False):
        """A change while the server is down: straight into its state file (no events)."""
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except FileNotFoundError:  # never started: an empty cluster
            state = {"resourceVersion": "0", "objects": []}
        rv = int(state["resourceVersion"]) + 1
        state["resourceVersion"] = str(rv)
        objects = state["objects"]
        match = [o for o in objects if o["plural"] == plural and o["namespace"] == namespace and o["name"] == name]
        if create:
            if match:
                raise KubeApiError(409, f"{plural} {namespace}/{name} already exists")
            obj = json.loads(json.dumps(change))
            obj["metadata"].setdefault("uid", str(uuid.uuid4()))
            obj["metadata"].setdefault("creationTimestamp",
                                       datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
            obj["metadata"]["resourceVersion"] = str(rv)
            objects.append({"group": "", "version": "v1", "plural": plural, "namespace": namespace,
                            "name": name, "object": obj})
        elif not match:
            raise KubeApiError(404, f"{plural} {namespace}/{name} not found")
        elif change is None:
            objects.remove(match[0])
            obj = match[0]["object"]
        else:
            obj = merged(match[0]["object"], change)
            obj["metadata"]["resourceVersion"] = str(rv)
            match[0]["object"] = obj
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_path)
        return obj

    # -- control and inspection ---------------------------------------------------------------
    def status(self):
        """{"resourceVersion", "historyStart", "watches": {plural: open watch streams}}."""
        return self.api("GET", "/_emulator/status")

    def break_watches(self):
        """Ends every open watch stream (as a server-side timeout would); returns how many."""
        return self.api("POST", "/_emulator/break-watches")["broken"]

    def forbid(self, *plurals):
        """Reads (list, watch, get) of these resources answer 403 Forbidden, as for a client whose
        RBAC lacks them, until `forbid()` with none; changes by the harness still go through."""
        return self.api("POST", "/_emulator/forbid", {"plurals": list(plurals)})["forbidden"]

    def expire_history(self):
        """Forgets the event history (an etcd compaction): every resumed watch gets 410 Gone."""
        return self.api("POST", "/_emulator/expire-history")["broken"]

    def requests(self):
        """Every request the server received, oldest first: {t, method, path, query, action, as}
        (`as`: the metadata-only transform the Accept header asked for, or None)."""
        return json_lines(self.log_path)

    def log_tail(self, lines=40):
        return tail(self.stderr_path, lines)

