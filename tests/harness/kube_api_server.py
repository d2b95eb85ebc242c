"""An emulated Kubernetes API server for the bench, run inside the node namespace.

There is no Kubernetes on these machines: this program stands in for kube-apiserver. It speaks the
real API's JSON wire format over plain HTTP, no auth: `/api/v1/...` and `/apis/<group>/<version>/...`
paths, list (`{"kind": "PodList", "metadata": {"resourceVersion"}, "items"}`), get, create
(POST), merge/JSON patch (PATCH), delete, and watch (`?watch=true`: a chunked stream of JSON lines
`{"type": "ADDED"|"MODIFIED"|"DELETED"|"ERROR", "object": ...}`), with metav1 `Status` errors.
That is what kube-rs (`kube` 5) and client-go use for typed list-watch.

    python3 kube_api_server.py --listen 198.18.0.5:6443 --state FILE --log FILE

What is kmock's (`kmock==0.8`, `KubernetesEmulator`): the aiohttp server, request parsing and
routing into actions, the per-object store with merge/JSON patch and history (`objects`), the
rendering of dicts and async generators as JSON and JSON-lines streams, discovery (`/api`,
`/api/v1`, `/version`) and the Status error body.

What is ours, and why (the gaps kmock 0.8 has against kube's watcher):
- `/api/v1/namespaces[/<name>]` is parsed as cluster-scoped Namespace objects (kmock reads the
  `namespaces` segment as a namespace: 500 on list, 404 on get). Done by wrapping kmock's path
  parser.
- Every change gets the next `metadata.resourceVersion` of one global counter, and lists carry it
  (kmock stamps none, and kube's watcher relists in a loop without one).
- `fieldSelector` (any dotted path with `=`, `==`, `!=`, e.g. `spec.nodeName=n1`) and
  `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, exists, `!`) filter lists and watches. In a
  watch an object that starts or stops matching arrives as ADDED or DELETED, as the real watch
  cache does (kmock ignores selectors).
- Watches resume: `resourceVersion=N` replays the changes after N from an in-memory history
  that starts when the process starts; an N older than that (or newer than now) gets an ERROR
  event with a 410 `Expired` Status in a 200 stream, as kube-apiserver does, so clients relist.
  kmock's watch replays every object as ADDED on each (re)watch instead. `resourceVersion` ""
  or "0" starts with ADDED for the current objects. `timeoutSeconds` ends a watch.
- 404 and 409 bodies carry the real reasons `NotFound` and `AlreadyExists` (kube's
  `is_not_found()` compares the reason).
- Creation stamps `uid`, `creationTimestamp`, `apiVersion` and `kind` unless given.
- State survives a restart: the `--state` file (objects and the counter), loaded at start like
  etcd, is written on `POST /_emulator/save` (which `KubeApi.stop()` calls before it kills the
  server) and on SIGTERM, when anything changed. Not on every change: each write is the whole
  state, so 1,000 objects of 250 KiB made one by one would write 125 GB. The event history does
  not survive (see above). While the process is down the harness may edit the file; such changes
  produce no events (a relist shows them).
- Control endpoints under `/_emulator/`: `GET status` (resourceVersion, history start, open
  watches by resource), `POST save` (writes the state file if anything changed), `POST
  break-watches` (ends every open watch stream cleanly, like a server-side timeout), `POST
  expire-history` (forgets the history, as an etcd compaction: every resumed watch gets 410),
  `POST forbid` (`{"plurals": [...]}`: lists, watches and gets of those resources answer 403
  Forbidden, as with a client whose RBAC lacks them; changes still go through, as from another
  client; `[]` lifts it; not kept across a restart).
- Metadata-only reads, as kube-apiserver answers them (apimachinery's `PartialObjectMetadata`,
  `metav1.AsPartialObjectMetadata` in the handlers' response transform): an `Accept` of
  `application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1` on a list answers
  `{"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata":
  {"resourceVersion"}, "items": [...]}`, each item `{"apiVersion": "meta.k8s.io/v1", "kind":
  "PartialObjectMetadata", "metadata": <the whole ObjectMeta>}` (no spec, no status);
  `as=PartialObjectMetadata` does the same to a get and to each watch event's object (ERROR
  events keep their v1 Status). The media types of `Accept` are tried in order, as the server's
  negotiation does, so `...;as=PartialObjectMetadata...,application/json` (client-go's metadata
  client) gets metadata; one that names only a transform the request cannot take (`as=
  PartialObjectMetadata` on a list) is 406 NotAcceptable. This is what kube's `metadata_watcher`
  and `Api<PartialObjectMeta<K>>` send (kube-core `request.rs`: `JSON_METADATA_LIST_MIME` for
  lists, `JSON_METADATA_MIME` for watches and gets). The answer's Content-Type stays
  `application/json` (the real server names the transform in it; kube does not read it).
- Every request is appended to the `--log` file as a JSON line (method, path, query, action,
  and `as`: the metadata transform asked for, or null).

- Lists page as kube-apiserver pages them: `limit=N` answers at most N items and, when more
  remain, `metadata.continue` (an opaque token); `continue=<token>` answers the next page. kube's
  watcher lists 500 at a time, so a large cluster's list is never one body. Unlike the real
  server, a later page is read from the current objects (after the last key), not from a snapshot
  at the first page's resourceVersion, which every page reports.

- events.k8s.io/v1 Events are checked as kube-apiserver's validation checks them (apis/events
  `ValidateEventCreate`/`ValidateEventUpdate`): on create `eventTime`, `reportingController`,
  `reportingInstance`, `action`, `reason` and `regarding` are required, `type` is Normal or
  Warning, `note` at most 1 kB, and `series` is not set; a patch may change `series` (and the
  deprecated counters) but none of those fields. kmock stores any JSON, so a recorder that
  writes what the real server rejects would pass against it.

Not emulated: auth, admission, namespace existence checks on create, PUT (replace),
strategic-merge semantics (treated as merge patch), bookmarks, server-side apply, graceful deletion (a delete removes at once).
"""

import argparse
import asyncio
import base64
import bisect
import datetime
import json
import os
import re
import signal
import sys
import time
import uuid

import kmock
from kmock._internal import apps, parsing
from merge_patch import merged

# Resources whose objects live outside namespaces; the rest are namespaced.
CLUSTER_SCOPED = {"namespaces", "nodes", "persistentvolumes", "clusterroles", "clusterrolebindings",
                  "storageclasses", "customresourcedefinitions", "priorityclasses"}
KINDS = {"pods": "Pod", "namespaces": "Namespace", "serviceaccounts": "ServiceAccount", "nodes": "Node",
         "configmaps": "ConfigMap", "secrets": "Secret", "services": "Service", "endpoints": "Endpoints"}

_NAMESPACE_PATH = re.compile(r"^/api/(?P<version>[^/]+)/namespaces(?:/(?P<name>[^/]+)(?:/(?P<sub>status|finalize))?)?/?$")
_kmock_parse_path = parsing.parse_path


def parse_path(path):
    """kmock's parser, except that `/api/v1/namespaces[/<name>]` names Namespace objects."""
    m = _NAMESPACE_PATH.match(path)
    if m:
        return parsing.ParsedPath(group="", version=m["version"], plural="namespaces", namespace=None,
                                  name=m["name"], subresource=m["sub"])
    return _kmock_parse_path(path)


parsing.parse_path = parse_path  # kmock's Request._parse looks it up on the module


def list_key(obj):
    """The order of lists and the position a continue token names: [namespace, name]."""
    return [obj["metadata"].get("namespace") or "", obj["metadata"]["name"]]


def now_rfc3339():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def kind_of(plural):
    return KINDS.get(plural) or (plural[:-1] if plural.endswith("s") else plural).capitalize()


def api_version_of(resource):
    return resource.version if not resource.group else f"{resource.group}/{resource.version}"


class ApiError(kmock.KubernetesError):
    """A metav1 Status with the reason kube-apiserver gives (kube matches on `reason`)."""


def not_found(resource, name):
    return ApiError(status=404, reason="NotFound", message=f'{resource.plural} "{name}" not found',
                    details={"name": name or "", "kind": resource.plural})


# -- metadata-only reads (`Accept: application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`)
META_API_VERSION = "meta.k8s.io/v1"


def requested_transform(accept):
    """The `as=` transform the first acceptable media type of `accept` asks for: None (the whole
    object), "PartialObjectMetadata" or "PartialObjectMetadataList". Unknown transforms and
    non-JSON types are skipped, as the server's negotiation skips what it cannot produce; when
    nothing acceptable remains the answer is 406."""
    if not accept:
        return None
    for media in accept.split(","):
        kind, *params = [p.strip() for p in media.split(";")]
        if kind not in ("application/json", "application/*", "*/*"):
            continue
        p = dict(x.split("=", 1) for x in params if "=" in x)
        as_ = p.get("as")
        if as_ is None:
            return None
        if as_ in ("PartialObjectMetadata", "PartialObjectMetadataList") and p.get("g") == "meta.k8s.io" \
                and p.get("v") == "v1":
            return as_
    raise ApiError(status=406, reason="NotAcceptable",
                   message=f"only the following media types are accepted: application/json, "
                           f"application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1 (asked {accept!r})")


def transform_of(request):
    headers = {k.lower(): v for k, v in (request.headers or {}).items()}
    return requested_transform(headers.get("accept"))


def partial(obj):
    """An object as PartialObjectMetadata: its whole metadata, nothing else."""
    return {"apiVersion": META_API_VERSION, "kind": "PartialObjectMetadata", "metadata": obj.get("metadata") or {}}


def status(code, reason, message):
    return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "code": code, "reason": reason, "message": message}


# -- selectors ------------------------------------------------------------------------------
def _field(obj, path):
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    return "" if cur is None else str(cur)


def parse_field_selector(text):
    """[(path, op, value)] with op '=' or '!='; a missing field compares as ""."""
    terms = []
    for term in filter(None, (t.strip() for t in (text or "").split(","))):
        m = re.fullmatch(r"([^=!]+?)\s*(==|=|!=)\s*(.*)", term)
        if not m:
            raise ApiError(status=400, reason="BadRequest", message=f"invalid field selector: {term!r}")
        terms.append((m[1], "!=" if m[2] == "!=" else "=", m[3]))
    return terms


def parse_label_selector(text):
    """[(key, op, values)] with op in '=', '!=', 'in', 'notin', 'exists', '!'."""
    terms = []
    # Split on commas that are not inside parentheses.
    for term in filter(None, (t.strip() for t in re.split(r",(?![^()]*\))", text or ""))):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", term):
            terms.append((m[1], m[2], {v.strip() for v in m[3].split(",") if v.strip()}))
        elif m := re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*(\S*)", term):
            terms.append((m[1], "!=" if m[2] == "!=" else "=", {m[3]}))
        elif m := re.fullmatch(r"!\s*(\S+)", term):
            terms.append((m[1], "!", set()))
        elif re.fullmatch(r"\S+", term):
            terms.append((term, "exists", set()))
        else:
            raise ApiError(status=400, reason="BadRequest", message=f"invalid label selector: {term!r}")
    return terms


class Want:
    """What one list or watch asks for: resource, namespace, name and selectors."""

    def __init__(self, request):
        self.resource = request.resource
        self.namespace = None if request.resource.plural in CLUSTER_SCOPED else request.namespace
        self.name = request.name
        self.fields = parse_field_selector(request.params.get("fieldSelector"))
        self.labels = parse_label_selector(request.params.get("labelSelector"))

    def matches(self, obj):
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.name is not None and meta.get("name") != self.name:
            return False
        for path, op, value in self.fields:
            if (_field(obj, path) == value) != (op == "="):
                return False
        labels = meta.get("labels") or {}
        for key, op, values in self.labels:
            present = key in labels
            ok = {"=": present and labels[key] in values,
                  "!=": not present or labels[key] not in values,
                  "in": present and labels[key] in values,
                  "notin": not present or labels[key] not in values,
                  "exists": present,
                  "!": not present}[op]
            if not ok:
                return False
        return True


# -- events.k8s.io/v1 Events, checked as kube-apiserver checks them ------------------------------
EVENT_REQUIRED = ("eventTime", "reportingController", "reportingInstance", "action", "reason", "regarding")
EVENT_IMMUTABLE = ("eventTime", "reportingController", "reportingInstance", "action", "reason", "regarding",
                   "related", "type")


def is_event(resource):
    return resource.group == "events.k8s.io" and resource.plural == "events"


def check_event(obj, prev):
    """The 422 kube-apiserver gives an Event it would not store; `prev`: the stored one (update)."""
    def invalid(message):
        return ApiError(status=422, reason="Invalid", message=f"Event.events.k8s.io is invalid: {message}")
    for field in EVENT_REQUIRED:
        if not obj.get(field):
            raise invalid(f"{field}: Required value")
    if obj.get("type") not in ("Normal", "Warning"):
        raise invalid(f"type: Unsupported value: {obj.get('type')!r}")
    for field in ("reportingInstance", "action", "reason"):
        if len(obj[field]) > 128:
            raise invalid(f"{field}: Too long: may not be more than 128 bytes")
    if len((obj.get("note") or "").encode()) > 1024:
        raise invalid("note: Too long: may not be more than 1024 bytes")
    if prev is None and obj.get("series") is not None:
        raise invalid("series: Forbidden: may not be set on create")
    for field in EVENT_IMMUTABLE if prev is not None else ():
        if obj.get(field) != prev.get(field):
            raise invalid(f"{field}: Invalid value: field is immutable")


class Emulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with resourceVersions, selectors, resumable watches and
    persistence; see the module docstring for the split."""

    def __init__(self, state_path, log_path):
        super().__init__()
        self.state_path = state_path
        self.log = open(log_path, "a", buffering=1)
        self.rv = 0
        self.first_rv = 0  # the history holds every change after this resourceVersion
        self.history = []  # (rv, resource, type, obj, prev)
        self.watches = {}  # asyncio.Queue -> resource plural
        self.forbidden = set()  # plurals whose reads answer 403 (POST /_emulator/forbid)
        self.unsaved = False  # a change since the state file was last written
        self._list_cache = None  # (query, objects, keys) of the last list (_listed)
        self._load()
        self["post /_emulator/break-watches"] << self._break_watches
        self["post /_emulator/expire-history"] << self._expire_history
        self["get /_emulator/status"] << self._status
        self["post /_emulator/forbid"] << self._forbid
        self["post /_emulator/save"] << self._save_now

    # -- persistence --------------------------------------------------------------------------
    def _load(self):
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except FileNotFoundError:
            return
        for o in state["objects"]:
            res = kmock.resource(group=o["group"], version=o["version"], plural=o["plural"])
            self.objects[res, o["namespace"], o["name"]] = o["object"]
        self.rv = self.first_rv = int(state["resourceVersion"])

    def _save_now(self, request):
        return {"saved": self.save()}

    def save(self):
        """Writes the state file if anything changed since the last write; whether it did."""
        if not self.unsaved:
            return False
        self.unsaved = False
        objects = [{"group": res.group, "version": res.version, "plural": res.plural, "namespace": ns,
                    "name": name, "object": obj.raw}
                   for (res, ns, name), obj in self.objects.items() if not obj.deleted]
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"resourceVersion": str(self.rv), "objects": objects}, f)
        os.replace(tmp, self.state_path)
        return True

    # -- requests -----------------------------------------------------------------------------
    async def _handle(self, request):
        """Logs the request, then routes it with kmock's dispatcher. KubernetesEmulator's own
        prelude (which changes objects without resourceVersions) is skipped on purpose: our
        `_serve_*` handlers own every change. kmock keeps every request it received and its
        dispatcher scans them all for each new one (a thousand requests take minutes); the log
        here is ours, so it keeps only the request being routed (no await since it was added)."""
        del self._requests[:-1]
        try:
            as_ = transform_of(request)
        except ApiError:
            as_ = "?"  # not acceptable: answered 406 by the handler
        self.log.write(json.dumps({"t": time.time(), "method": request.method, "path": request.url.path,
                                   "query": request.params,
                                   "action": request.action.value if request.action else None,
                                   "as": as_}) + "\n")
        resource = request.resource
        if request.method == "GET" and resource is not None and resource.plural in self.forbidden:
            raise ApiError(status=403, reason="Forbidden",
                           message=f'{resource.plural} is forbidden: User "bench" cannot list resource '
                                   f'"{resource.plural}" in API group "" at the cluster scope')
        return await apps.RawHandler._handle(self, request)

    def _live(self, resource, namespace, name):
        key = (resource, namespace, name)
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key]
        return None

    def _key(self, request, name=None):
        ns = None if request.resource.plural in CLUSTER_SCOPED else request.namespace
        return request.resource, ns, name or request.name

    def _record(self, resource, type_, obj, prev):
        self.history.append((self.rv, resource, type_, obj, prev))
        for queue, plural in self.watches.items():
            if plural == resource.plural:
                queue.put_nowait((self.rv, resource, type_, obj, prev))
        self.unsaved = True

    def _listed(self, want, request):
        """(objects, their keys): what a list asks for, sorted by [namespace, name]. Kept for the
        next page while nothing changes: a list of N objects comes N / limit pages at a time."""
        query = (self.rv, want.resource, want.namespace, request.params.get("fieldSelector"),
                 request.params.get("labelSelector"))
        if self._list_cache is None or self._list_cache[0] != query:
            items = [obj.raw for (res, _, _), obj in self.objects.items()
                     if res == want.resource and not obj.deleted and want.matches(obj.raw)]
            items.sort(key=list_key)
            self._list_cache = (query, items, [list_key(o) for o in items])
        return self._list_cache[1], self._list_cache[2]

    async def _serve_list(self, request):
        want = Want(request)
        items, keys = self._listed(want, request)
        rv, meta = str(self.rv), {}
        if request.params.get("continue"):
            try:
                token = json.loads(base64.urlsafe_b64decode(request.params["continue"]))
                rv, after = token["rv"], token["after"]
            except (ValueError, KeyError, TypeError):
                raise ApiError(status=400, reason="BadRequest", message="invalid continue token")
            items = items[bisect.bisect_right(keys, after):]
        limit = int(request.params.get("limit") or 0)
        if 0 < limit < len(items):
            items = items[:limit]
            meta["continue"] = base64.urlsafe_b64encode(
                json.dumps({"rv": rv, "after": list_key(items[-1])}).encode()).decode()
        meta["resourceVersion"] = rv
        as_ = transform_of(request)
        if as_ == "PartialObjectMetadata":
            raise ApiError(status=406, reason="NotAcceptable",
                           message="you requested PartialObjectMetadata, but the requested object is a list "
                                   "(use PartialObjectMetadataList)")
        if as_ == "PartialObjectMetadataList":
            return {"apiVersion": META_API_VERSION, "kind": "PartialObjectMetadataList",
                    "metadata": meta, "items": [partial(o) for o in items]}
        return {"apiVersion": api_version_of(want.resource), "kind": kind_of(want.resource.plural) + "List",
                "metadata": meta, "items": items}

    async def _serve_fetch(self, request):
        as_ = transform_of(request)
        if as_ == "PartialObjectMetadataList":
            raise ApiError(status=406, reason="NotAcceptable",
                           message="you requested PartialObjectMetadataList, but the requested object is not a list")
        obj = self._live(*self._key(request))
        if obj is None:
            raise not_found(request.resource, request.name)
        return partial(obj.raw) if as_ else obj.raw

    async def _serve_create(self, request):
        data = request.data
        if not isinstance(data, dict):
            raise ApiError(status=400, reason="BadRequest", message="the body must be a JSON object")
        obj = json.loads(json.dumps(data))
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(status=422, reason="Invalid", message="metadata.name: Required value")
        resource, ns, name = self._key(request, meta["name"])
        if resource.plural not in CLUSTER_SCOPED:
            if not ns:
                raise ApiError(status=400, reason="BadRequest", message="a namespaced object needs a namespace")
            meta["namespace"] = ns
        if self._live(resource, ns, name) is not None:
            raise ApiError(status=409, reason="AlreadyExists", message=f'{resource.plural} "{name}" already exists',
                           details={"name": name, "kind": resource.plural})
        obj.setdefault("apiVersion", api_version_of(resource))
        obj.setdefault("kind", kind_of(resource.plural))
        if is_event(resource):
            check_event(obj, None)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now_rfc3339())
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        key = (resource, ns, name)
        if key in self.objects:
            self.objects[key].create(obj)
        else:
            self.objects[key] = obj
        self._record(resource, "ADDED", obj, None)
        return kmock.Response(status=201, payload=obj)

    async def _serve_update(self, request):
        key = self._key(request)
        current = self._live(*key)
        if current is None:
            raise not_found(request.resource, request.name)
        patch = request.data
        if not isinstance(patch, (dict, list)):
            raise ApiError(status=400, reason="BadRequest", message="the body must be a merge or JSON patch")
        prev = json.loads(json.dumps(current.raw))
        if is_event(key[0]):
            if not isinstance(patch, dict):
                raise ApiError(status=415, reason="UnsupportedMediaType", message="Events here take merge patches")
            check_event(merged(prev, patch), prev)
        wanted_rv = patch.get("metadata", {}).get("resourceVersion") if isinstance(patch, dict) else None
        if wanted_rv and wanted_rv != prev["metadata"]["resourceVersion"]:
            raise ApiError(status=409, reason="Conflict",
                           message=f'the object has been modified; resourceVersion is {prev["metadata"]["resourceVersion"]}')
        try:
            current.patch(patch)
        except Exception as e:
            raise ApiError(status=422, reason="Invalid", message=f"patch failed: {e}")
        obj = current.raw
        meta = obj.setdefault("metadata", {})
        for immutable in ("name", "namespace", "uid", "creationTimestamp"):
            if immutable in prev["metadata"]:
                meta[immutable] = prev["metadata"][immutable]
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        self._record(key[0], "MODIFIED", obj, prev)
        return obj

    async def _serve_delete(self, request):
        key = self._key(request)
        current = self._live(*key)
        if current is None:
            raise not_found(request.resource, request.name)
        prev = json.loads(json.dumps(current.raw))
        self.rv += 1
        obj = json.loads(json.dumps(prev))
        obj["metadata"]["resourceVersion"] = str(self.rv)
        current.delete()
        self._record(key[0], "DELETED", obj, prev)
        return obj

    async def _serve_watch(self, request):
        want = Want(request)
        as_ = transform_of(request)
        if as_ == "PartialObjectMetadataList":
            raise ApiError(status=406, reason="NotAcceptable",
                           message="a watch streams objects: use as=PartialObjectMetadata")
        view = (lambda e: {"type": e["type"], "object": partial(e["object"])}) if as_ else (lambda e: e)
        since = request.params.get("resourceVersion", "")
        timeout = request.params.get("timeoutSeconds")
        deadline = time.monotonic() + float(timeout) if timeout else None
        yield b""  # headers now: a quiet watch is still an open watch
        queue = asyncio.Queue()
        if since in ("", "0"):
            backlog = [{"type": "ADDED", "object": obj.raw} for (res, _, _), obj in self.objects.items()
                       if res == want.resource and not obj.deleted and want.matches(obj.raw)]
        elif not since.isdigit() or not self.first_rv <= int(since) <= self.rv:
            yield {"type": "ERROR", "object": status(
                410, "Expired", f"too old resource version: {since} ({self.first_rv})")}
            return
        else:
            backlog = [e for e in (self._event(want, *h) for h in self.history if h[0] > int(since)) if e]
        self.watches[queue] = want.resource.plural  # no await since the backlog: nothing is missed
        try:
            for event in backlog:
                yield view(event)
            while True:
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    return
                try:
                    item = await asyncio.wait_for(queue.get(), wait)
                except asyncio.TimeoutError:
                    return
                if item is None:  # break-watches
                    return
                event = self._event(want, *item)
                if event:
                    yield view(event)
        finally:
            self.watches.pop(queue, None)

    @staticmethod
    def _event(want, rv, resource, type_, obj, prev):
        """The event one watcher sees, as the watch cache filters it: an object that starts
        matching is ADDED, one that stops matching is DELETED (its previous state, new version)."""
        if resource != want.resource:
            return None
        was = want.matches(prev)
        now = type_ != "DELETED" and want.matches(obj)
        if type_ == "DELETED":
            return {"type": "DELETED", "object": obj} if was else None
        if now:
            return {"type": "MODIFIED" if was else "ADDED", "object": obj}
        if was:
            gone = json.loads(json.dumps(prev))
            gone["metadata"]["resourceVersion"] = str(rv)
            return {"type": "DELETED", "object": gone}
        return None

    # -- control ------------------------------------------------------------------------------
    def _status(self, request):
        by = {}
        for plural in self.watches.values():
            by[plural] = by.get(plural, 0) + 1
        return {"resourceVersion": str(self.rv), "historyStart": str(self.first_rv), "watches": by}

    def _break_watches(self, request):
        n = len(self.watches)
        for queue in list(self.watches):
            queue.put_nowait(None)
        return {"broken": n}

    def _forbid(self, request):
        self.forbidden = set((request.data or {}).get("plurals") or [])
        return {"forbidden": sorted(self.forbidden)}

    def _expire_history(self, request):
        self.history.clear()
        self.first_rv = self.rv
        return self._break_watches(request)


async def serve(host, port, state, log):
    emulator = Emulator(state, log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with emulator, kmock.Server(emulator, host=host, port=port):
        print(f"kube_api_server: listening on http://{host}:{port} at resourceVersion {emulator.rv}",
              file=sys.stderr, flush=True)
        await stop.wait()
    emulator.save()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="IP:PORT")
    ap.add_argument("--state", required=True, help="JSON file of objects, kept across restarts")
    ap.add_argument("--log", required=True, help="JSON-lines request log (appended)")
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    asyncio.run(serve(host, int(port), args.state, args.log))


if __name__ == "__main__":
    main()
