//! The controller's writes: one namespace's routing ConfigMap (routing config and the mesh's
//! trust bundle) and registry ConfigMaps by server-side
//! apply (field manager `isthmus-controller`), each only when its content hash changed, and the
//! deletion of managed ConfigMaps in namespaces that left the mesh.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use isthmus_config::source::version_of;
use isthmus_config::SourceFile;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams};

use super::{
    ConfigMapLabels, Controller, ResultLabel, Written, FIELD_MANAGER, MANAGED_BY_LABEL,
    ROUTING_HASH_ANNOTATION,
};

/// What one namespace's sidecars should see.
pub(super) struct NamespaceFiles {
    /// `config.json`; `None` when there is none to write (the assembled config did not
    /// compile and nothing was written before).
    pub routing: Option<SourceFile>,
    /// The registry's shard files (`registry.json`, `registry-1.json`, …: shards.rs).
    pub registry: Vec<SourceFile>,
    /// `trust-bundle.pem`: the mesh CA's roots, beside `config.json` in the routing ConfigMap
    /// (the sidecar's `--ca-root` default); `None` when this controller runs no CA.
    pub trust_bundle: Option<SourceFile>,
}

impl NamespaceFiles {
    /// The hashes that decide what to write, and the version the sidecars will report: over
    /// every file of the projected volume, as the sidecar hashes its directory.
    pub(super) fn written(&self) -> Written {
        let routing = self.routing_files();
        let mut files = routing.clone();
        files.extend(self.registry.iter().cloned());
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Written {
            routing_hash: (!routing.is_empty()).then(|| version_of(&routing)),
            registry_hash: version_of(&self.registry),
            version: version_of(&files),
        }
    }

    /// The routing ConfigMap's files, by name.
    fn routing_files(&self) -> Vec<SourceFile> {
        let mut files: Vec<SourceFile> = self.routing.iter().cloned().collect();
        files.extend(self.trust_bundle.iter().cloned());
        files.sort_by(|a, b| a.name.cmp(&b.name));
        files
    }
}

impl Controller {
    /// Writes what changed of one namespace's ConfigMaps: routing first, then the registry,
    /// whose version annotation announces both. Returns what is now there.
    pub(super) async fn write_namespace(
        &self,
        ns: &str,
        files: &NamespaceFiles,
        previous: Option<&Written>,
    ) -> Result<Written, kube::Error> {
        let desired = files.written();
        if let Some(hash) = &desired.routing_hash {
            if previous.and_then(|p| p.routing_hash.as_ref()) != Some(hash) {
                self.apply_config_map(
                    ns,
                    &self.options.routing_config_map,
                    files
                        .routing_files()
                        .into_iter()
                        .map(|f| (f.name, f.text))
                        .collect(),
                    BTreeMap::from([(ROUTING_HASH_ANNOTATION.to_owned(), hash.clone())]),
                )
                .await?;
            }
        }
        if previous.is_some_and(|p| {
            p.registry_hash == desired.registry_hash && p.version == desired.version
        }) {
            return Ok(desired);
        }
        // Without a memory of what was written (start, resync) the data there is checked too.
        self.write_registry(ns, &files.registry, &desired.version, previous.is_none())
            .await?;
        Ok(desired)
    }

    /// Writes one ConfigMap with server-side apply — unless what is there already holds the
    /// desired data and annotations (a restarted controller rewrites nothing; a hand edit of
    /// the data that left the hash annotation is repaired — found in review).
    pub(super) async fn apply_config_map(
        &self,
        ns: &str,
        name: &str,
        data: BTreeMap<String, String>,
        annotations: BTreeMap<String, String>,
    ) -> Result<(), kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let current = api.get_opt(name).await?;
        let current_annotations = current
            .as_ref()
            .and_then(|cm| cm.metadata.annotations.as_ref());
        let bytes = data.values().map(String::len).sum::<usize>() as i64;
        let labels = ConfigMapLabels {
            namespace: ns.to_owned(),
            configmap: name.to_owned(),
        };
        let metrics = &self.status.metrics;
        // Our keys only: a key someone else added is theirs under server-side apply.
        let there = current.as_ref().and_then(|cm| cm.data.as_ref());
        let data_there = data
            .iter()
            .all(|(k, v)| there.and_then(|d| d.get(k)) == Some(v));
        if data_there
            && annotations
                .iter()
                .all(|(k, v)| current_annotations.and_then(|a| a.get(k)) == Some(v))
        {
            metrics.configmap_bytes.get_or_create(&labels).set(bytes);
            return Ok(());
        }
        let config_map = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(ns.to_owned()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_owned(),
                    FIELD_MANAGER.to_owned(),
                )])),
                annotations: Some(annotations.clone()),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..ConfigMap::default()
        };
        let result = api
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&config_map),
            )
            .await;
        metrics
            .writes
            .get_or_create(&ResultLabel {
                result: if result.is_ok() { "ok" } else { "error" },
            })
            .inc();
        result?;
        self.status.writes.fetch_add(1, Ordering::AcqRel);
        metrics.configmap_bytes.get_or_create(&labels).set(bytes);
        tracing::info!(namespace = %ns, configmap = %name, ?annotations, bytes, "ConfigMap written");
        Ok(())
    }

    /// Deletes a ConfigMap this controller manages (the caller checked the label).
    pub(super) async fn delete_config_map(&self, ns: &str, name: &str) -> Result<(), kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
        self.status
            .metrics
            .configmap_bytes
            .remove(&ConfigMapLabels {
                namespace: ns.to_owned(),
                configmap: name.to_owned(),
            });
        tracing::info!(namespace = %ns, configmap = %name, "namespace left the mesh: managed ConfigMap deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
