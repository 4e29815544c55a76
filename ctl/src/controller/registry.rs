//! The desired registry as a pure function of what the watchers hold: one `ServiceEntry` per
//! Service (hosts `<name>.<ns>.svc.cluster.local`, the cluster IPs, the ports with their
//! protocol, `resolution: STATIC`) whose endpoints are the ready addresses of the Service's
//! EndpointSlices, labelled with their pod's labels, `isthmus.io/workload` and service account.
//! No I/O here: the controller feeds it the reflector stores' contents, the tests feed it
//! literals.

use std::collections::{BTreeMap, HashMap};

use isthmus_config::{Protocol, CLUSTER_DOMAIN};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};

/// The label naming a pod's workload, as the local mesh sets it.
pub const WORKLOAD_LABEL: &str = "isthmus.io/workload";
/// The label EndpointSlices name their Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The registry file: one `ServiceEntry` JSON document per line (a JSON stream, the sidecar's
/// fast path), sorted by namespace and name so that equal inputs give equal bytes — the
/// content hash, and so the version every sidecar reports, depends on the inputs only.
pub fn registry_json(services: &[&Service], slices: &[&EndpointSlice], pods: &[&Pod]) -> String {
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
    let mut entries: BTreeMap<(&str, &str), Value> = BTreeMap::new();
    for service in services {
        let (Some(ns), Some(name)) = (
            service.metadata.namespace.as_deref(),
            service.metadata.name.as_deref(),
        ) else {
            continue;
        };
        let slices = slices_of.get(&(ns, name)).map(Vec::as_slice).unwrap_or(&[]);
        if let Some(entry) = service_entry(service, ns, name, slices, &pods) {
            entries.insert((ns, name), entry);
        }
    }
    let mut out = String::new();
    for entry in entries.values() {
        out.push_str(&entry.to_string());
        out.push('\n');
    }
    out
}

fn service_entry(
    service: &Service,
    ns: &str,
    name: &str,
    slices: &[&EndpointSlice],
    pods: &HashMap<(&str, &str), &Pod>,
) -> Option<Value> {
    let spec = service.spec.as_ref()?;
    // ExternalName services resolve by DNS: a later slice (resolution DNS).
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
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
    for port in spec.ports.iter().flatten() {
        let Ok(number) = u16::try_from(port.port) else {
            continue;
        };
        let port_name = port_name(port.name.as_deref(), number);
        let mut p = json!({"number": number, "name": port_name});
        if let Some(protocol) = protocol(port.app_protocol.as_deref(), &port_name, &port.protocol) {
            p["protocol"] = json!(protocol);
        }
        if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(target)) =
            port.target_port
        {
            if target > 0 {
                p["targetPort"] = json!(target);
            }
        }
        ports.push(p);
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
            .filter_map(|p| {
                let number = p.port?;
                let service_port = spec.ports.iter().flatten().find(|sp| {
                    sp.name.as_deref().unwrap_or_default() == p.name.as_deref().unwrap_or_default()
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
    Some(json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "hosts": [format!("{name}.{ns}.{CLUSTER_DOMAIN}")],
            "addresses": addresses,
            "ports": ports,
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "endpoints": endpoints.into_values().collect::<Vec<_>>(),
        },
    }))
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
