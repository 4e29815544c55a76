//! `isthmus-ctl proxy-status`: for every meshed pod, the config version its sidecar serves
//! against the version the controller wrote for its namespace — the propagation view.
//!
//! Both sides are read through the API server, so it works wherever `kubectl` does: the written
//! version is the `isthmus.io/config-version` annotation of the namespace's registry ConfigMap;
//! the served one is `isthmus_config_version{version="…"} 1` in the sidecar's Prometheus text,
//! fetched through the pods/proxy subresource (`…/pods/NAME:15020/proxy/stats/prometheus`), the
//! way `kubectl get --raw` would — no port-forward, no network path to the pods needed.
//!
//! The decision per pod ([`SyncState::of`]), the metric parsing ([`served_version`]) and the
//! table ([`render`]) are pure; [`collect`] does the I/O, a bounded number of pods at a time,
//! each with its own deadline, so one hung sidecar costs one timeout, not the whole run. Give
//! it a client without kube-rs's default retries (`Config::default_retry = false`): they retry
//! a 503, which from pods/proxy is the answer ("error trying to reach service"), for minutes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::controller::VERSION_ANNOTATION;
use crate::inject::STATUS_ANNOTATION;

/// The sidecar's Prometheus port and path (README, "Ports").
pub const METRICS_PORT: u16 = 15020;
pub const METRICS_PATH: &str = "/stats/prometheus";
/// The gauge the sidecar sets to 1 for the version it has loaded.
const VERSION_METRIC: &str = "isthmus_config_version";

/// Which pods to look at and how patiently.
#[derive(Debug, Clone)]
pub struct Options {
    /// One namespace, or `None` for all.
    pub namespace: Option<String>,
    /// The ConfigMap carrying the written version (the controller's registry).
    pub registry_config_map: String,
    /// Sidecars asked at the same time.
    pub concurrency: usize,
    /// How long one sidecar may take to answer before it counts as unreachable.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            namespace: None,
            registry_config_map: "isthmus-registry".into(),
            concurrency: 16,
            timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyStatusError {
    #[error("listing pods{}: {source} (is the API server reachable, and may you list pods there?)", scope(.namespace))]
    ListPods {
        namespace: Option<String>,
        source: kube::Error,
    },
    #[error("reading ConfigMap {namespace}/{name}: {source} (may you get configmaps there?)")]
    ReadConfigMap {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

fn scope(namespace: &Option<String>) -> String {
    namespace
        .as_deref()
        .map(|ns| format!(" in {ns}"))
        .unwrap_or_default()
}

/// Why a pod counts as not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// Its `Ready` condition is not `True` (starting, failing a probe, terminating).
    Pod,
    /// Its sidecar did not answer through the API server: the reason, as the API server or
    /// the timeout put it.
    Unreachable(String),
    /// The sidecar answered but reports no loaded config (it is still failing closed).
    NoVersion,
}

/// A pod's propagation state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncState {
    /// Serves exactly what the controller last wrote for its namespace.
    Synced,
    /// Serves another version: the kubelet has not synced the volume yet, or the sidecar
    /// rejected the new config (its `/config_dump` says why).
    Stale,
    NotReady(NotReady),
    /// The controller has written nothing for the namespace yet.
    NoConfig,
}

impl SyncState {
    /// The state of a pod from what was observed: its readiness, what its sidecar answered
    /// (its served version, or why there is none) and the namespace's written version.
    pub fn of(
        pod_ready: bool,
        served: &Result<Option<String>, String>,
        written: Option<&str>,
    ) -> SyncState {
        if !pod_ready {
            return SyncState::NotReady(NotReady::Pod);
        }
        let served = match served {
            Err(reason) => return SyncState::NotReady(NotReady::Unreachable(reason.clone())),
            Ok(None) => return SyncState::NotReady(NotReady::NoVersion),
            Ok(Some(served)) => served,
        };
        match written {
            None => SyncState::NoConfig,
            Some(written) if written == served => SyncState::Synced,
            Some(_) => SyncState::Stale,
        }
    }
}

impl fmt::Display for SyncState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncState::Synced => f.write_str("SYNCED"),
            SyncState::Stale => f.write_str("STALE"),
            SyncState::NoConfig => f.write_str("NO CONFIG"),
            SyncState::NotReady(NotReady::Pod) => f.write_str("NOT READY (pod not ready)"),
            SyncState::NotReady(NotReady::NoVersion) => {
                f.write_str("NOT READY (sidecar has no config loaded)")
            }
            SyncState::NotReady(NotReady::Unreachable(reason)) => {
                write!(f, "NOT READY (sidecar unreachable: {reason})")
            }
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub name: String,
    pub namespace: String,
    pub served: Option<String>,
    pub written: Option<String>,
    pub state: SyncState,
}

/// The version in `isthmus_config_version{version="…"} 1`, if the sidecar has one loaded.
pub fn served_version(metrics: &str) -> Option<String> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(VERSION_METRIC)?.strip_prefix("{")?;
        let (labels, value) = rest.rsplit_once('}')?;
        if value.trim().parse::<f64>().ok()? != 1.0 {
            return None;
        }
        labels.split(',').find_map(|label| {
            let value = label.trim().strip_prefix("version=\"")?;
            value.strip_suffix('"').map(str::to_owned)
        })
    })
}

/// The table, `istioctl proxy-status` style: NAME, NAMESPACE, SERVED, WRITTEN, STATUS.
pub fn render(rows: &[Row]) -> String {
    let header = ["NAME", "NAMESPACE", "SERVED", "WRITTEN", "STATUS"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|row| {
            [
                row.name.clone(),
                row.namespace.clone(),
                row.served.clone().unwrap_or_else(|| "-".into()),
                row.written.clone().unwrap_or_else(|| "-".into()),
                row.state.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for line in &cells {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let header = header.map(str::to_owned);
    for line in std::iter::once(&header).chain(&cells) {
        let mut text = String::new();
        for (i, (cell, width)) in line.iter().zip(widths).enumerate() {
            if i + 1 == line.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}   "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

/// `N pods: 2 SYNCED, 1 STALE` — and what each served version counts, so a rollout shows
/// how many pods run which version.
pub fn summary(rows: &[Row]) -> String {
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    let mut versions: BTreeMap<&str, usize> = BTreeMap::new();
    for row in rows {
        let state = match row.state {
            SyncState::Synced => "SYNCED",
            SyncState::Stale => "STALE",
            SyncState::NotReady(_) => "NOT READY",
            SyncState::NoConfig => "NO CONFIG",
        };
        *states.entry(state).or_default() += 1;
        if let Some(served) = &row.served {
            *versions.entry(served).or_default() += 1;
        }
    }
    let join = |counts: BTreeMap<&str, usize>| {
        counts
            .iter()
            .map(|(what, n)| format!("{n} {what}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = format!("{} meshed pod(s)", rows.len());
    if !rows.is_empty() {
        out.push_str(&format!(": {}", join(states)));
    }
    if !versions.is_empty() {
        out.push_str(&format!("; serving: {}", join(versions)));
    }
    out
}

/// True when every pod is SYNCED (what `--check` asks).
pub fn all_synced(rows: &[Row]) -> bool {
    rows.iter().all(|row| row.state == SyncState::Synced)
}

/// Lists the meshed pods, reads each namespace's written version and asks every sidecar,
/// at most `concurrency` at a time. Rows are sorted by namespace, then name.
pub async fn collect(client: &Client, options: &Options) -> Result<Vec<Row>, ProxyStatusError> {
    let pods: Api<Pod> = match &options.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let meshed: Vec<Pod> = pods
        .list(&ListParams::default())
        .await
        .map_err(|source| ProxyStatusError::ListPods {
            namespace: options.namespace.clone(),
            source,
        })?
        .items
        .into_iter()
        .filter(|pod| pod.annotations().contains_key(STATUS_ANNOTATION))
        .collect();

    let namespaces: BTreeSet<String> = meshed.iter().filter_map(|pod| pod.namespace()).collect();
    let written: BTreeMap<String, Option<String>> = futures_util::stream::iter(namespaces)
        .map(|ns| async move {
            let version = written_version(client, &ns, &options.registry_config_map).await?;
            Ok::<_, ProxyStatusError>((ns, version))
        })
        .buffer_unordered(options.concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;

    let mut rows: Vec<Row> = futures_util::stream::iter(meshed)
        .map(|pod| {
            let namespace = pod.namespace().unwrap_or_default();
            let written = written.get(&namespace).cloned().flatten();
            async move {
                let served = ask_sidecar(client, &pod, options.timeout).await;
                Row {
                    state: SyncState::of(pod_ready(&pod), &served, written.as_deref()),
                    name: pod.name_any(),
                    namespace,
                    served: served.ok().flatten(),
                    written,
                }
            }
        })
        .buffer_unordered(options.concurrency.max(1))
        .collect()
        .await;
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(rows)
}

/// The version the controller wrote for `namespace`; `None` when there is no registry
/// ConfigMap (or it has no version yet).
async fn written_version(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<String>, ProxyStatusError> {
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let config_map =
        config_maps
            .get_opt(name)
            .await
            .map_err(|source| ProxyStatusError::ReadConfigMap {
                namespace: namespace.into(),
                name: name.into(),
                source,
            })?;
    Ok(config_map.and_then(|cm| cm.annotations().get(VERSION_ANNOTATION).cloned()))
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// The sidecar's served version through the API server's pod proxy; `Err` says why it could
/// not be asked. A pod without an address is not asked (there is nothing to reach yet).
async fn ask_sidecar(
    client: &Client,
    pod: &Pod,
    timeout: Duration,
) -> Result<Option<String>, String> {
    let has_ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .is_some_and(|ip| !ip.is_empty());
    if !has_ip {
        return Err("no pod IP yet".into());
    }
    let path = format!(
        "/api/v1/namespaces/{}/pods/{}:{METRICS_PORT}/proxy{METRICS_PATH}",
        pod.namespace().unwrap_or_default(),
        pod.name_any()
    );
    let request = http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, client.request_text(request)).await {
        Err(_) => Err(format!("no answer within {}s", timeout.as_secs_f64())),
        Ok(Err(kube::Error::Api(status))) => Err(status.message),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(metrics)) => Ok(served_version(&metrics)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_version_is_the_gauge_set_to_one() {
        let text = "# HELP isthmus_config_version The loaded config.\n\
                    # TYPE isthmus_config_version gauge\n\
                    isthmus_config_reloads_total{result=\"success\"} 3\n\
                    isthmus_config_version{version=\"0a1b2c\"} 1\n";
        assert_eq!(served_version(text).as_deref(), Some("0a1b2c"));
        assert_eq!(
            served_version("isthmus_config_version{version=\"old\"} 0\n"),
            None
        );
        assert_eq!(served_version("isthmus_config_reloads_total 0\n"), None);
        // Another metric whose name starts the same is not the version.
        assert_eq!(
            served_version("isthmus_config_version_info{version=\"x\"} 1\n"),
            None
        );
    }

    #[test]
    fn state_compares_served_with_written_once_the_pod_is_ready_and_reachable() {
        let v = |s: &str| Ok(Some(s.to_owned()));
        assert_eq!(SyncState::of(true, &v("a"), Some("a")), SyncState::Synced);
        assert_eq!(SyncState::of(true, &v("a"), Some("b")), SyncState::Stale);
        assert_eq!(SyncState::of(true, &v("a"), None), SyncState::NoConfig);
        assert_eq!(
            SyncState::of(false, &v("a"), Some("a")),
            SyncState::NotReady(NotReady::Pod)
        );
        assert_eq!(
            SyncState::of(true, &Err("refused".into()), Some("a")),
            SyncState::NotReady(NotReady::Unreachable("refused".into()))
        );
        assert_eq!(
            SyncState::of(true, &Ok(None), Some("a")),
            SyncState::NotReady(NotReady::NoVersion)
        );
        assert_eq!(
            SyncState::NotReady(NotReady::Unreachable("refused".into())).to_string(),
            "NOT READY (sidecar unreachable: refused)"
        );
    }

    fn row(name: &str, served: Option<&str>, written: Option<&str>, state: SyncState) -> Row {
        Row {
            name: name.into(),
            namespace: "shop".into(),
            served: served.map(Into::into),
            written: written.map(Into::into),
            state,
        }
    }

    #[test]
    fn table_aligns_columns_and_summary_counts_states_and_versions() {
        let rows = [
            row("web-a", Some("v2"), Some("v2"), SyncState::Synced),
            row("web-bb", Some("v1"), Some("v2"), SyncState::Stale),
            row(
                "web-c",
                None,
                Some("v2"),
                SyncState::NotReady(NotReady::Pod),
            ),
        ];
        assert_eq!(
            render(&rows),
            "NAME     NAMESPACE   SERVED   WRITTEN   STATUS\n\
             web-a    shop        v2       v2        SYNCED\n\
             web-bb   shop        v1       v2        STALE\n\
             web-c    shop        -        v2        NOT READY (pod not ready)\n"
        );
        assert_eq!(
            summary(&rows),
            "3 meshed pod(s): 1 NOT READY, 1 STALE, 1 SYNCED; serving: 1 v1, 1 v2"
        );
        assert!(!all_synced(&rows));
        assert!(all_synced(&rows[..1]));
        assert_eq!(summary(&[]), "0 meshed pod(s)");
    }
}
