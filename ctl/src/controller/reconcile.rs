//! One reconcile: every meshed namespace's routing config and registry computed from the
//! stores (pure: [`desired`], [`registry`]) and written where they changed ([`write`]); managed
//! ConfigMaps of namespaces that left the mesh deleted; invalid Istio resources reported
//! ([`events`]). What it remembers between reconciles is [`Memory`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_config::{Issue, SourceFile};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::core::PartialObjectMeta;

use super::{
    desired, events, istio, registry, registry_check, scope, shards, split, state, write,
    Controller, ResourceKindLabel, ResultLabel, Stores, Written, FIELD_MANAGER, MANAGED_BY_LABEL,
    ROUTING_KEY,
};
use crate::inject::STATUS_ANNOTATION;

impl Controller {
    /// Computes every meshed namespace's routing config and registry and writes what changed;
    /// deletes the managed ConfigMaps of namespaces that left the mesh; reports invalid Istio
    /// resources. Returns false when a write failed (the reconcile is retried).
    pub(super) async fn reconcile(&self, stores: &Stores, written: &mut Memory) -> bool {
        let started = Instant::now();
        let metrics = &self.status.metrics;
        let services = state(&stores.services);
        let slices = state(&stores.slices);
        let pods = state(&stores.pods);
        let entries = registry::registry_entries(
            &services.iter().map(Arc::as_ref).collect::<Vec<_>>(),
            &slices.iter().map(Arc::as_ref).collect::<Vec<_>>(),
            &pods.iter().map(Arc::as_ref).collect::<Vec<_>>(),
        );
        // Entries a sidecar rejects never reach a registry; reported as invalid Services.
        let (entries, rejected) = written.entry_checks.check(entries);
        metrics.services.set(entries.len() as i64);
        metrics.endpoints.set(
            entries
                .iter()
                .map(|e| e.line.matches("\"address\":").count() as i64)
                .sum(),
        );
        let (objects, mut invalid) =
            istio::collect(&stores.istio, &state(&stores.istio_config_maps));
        let (objects, unparsable) = desired::parse_each(objects);
        invalid.extend(unparsable);
        invalid.extend(rejected);
        let managed = state(&stores.managed);
        let meshed = self.meshed(&pods);
        // Scoping and splitting (shards.rs): the Sidecars' egress hosts, each entry's shard key.
        let sidecars = scope::sidecars(objects.iter().map(|o| {
            let key = &o.key;
            (&*key.kind, &*key.namespace, &*key.name, &o.document["spec"])
        }));
        let shard_entries: Vec<split::Entry> = entries
            .iter()
            .map(|e| split::Entry::of_service(&e.namespace, &e.name, &e.line))
            .collect();

        let mut ok = true;
        let mut conflicts = 0;
        for ns in &meshed {
            if !self.leadership.is_leader() {
                // Lost the Lease mid-reconcile: stop writing at once.
                ok = false;
                break;
            }
            let scope = self.scope(ns, &sidecars);
            let visible = entries
                .iter()
                .zip(&shard_entries)
                .filter(|(e, _)| desired::visible(&e.export_to, &e.namespace, ns))
                .map(|(_, entry)| entry);
            let base = &self.options.registry_config_map;
            let previous = shards::previous_shards(&managed, ns, base);
            let Some(registry) = self.registry_shards(ns, visible, &scope, previous) else {
                continue;
            };
            let mut candidates = desired::candidates(&objects, ns, &self.options.root_namespace);
            candidates.retain(|o| {
                o.key.kind == "Sidecar"
                    || istio::is_security_kind(&o.key.kind)
                    || scope.admits_config(&o.key.namespace, &o.hosts())
            });
            let (fresh, assembled) = written.assemble(ns, &candidates, &registry);
            let routing = match assembled {
                Ok(assembled) => {
                    invalid.extend(assembled.left_out);
                    assembled.text
                }
                Err(issues) => {
                    conflicts += 1;
                    if fresh {
                        let first = issues.first().map(ToString::to_string).unwrap_or_default();
                        tracing::error!(namespace = %ns, problems = issues.len(), first = %first,
                            "the namespace's config does not load (a problem no Istio object is blamed for): keeping the last routing and registry written");
                    }
                    // Found in review: a new registry was written beside the last routing even
                    // when the set did not load; nothing a sidecar rejects is ever written.
                    continue;
                }
            };
            let files = write::NamespaceFiles {
                routing: Some(SourceFile::new(ROUTING_KEY, routing)),
                registry,
                trust_bundle: self.trust_bundle.clone(),
            };
            match self
                .write_namespace(ns, &files, written.written.get(ns))
                .await
            {
                Ok(now) => {
                    written.written.insert(ns.clone(), now);
                }
                Err(e) => {
                    ok = false;
                    tracing::warn!(namespace = %ns, error = %e, "writing the namespace's ConfigMaps failed; retrying (may the controller patch configmaps there?)");
                }
            }
        }
        if !self.leadership.is_leader() {
            // Lost the Lease: no deletions and no Events either — the new leader may have
            // just written what a stale view would collect (found in review).
            return false;
        }
        written.forget_unmeshed(&meshed);
        ok &= self.collect_garbage(&managed, &meshed, written).await;
        // An Event that cannot be written is tried again on the next reconcile; it does not
        // make this one fail (missing events permission must not keep the controller unready).
        written
            .reporter
            .report(&self.client, &self.options.instance, &invalid)
            .await;
        metrics.routing_conflicts.set(conflicts);
        let mut by_kind: BTreeMap<String, i64> = istio::KINDS
            .iter()
            .map(|(kind, _, _)| ((*kind).to_owned(), 0))
            .chain([(registry_check::SERVICE_KIND.to_owned(), 0)])
            .collect();
        for (key, _) in events::notes(&invalid).keys() {
            *by_kind.entry(key.kind.clone()).or_default() += 1;
        }
        for (kind, count) in by_kind {
            metrics
                .invalid_resources
                .get_or_create(&ResourceKindLabel { kind })
                .set(count);
        }

        self.status.reconciles.fetch_add(1, Ordering::AcqRel);
        metrics
            .reconciles
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        metrics.duration.observe(started.elapsed().as_secs_f64());
        ok
    }

    /// The meshed namespaces: the listed ones, or those holding an injected pod.
    fn meshed(&self, pods: &[Arc<Pod>]) -> BTreeSet<String> {
        if !self.options.namespaces.is_empty() {
            return self.options.namespaces.iter().cloned().collect();
        }
        pods.iter()
            .filter(|p| {
                p.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(STATUS_ANNOTATION))
            })
            .filter_map(|p| p.metadata.namespace.clone())
            .collect()
    }

    /// Deletes the managed ConfigMaps of namespaces out of the mesh for `gc_grace` (a rollout
    /// that replaces every pod must not lose its config). Returns false when a delete failed.
    async fn collect_garbage(
        &self,
        managed: &[Arc<PartialObjectMeta<ConfigMap>>],
        meshed: &BTreeSet<String>,
        written: &mut Memory,
    ) -> bool {
        let now = Instant::now();
        written.unmeshed_since.retain(|ns, _| !meshed.contains(ns));
        let mut ok = true;
        for cm in managed {
            let (Some(ns), Some(name)) = (&cm.metadata.namespace, &cm.metadata.name) else {
                continue;
            };
            if meshed.contains(ns) || !is_managed(cm) {
                continue;
            }
            let since = *written.unmeshed_since.entry(ns.clone()).or_insert(now);
            let left = self.options.gc_grace.saturating_sub(now - since);
            if !left.is_zero() {
                written.gc_due = Some(written.gc_due.map_or(left, |d| d.min(left)));
                continue;
            }
            if !self.leadership.is_leader() {
                return false;
            }
            if let Err(e) = self.delete_config_map(ns, name).await {
                ok = false;
                tracing::warn!(namespace = %ns, configmap = %name, error = %e, "deleting a ConfigMap of a namespace that left the mesh failed; retrying");
            }
        }
        ok
    }
}

/// Whether this controller wrote the ConfigMap (checked beside the watch's label selector:
/// nothing else is ever deleted).
fn is_managed(cm: &PartialObjectMeta<ConfigMap>) -> bool {
    cm.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == FIELD_MANAGER)
}

/// What the reconciler remembers between reconciles.
#[derive(Default)]
pub(super) struct Memory {
    /// Per namespace, what was last written (or found).
    written: HashMap<String, Written>,
    /// Per namespace, the last assembled config and its inputs' hash: compiling is the
    /// expensive step, and most reconciles change neither routing nor the registry.
    assembled: HashMap<String, (String, Result<desired::Assembled, Vec<Issue>>)>,
    /// Namespaces with managed ConfigMaps and no meshed pod, since when.
    unmeshed_since: HashMap<String, Instant>,
    /// When the next namespace's grace ends (the reconciler wakes for it).
    pub(super) gc_due: Option<Duration>,
    reporter: events::Reporter,
    /// Each Service's entry checked alone, by its bytes.
    entry_checks: registry_check::EntryChecks,
}

impl Memory {
    /// Forget what was written: the next reconcile reads every ConfigMap back (a GET each)
    /// and writes only where one differs.
    pub(super) fn clear(&mut self) {
        self.written.clear();
    }

    fn forget_unmeshed(&mut self, meshed: &BTreeSet<String>) {
        self.written.retain(|ns, _| meshed.contains(ns));
        self.assembled.retain(|ns, _| meshed.contains(ns));
    }

    /// [`desired::assemble`], again only when its inputs changed (`true`: it was).
    fn assemble(
        &mut self,
        ns: &str,
        candidates: &[&istio::IstioObject],
        registry: &[SourceFile],
    ) -> (bool, Result<desired::Assembled, Vec<Issue>>) {
        let mut inputs = vec![SourceFile::new(
            ROUTING_KEY,
            desired::routing_text(candidates),
        )];
        inputs.extend(registry.iter().cloned());
        let hash = isthmus_config::source::version_of(&inputs);
        let fresh = self.assembled.get(ns).is_none_or(|(h, _)| *h != hash);
        if fresh {
            // Without candidates the result is the registry's alone: namespaces seeing the same
            // registry share one compile.
            let shared = candidates
                .is_empty()
                .then(|| self.assembled.values().find(|(h, _)| *h == hash))
                .flatten()
                .map(|(_, result)| result.clone());
            let result = shared.unwrap_or_else(|| desired::assemble(ns, candidates, registry));
            self.assembled.insert(ns.to_owned(), (hash, result));
        }
        (fresh, self.assembled[ns].1.clone())
    }
}
