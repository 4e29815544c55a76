"""A Kubernetes API server stand-in for the controller tests: kmock's KubernetesEmulator (an
in-memory store served as list, watch, get, create, merge-patch and delete over HTTP) with the
resources the controller reads and writes declared, and two gaps filled so kube-rs can use it:

- every create and patch stamps a fresh metadata.resourceVersion (a global counter; kube-rs's
  watcher refuses objects without one). kmock has no resourceVersion semantics otherwise: a
  watch from a version replays every object as ADDED, and there is no 410 Gone.
- a 404 says `reason: NotFound`, as the real API server's Status does (kmock says "Object Not
  Found"; kube-rs's get_opt tells a missing object by the reason).
- a server-side apply (PATCH with application/apply-patch+yaml) of an object that does not exist
  creates it, as the real API server does; kmock would answer 404. The apply itself is then a
  recursive merge of the sent fields: no managedFields, no field ownership, no conflicts.
- a PUT (replace) of an existing object honours metadata.resourceVersion as a precondition, as
  the real API server does: a stale version answers 409 Conflict and changes nothing (leader
  election and the webhook configuration's caBundle depend on it); kmock has no PUT otherwise.

Prints the port it listens on (127.0.0.1) and serves until its stdin closes.
"""
import asyncio
import itertools
import sys

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
}
VERBS = {"get", "list", "watch", "create", "patch", "delete"}
versions = itertools.count(1)


class Emulator(kmock.KubernetesEmulator):
    async def _handle(self, request):
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

    async def _render_error(self, exc):
        if isinstance(exc, kmock.KubernetesNotFoundError):
            exc = kmock.KubernetesNotFoundError(reason="NotFound", message=exc.message)
        return await super()._render_error(exc)


async def main():
    emulator = Emulator()
    for resource, (kind, namespaced) in RESOURCES.items():
        emulator.resources[resource] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs=VERBS)
    async with emulator as handler, kmock.Server(handler) as server:
        print(server.port, flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main())
