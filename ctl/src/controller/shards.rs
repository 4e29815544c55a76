//! Writing one namespace's registry as its shard ConfigMaps ([`super::split`]): each shard by
//! server-side apply only when its content changed, in an order that never leaves a service out
//! of the directory the kubelet projects, and the shards past the split deleted.
//!
//! While shards are written one by one, the kubelet may project any mix of old and new ones.
//! A service that moves between shards (only when the shard count changes) is therefore added
//! to its new shard before it is removed from its old one: new shards first, then the shards
//! that lose services, shard 0 (which carries the version) last, deletions after. A mix may
//! then hold a service twice — the sidecar rejects that config and keeps serving its last one
//! until the next sync — but never lacks one.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use isthmus_config::source::version_of;
use isthmus_config::SourceFile;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};
use kube::core::PartialObjectMeta;

use super::scope::{Scope, SidecarEgress};
use super::split::{self, Entry};
use super::{
    ConfigMapLabels, Controller, ResultLabel, FIELD_MANAGER, MANAGED_BY_LABEL,
    REGISTRY_HASH_ANNOTATION, VERSION_ANNOTATION,
};

/// On shard 0: how many shards the registry spans (also the next split's starting count, so a
/// restarted controller keeps the split it finds).
pub const SHARDS_ANNOTATION: &str = "isthmus.io/registry-shards";

/// What a write did, for metrics and logs.
#[derive(Debug, Default)]
pub struct Report {
    /// ConfigMaps applied, with their data size.
    pub applied: Vec<(String, usize)>,
    /// ConfigMaps found current, with their data size.
    pub current: Vec<(String, usize)>,
    pub deleted: Vec<String>,
}

/// The shard count last written to a namespace, from shard 0's annotation among the managed
/// ConfigMaps the controller watches (their metadata only).
pub fn previous_shards(
    managed: &[Arc<PartialObjectMeta<ConfigMap>>],
    ns: &str,
    base: &str,
) -> Option<usize> {
    managed
        .iter()
        .find(|cm| {
            cm.metadata.namespace.as_deref() == Some(ns)
                && cm.metadata.name.as_deref() == Some(base)
        })
        .and_then(|cm| {
            cm.metadata
                .annotations
                .as_ref()?
                .get(SHARDS_ANNOTATION)?
                .parse()
                .ok()
        })
}

/// Writes the shard `files` (`registry.json`, `registry-1.json`, …) into namespace `api`'s
/// shard ConfigMaps named after `base`, shard 0 annotated with `version`. Reads first what is
/// there (metadata only), so a restarted controller rewrites nothing that is current. With
/// `verify_data` (start and resync) a shard whose annotations match is also read whole and
/// rewritten if its data differs: a hand edit that left the hash annotation is repaired (found
/// in review: "current" was judged by the annotation alone).
pub async fn write(
    api: &Api<ConfigMap>,
    base: &str,
    files: &[SourceFile],
    version: &str,
    verify_data: bool,
) -> Result<Report, kube::Error> {
    let present = present(api, base).await?;
    let shards = files.len();
    let mut report = Report::default();
    let hash_of = |file: &SourceFile| version_of(std::slice::from_ref(file));
    for k in write_order(|k| present.contains_key(&k), shards) {
        let file = &files[k];
        let name = split::shard_config_map(base, k);
        let mut annotations =
            BTreeMap::from([(REGISTRY_HASH_ANNOTATION.to_owned(), hash_of(file))]);
        if k == 0 {
            annotations.insert(VERSION_ANNOTATION.to_owned(), version.to_owned());
            annotations.insert(SHARDS_ANNOTATION.to_owned(), shards.to_string());
        }
        let mut current = present
            .get(&k)
            .is_some_and(|have| annotations.iter().all(|(key, v)| have.get(key) == Some(v)));
        if current && verify_data {
            let data = api.get_opt(&name).await?.and_then(|cm| cm.data);
            current = data.as_ref().and_then(|d| d.get(&file.name)) == Some(&file.text);
        }
        if current {
            report.current.push((name, file.text.len()));
            continue;
        }
        let config_map = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: api.namespace().map(str::to_owned),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_owned(),
                    FIELD_MANAGER.to_owned(),
                )])),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(file.name.clone(), file.text.clone())])),
            ..ConfigMap::default()
        };
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&config_map),
        )
        .await?;
        report.applied.push((name, file.text.len()));
    }
    let mut stale: Vec<usize> = present.keys().copied().filter(|k| *k >= shards).collect();
    stale.sort_unstable();
    for k in &stale {
        let name = split::shard_config_map(base, *k);
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => report.deleted.push(name),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// The order shards are applied in (module docs): the new ones first, then those that exist
/// (they may lose services to the new ones), shard 0 — which carries the version — last.
fn write_order(exists: impl Fn(usize) -> bool, shards: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (1..shards).filter(|k| !exists(*k)).collect();
    order.extend((1..shards).filter(|k| exists(*k)));
    order.push(0);
    order
}

/// The namespace's shard ConfigMaps that exist, by shard number, with their annotations
/// (metadata only: the data of up to 16 MiB of shards stays on the server).
async fn present(
    api: &Api<ConfigMap>,
    base: &str,
) -> Result<HashMap<usize, BTreeMap<String, String>>, kube::Error> {
    let selector = format!("{MANAGED_BY_LABEL}={FIELD_MANAGER}");
    let list = api
        .list_metadata(&ListParams::default().labels(&selector))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|cm| {
            let k = split::shard_of(base, cm.metadata.name.as_deref()?)?;
            Some((k, cm.metadata.annotations.unwrap_or_default()))
        })
        .collect())
}

impl Controller {
    /// The scope of namespace `ns` ([`Scope::of`]); egress hosts that do not parse are logged.
    pub(super) fn scope(&self, ns: &str, sidecars: &[SidecarEgress]) -> Scope {
        let (scope, bad_hosts) = Scope::of(ns, &self.options.root_namespace, sidecars);
        for e in &bad_hosts {
            tracing::warn!(namespace = %ns, error = %e, "an egress host of a Sidecar that applies here is ignored");
        }
        scope
    }

    /// The registry files of namespace `ns`: the `visible` entries in its `scope`, split into
    /// shards. `None` when they do not fit (logged and counted: the namespace keeps its last
    /// registry).
    pub(super) fn registry_shards<'e, 'a: 'e>(
        &self,
        ns: &str,
        visible: impl Iterator<Item = &'e Entry<'a>>,
        scope: &Scope,
        previous: Option<usize>,
    ) -> Option<Vec<SourceFile>> {
        let in_scope = visible.filter(|e| e.in_scope(scope));
        match split::split(in_scope, self.options.max_registry_bytes, previous) {
            Ok(split) => Some(split.files),
            Err(e) => {
                self.status
                    .metrics
                    .writes
                    .get_or_create(&ResultLabel {
                        result: "too_large",
                    })
                    .inc();
                tracing::error!(namespace = %ns, error = %e, "registry not written: the namespace keeps its last one");
                None
            }
        }
    }

    /// Writes namespace `ns`'s registry shards ([`write`]) and records what was written.
    pub(super) async fn write_registry(
        &self,
        ns: &str,
        files: &[SourceFile],
        version: &str,
        verify_data: bool,
    ) -> Result<(), kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let base = &self.options.registry_config_map;
        let result = write(&api, base, files, version, verify_data).await;
        let metrics = &self.status.metrics;
        let labels = |name: &str| ConfigMapLabels {
            namespace: ns.to_owned(),
            configmap: name.to_owned(),
        };
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                metrics
                    .writes
                    .get_or_create(&ResultLabel { result: "error" })
                    .inc();
                return Err(e);
            }
        };
        for (name, bytes) in report.applied.iter().chain(&report.current) {
            metrics
                .configmap_bytes
                .get_or_create(&labels(name))
                .set(*bytes as i64);
        }
        for name in &report.deleted {
            metrics.configmap_bytes.remove(&labels(name));
        }
        metrics
            .writes
            .get_or_create(&ResultLabel { result: "ok" })
            .inc_by(report.applied.len() as u64);
        self.status
            .writes
            .fetch_add(report.applied.len() as u64, Ordering::AcqRel);
        if !report.applied.is_empty() || !report.deleted.is_empty() {
            tracing::info!(namespace = %ns, version, shards = files.len(), applied = ?report.applied,
                deleted = ?report.deleted, "registry written");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::write_order;

    #[test]
    fn new_shards_are_written_before_the_ones_they_take_services_from() {
        // First write: everything is new; shard 0 (the version) last.
        assert_eq!(write_order(|_| false, 4), [1, 2, 3, 0]);
        // 2 → 4 shards: 2 and 3 receive services from 0 and 1 before those lose them.
        assert_eq!(write_order(|k| k < 2, 4), [2, 3, 1, 0]);
        // 4 → 2: the remaining shards receive first; 2 and 3 are deleted afterwards.
        assert_eq!(write_order(|k| k < 4, 2), [1, 0]);
        assert_eq!(write_order(|_| true, 1), [0]);
    }
}
