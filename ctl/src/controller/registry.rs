//! The desired registry as a pure function of what the watchers hold: one `ServiceEntry` per
//! Service (hosts `<name>.<ns>.svc.cluster.local`, the cluster IPs, the ports with their
//! protocol, `resolution: STATIC`) whose endpoints are the ready addresses of the Service's
//! EndpointSlices, labelled with their pod's labels, `isthmus.io/workload` and service account.
//! No I/O here: the controller feeds it the reflector stores' contents, the tests feed it
//! literals. `ExternalName` Services become `resolution: DNS` entries to their external name;
//! a Service's `networking.istio.io/exportTo` annotation decides which namespaces' registries
//! hold it ([`registry_for`]).

use std::collections::{BTreeMap, HashMap};

use isthmus_config::{Protocol, CLUSTER_DOMAIN};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};

/// The label naming a pod's workload, as the local mesh sets it.
pub const WORKLOAD_LABEL: &str = "isthmus.io/workload";
/// The label EndpointSlices name their Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Service annotation that limits which namespaces see it (Istio's: comma-separated,
/// the values of `exportTo`).
pub const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";

/// One Service's line of the registry and who may see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryEntry {
    pub namespace: String,
    pub name: String,
    /// From [`EXPORT_TO_ANNOTATION`]; empty means everyone.
    pub export_to: Vec<String>,
    /// The `ServiceEntry` as one line of JSON, with its newline.
    pub line: String,
}

/// The registry file: one `ServiceEntry` JSON document per line (a JSON stream, the sidecar's
/// fast path), sorted by namespace and name so that equal inputs give equal bytes — the
/// content hash, and so the version every sidecar reports, depends on the inputs only.
pub fn registry_json(services: &[&Service], slices: &[&EndpointSlice], pods: &[&Pod]) -> String {
    registry_entries(services, slices, pods)
        .iter()
        .map(|e| e.line.as_str())
        .collect()
}

/// The registry `consumer`'s sidecars get: the entries exported to it, in the same order.
pub fn registry_for(entries: &[RegistryEntry], consumer: &str) -> String {
    entries
        .iter()
        .filter(|e| super::desired::visible(&e.export_to, &e.namespace, consumer))
        .map(|e| e.line.as_str())
        .collect()
}

/// Every Service's registry entry, sorted by namespace and name; each is serialised once and
/// shared by every namespace that sees it.
pub fn registry_entries(
    services: &[&Service],
    slices: &[&EndpointSlice],
    pods: &[&Pod],
) -> Vec<RegistryEntry> {
    let pods: HashMap<(&str, &str), &Pod> = pods
        .iter()
        .filter_map(|p| {
            Some((
                (
                    p.metadata.namespace.as_deref()?,
                    p.metadata.name.as_deref()?,
                ),
                *p,
            ))
        })
        .collect();
    let mut slices_of: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
        if let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            slices_of.entry((ns, svc.as_str())).or_default().push(slice);
        }
    }
    let mut entries: BTreeMap<(&str, &str), RegistryEntry> = BTreeMap::new();
    for service in services {
        let (Some(ns), Some(name)) = (
            service.metadata.namespace.as_deref(),
            service.metadata.name.as_deref(),
        ) else {
            continue;
        };
        let slices = slices_of.get(&(ns, name)).map(Vec::as_slice).unwrap_or(&[]);
        if let Some(entry) = service_entry(service, ns, name, slices, &pods) {
            let export_to = service
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(EXPORT_TO_ANNOTATION))
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            entries.insert(
                (ns, name),
                RegistryEntry {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                    export_to,
                    line: format!("{entry}\n"),
                },
            );
        }
    }
    entries.into_values().collect()
}

fn service_entry(
    service: &Service,
    ns: &str,
    name: &str,
    slices: &[&EndpointSlice],
    pods: &HashMap<(&str, &str), &Pod>,
) -> Option<Value> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return external_name(spec, ns, name);
    }
    let addresses: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .map(String::as_str)
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .fold(Vec::new(), |mut v, ip| {
            if !v.contains(&ip) {
                v.push(ip);
            }
            v
        });
    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten().filter(|p| is_tcp(&p.protocol)) {
        let Some(mut p) = entry_port(port) else {
            continue;
        };
        if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(target)) =
            port.target_port
        {
            if target > 0 {
                p["targetPort"] = json!(target);
            }
        }
        ports.push(p);
    }
    if ports.is_empty() && spec.ports.iter().flatten().next().is_some() {
        // UDP/SCTP only: nothing the sidecar captures.
        return None;
    }
    let mut endpoints: BTreeMap<String, Value> = BTreeMap::new();
    for slice in slices {
        if slice.address_type == "FQDN" {
            continue;
        }
        // Named and numbered target ports resolve per slice: the slice's port of the same name.
        let slice_ports: BTreeMap<String, i32> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| is_tcp(&p.protocol))
            .filter_map(|p| {
                let number = p.port?;
                let service_port = spec.ports.iter().flatten().find(|sp| {
                    is_tcp(&sp.protocol)
                        && sp.name.as_deref().unwrap_or_default()
                            == p.name.as_deref().unwrap_or_default()
                })?;
                let number_u16 = u16::try_from(service_port.port).ok()?;
                Some((port_name(service_port.name.as_deref(), number_u16), number))
            })
            .collect();
        for endpoint in &slice.endpoints {
            // `ready` unset means ready (the EndpointSlice API's rule).
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            let pod = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    let pod_ns = r.namespace.as_deref().unwrap_or(ns);
                    pods.get(&(pod_ns, r.name.as_deref()?))
                });
            for address in &endpoint.addresses {
                let mut e = json!({"address": address});
                if !slice_ports.is_empty() {
                    e["ports"] = json!(slice_ports);
                }
                if let Some(pod) = pod {
                    let mut labels: BTreeMap<String, String> =
                        pod.metadata.labels.clone().unwrap_or_default();
                    labels.insert(WORKLOAD_LABEL.into(), workload_name(pod));
                    e["labels"] = json!(labels);
                    if let Some(sa) = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.as_deref())
                    {
                        e["serviceAccount"] = json!(sa);
                    }
                }
                endpoints.insert(address.clone(), e);
            }
        }
    }
    Some(document(
        ns,
        name,
        json!({
            "addresses": addresses,
            "ports": ports,
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "endpoints": endpoints.into_values().collect::<Vec<_>>(),
        }),
    ))
}

/// A Service's `ServiceEntry`: `spec` plus the host every Service has.
fn document(ns: &str, name: &str, mut spec: Value) -> Value {
    spec["hosts"] = json!([format!("{name}.{ns}.{CLUSTER_DOMAIN}")]);
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

/// Only TCP ports go into the registry: the sidecar captures TCP alone, and a port number a
/// Service serves over both TCP and UDP (kube-dns's 53) would otherwise be listed twice, which
/// the sidecar rejects — with kube-dns in every namespace's registry, every sidecar's config.
fn is_tcp(protocol: &Option<String>) -> bool {
    protocol.as_deref().is_none_or(|p| p == "TCP")
}

/// A Service port as a `ServiceEntry` port: number, name and protocol (`None`: out of range).
fn entry_port(port: &k8s_openapi::api::core::v1::ServicePort) -> Option<Value> {
    let number = u16::try_from(port.port).ok()?;
    let name = port_name(port.name.as_deref(), number);
    let mut p = json!({"number": number, "name": name});
    if let Some(protocol) = protocol(port.app_protocol.as_deref(), &name, &port.protocol) {
        p["protocol"] = json!(protocol);
    }
    Some(p)
}

/// An `ExternalName` Service as Istio programs it: the Service's host resolved by DNS to the
/// external name (a CNAME for the app, an endpoint name for the sidecar), on the Service's
/// ports, outside the mesh. No address: the app connects to whatever the name resolves to,
/// which the sidecar matches by port.
fn external_name(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    ns: &str,
    name: &str,
) -> Option<Value> {
    let external = spec.external_name.as_deref()?.trim_end_matches('.');
    if external.is_empty() {
        return None;
    }
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| is_tcp(&p.protocol))
        .filter_map(entry_port)
        .collect();
    Some(document(
        ns,
        name,
        json!({
            "ports": ports,
            "location": "MESH_EXTERNAL",
            "resolution": "DNS",
            "endpoints": [{"address": external}],
        }),
    ))
}

/// A ServiceEntry port needs a name; a Service's single port may have none.
fn port_name(name: Option<&str>, number: u16) -> String {
    match name {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => format!("port-{number}"),
    }
}

/// Istio's protocol selection: `appProtocol` first, then the port name's prefix; UDP/SCTP ports
/// are not proxied and declared as TCP would be wrong, so they get none (detected, never used).
fn protocol(
    app_protocol: Option<&str>,
    name: &str,
    transport: &Option<String>,
) -> Option<&'static str> {
    if transport.as_deref().is_some_and(|t| t != "TCP") {
        return None;
    }
    let parsed = match app_protocol {
        Some("kubernetes.io/h2c") => Some(Protocol::Http2),
        Some("kubernetes.io/ws") => Some(Protocol::Http),
        Some("kubernetes.io/wss") => Some(Protocol::Https),
        Some(p) => Protocol::parse(p),
        None => None,
    }
    .or_else(|| Protocol::from_port_name(name))?;
    Some(parsed.as_str())
}

/// The pod's workload as Istio names it: a Deployment's pods (owned by a ReplicaSet named
/// `<deployment>-<pod-template-hash>`) by the Deployment, a CronJob's (owned by a Job named
/// `<cronjob>-<scheduled time>`) by the CronJob, other pods by their controller, bare pods by
/// their own name.
pub fn workload_name(pod: &Pod) -> String {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let Some(owner) = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return name;
    };
    let hash = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    match (owner.kind.as_str(), hash) {
        ("ReplicaSet", Some(hash)) => owner
            .name
            .strip_suffix(hash.as_str())
            .and_then(|n| n.strip_suffix('-'))
            .unwrap_or(&owner.name)
            .to_owned(),
        ("Job", _) => match owner.name.rsplit_once('-') {
            // Istio's rule: a CronJob names its Jobs `<cronjob>-<8 to 10 digits>`.
            Some((cron, stamp))
                if (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cron.to_owned()
            }
            _ => owner.name.clone(),
        },
        _ => owner.name.clone(),
    }
}

#[cfg(test)]
mod tests;
