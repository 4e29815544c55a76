"""A Kubernetes API server stand-in for the controller tests: kmock's KubernetesEmulator (an
in-memory store served as list, watch, get, create, merge-patch and delete over HTTP) with the
resources the controller reads and writes declared, and two gaps filled so kube-rs can use it:

- every create and patch stamps a fresh metadata.resourceVersion (a global counter; kube-rs's
  watcher refuses objects without one). kmock has no resourceVersion semantics otherwise: a
  watch from a version replays every object as ADDED, and there is no 410 Gone.
- a 404 says `reason: NotFound`, as the real API server's Status does (kmock says "Object Not
  Found"; kube-rs's get_opt tells a missing object by the reason).
- kubectl works as a client: the core group's discovery document says `groupVersion: v1` (kmock
  says "/v1", and kubectl then finds no resource type), and a list says its kind
  (`ServiceList`, ...) and apiVersion, which kubectl's decoder requires; each resource has its
  singular name (`endpointslice`), as kubectl resolves it. kubectl still needs
  `--validate=false` on create/apply: there is no OpenAPI document.
- the pods/proxy subresource (`GET /api/v1/namespaces/NS/pods/NAME[:PORT]/proxy/PATH`), as the
  API server serves it: the GET is forwarded to the pod's `status.podIP` at PORT (80 by default)
  and PATH, with the query, and the pod's status, content type and body come back unchanged; a
  pod that does not exist is a 404 NotFound, one whose address refuses or does not answer (5 s)
  a 503 `ServiceUnavailable` whose message starts "error trying to reach service", as the real
  proxy says. Only plain HTTP and GET (what `isthmus-ctl proxy-status` uses).
- Namespace objects are served (`/api/v1/namespaces[/NAME]`): kmock reads those paths as "inside a
  namespace" and fails on them.
- a server-side apply (PATCH with application/apply-patch+yaml) of an object that does not exist
  creates it, as the real API server does; kmock would answer 404. The apply itself is then a
  recursive merge of the sent fields: no managedFields, no field ownership, no conflicts.
- a PUT (replace) of an existing object honours metadata.resourceVersion as a precondition, as
  the real API server does: a stale version answers 409 Conflict and changes nothing (leader
  election and the webhook configuration's caBundle depend on it); kmock has no PUT otherwise.

- TokenReview (`POST /apis/authentication.k8s.io/v1/tokenreviews`), answered from a token table
  the test seeds as ConfigMap `kmock-tokens` in namespace `kmock-system`: each data key is a
  token, its value JSON `{"username": "system:serviceaccount:NS:SA", "audiences": [...]}`. As the
  real API server does: a token not in the table is `authenticated: false` with an error; the
  requested `spec.audiences` (none: the token's own) intersected with the token's are
  `status.audiences`, and an empty intersection is `authenticated: false`.

Prints the port it listens on (127.0.0.1) and serves until its stdin closes.
"""
import asyncio
import itertools
import json
import os
import sys

import aiohttp
import aiohttp.web
import kmock

RESOURCES = {
    "v1/services": ("Service", True),
    "v1/pods": ("Pod", True),
    "v1/configmaps": ("ConfigMap", True),
    "v1/namespaces": ("Namespace", False),
    "discovery.k8s.io/v1/endpointslices": ("EndpointSlice", True),
    "v1/secrets": ("Secret", True),
    "coordination.k8s.io/v1/leases": ("Lease", True),
    "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations": ("MutatingWebhookConfiguration", False),
    # isthmus-ctl install / uninstall (ctl/tests/install_kmock.rs)
    "v1/serviceaccounts": ("ServiceAccount", True),
    "apps/v1/deployments": ("Deployment", True),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True),
    "rbac.authorization.k8s.io/v1/clusterroles": ("ClusterRole", False),
    "rbac.authorization.k8s.io/v1/clusterrolebindings": ("ClusterRoleBinding", False),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False),
    # the controller's Istio inputs and its reports (ctl/tests/controller_kmock.rs); a test
    # leaves some out with KMOCK_WITHOUT (comma-separated keys): a CRD that is not installed
    "networking.istio.io/v1/virtualservices": ("VirtualService", True),
    "networking.istio.io/v1/destinationrules": ("DestinationRule", True),
    "networking.istio.io/v1/serviceentries": ("ServiceEntry", True),
    "networking.istio.io/v1/sidecars": ("Sidecar", True),
    "security.istio.io/v1/peerauthentications": ("PeerAuthentication", True),
    "security.istio.io/v1/authorizationpolicies": ("AuthorizationPolicy", True),
    "events.k8s.io/v1/events": ("Event", True),
    # the controller's CA (ctl/tests/ca_kmock.rs): create only, answered from kmock-tokens
    "authentication.k8s.io/v1/tokenreviews": ("TokenReview", False),
}
VERBS = {"get", "list", "watch", "create", "patch", "delete"}
versions = itertools.count(1)


_parse_path = kmock._internal.parsing.parse_path


def parse_path(path):
    """kmock reads `/api/v1/namespaces[/NAME]` as "inside namespace NAME" (and fails on the bare
    collection): here it is the Namespace resource, as the real API server has it."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
        len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
    ):
        name = parts[3] if len(parts) > 3 else None
        return kmock._internal.parsing.ParsedPath("", "v1", "namespaces", None, name, (parts[4:] or [None])[0])
    return _parse_path(path)


kmock._internal.parsing.parse_path = parse_path


class Emulator(kmock.KubernetesEmulator):
    async def _handle(self, request):
        if request.resource is not None and request.resource.plural == "tokenreviews" and request.method == "POST":
            return await self._review_token(request)
        if (
            request.resource is not None
            and request.resource.plural == "pods"
            and (request.subresource or "").split("/")[0] == "proxy"
        ):
            return await self._proxy_to_pod(request)
        if request.resource is not None and request.name is not None and request.method == "PUT":
            return await self._replace(request)
        if (
            request.resource is not None
            and request.action in (kmock.action.CREATE, kmock.action.UPDATE)
            and isinstance(request.data, dict)
        ):
            request.data.setdefault("metadata", {})["resourceVersion"] = str(next(versions))
            apply = "apply-patch" in request.headers.get("Content-Type", "")
            if request.action == kmock.action.UPDATE and apply:
                key = (request.resource, request.namespace, request.name)
                async with self._lock:
                    if key not in self.objects or self.objects[key].deleted:
                        if key in self.objects:
                            self.objects[key].create(request.data)
                        else:
                            self.objects[key] = request.data
                        raw = self.objects[key].last.raw
                        await self._buses[request.resource].put({"type": "ADDED", "object": raw})
        return await super()._handle(request)

    async def _replace(self, request):
        """PUT: the object replaced whole, if the sent resourceVersion (when sent) is current."""
        key = (request.resource, request.namespace, request.name)
        if not isinstance(request.data, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="a PUT needs a JSON object")
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                raise kmock.KubernetesNotFoundError(reason="NotFound", message=f"{request.name} not found")
            current = self.objects[key].raw.get("metadata", {}).get("resourceVersion")
            sent = request.data.get("metadata", {}).get("resourceVersion")
            if sent and sent != current:
                raise kmock.KubernetesError(
                    status=409, reason="Conflict",
                    message=f"Operation cannot be fulfilled on {request.name}: the object has been modified "
                            f"(resourceVersion {sent} is not the current {current})")
            request.data.setdefault("metadata", {})["resourceVersion"] = str(next(versions))
            self.objects[key].create(request.data)
            raw = self.objects[key].raw
            await self._buses[request.resource].put({"type": "MODIFIED", "object": raw})
        return aiohttp.web.json_response(raw)

    async def _serve_version(self, request):
        # kmock names the core group's version "/v1"; kubectl's discovery wants "v1" (and finds
        # no resource type at all otherwise).
        doc = await super()._serve_version(request)
        doc["groupVersion"] = doc["groupVersion"].lstrip("/")
        return doc

    async def _serve_list(self, request):
        doc = await super()._serve_list(request)
        resource = request.resource
        kind = RESOURCES.get(f"{resource.group}/{resource.version}/{resource.plural}".lstrip("/"))
        doc["apiVersion"] = f"{resource.group}/{resource.version}".lstrip("/")
        doc["kind"] = f"{kind[0]}List" if kind else "List"
        if "as=PartialObjectMetadataList" in request.headers.get("Accept", ""):
            # A metadata-only list (kube-rs's Api<PartialObjectMeta<K>>), as the API server
            # serves it. Watch events still carry whole objects: the client decodes metadata only.
            doc["apiVersion"], doc["kind"] = "meta.k8s.io/v1", "PartialObjectMetadataList"
            doc["items"] = [
                {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": item.get("metadata", {})}
                for item in doc.get("items", [])
            ]
        return doc

    async def _proxy_to_pod(self, request):
        """The pods/proxy subresource: the API server's forwarder to the pod's own address."""
        name, _, port = request.name.partition(":")
        key = (request.resource, request.namespace, name)
        async with self._lock:
            pod = self.objects[key].raw if key in self.objects and not self.objects[key].deleted else None
        if pod is None:
            return await self._render_error(kmock.KubernetesNotFoundError(message=f'pods "{name}" not found'))
        ip = pod.get("status", {}).get("podIP", "")
        path = request.subresource.partition("/")[2]
        url = f"http://{ip}:{port or 80}/{path}"
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(url, params=request.params) as upstream:
                    body = await upstream.read()
                    return aiohttp.web.Response(
                        status=upstream.status,
                        body=body,
                        headers={"Content-Type": upstream.headers.get("Content-Type", "text/plain")},
                    )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            status = {
                "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "code": 503, "reason": "ServiceUnavailable",
                "message": f"error trying to reach service: {type(e).__name__}: {e} ({url})",
            }
            return aiohttp.web.json_response(status, status=503)

    async def _review_token(self, request):
        """TokenReview against the `kmock-tokens` table (see the module docstring)."""
        review = request.data if isinstance(request.data, dict) else {}
        token = review.get("spec", {}).get("token") or ""
        wanted = review.get("spec", {}).get("audiences") or []
        entry = None
        async with self._lock:
            for key, obj in self.objects.items():
                meta = obj.raw.get("metadata", {})
                if key[0].plural == "configmaps" and not obj.deleted and \
                        (meta.get("namespace"), meta.get("name")) == ("kmock-system", "kmock-tokens"):
                    entry = obj.raw.get("data", {}).get(token)
        status = {"authenticated": False}
        if entry is None:
            status["error"] = "[invalid bearer token, token lookup failed]"
        else:
            entry = json.loads(entry)
            have = entry.get("audiences", [])
            common = [a for a in wanted if a in have] if wanted else have
            if common:
                status = {"authenticated": True, "audiences": common,
                          "user": {"username": entry["username"], "uid": "kmock", "groups": []}}
            else:
                status["error"] = f"[invalid bearer token, token audiences {have} is invalid for the target audiences {wanted}]"
        answer = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                  "metadata": {"creationTimestamp": None}, "spec": review.get("spec", {}), "status": status}
        return aiohttp.web.json_response(answer, status=201)

    async def _render_error(self, exc):
        if isinstance(exc, kmock.KubernetesNotFoundError):
            exc = kmock.KubernetesNotFoundError(reason="NotFound", message=exc.message)
        return await super()._render_error(exc)


async def main():
    emulator = Emulator()
    without = set(filter(None, os.environ.get("KMOCK_WITHOUT", "").split(",")))
    for resource, (kind, namespaced) in RESOURCES.items():
        if resource in without:
            continue
        emulator.resources[resource] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs=VERBS, singular=kind.lower())
    async with emulator as handler, kmock.Server(handler) as server:
        print(server.port, flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main())
