//! `install --apply` and `uninstall`: the manifests sent to a cluster through kube-rs.
//!
//! Install is server-side apply, field manager `isthmus-install`, forced: these objects are
//! isthmus's, and an upgrade must win over a hand edit (the controller's own fields — the
//! webhook's caBundle — are never sent, so they are never taken back). Applying twice changes
//! nothing. Uninstall deletes in the reverse order, the webhook configuration first so that no
//! pod creation is refused by a webhook whose backend is going away.

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::ApiResource;
use kube::Client;

use super::crds::KINDS;
use super::{
    manifests, object_name, CrdMode, InstallOptions, CA_SECRET, CONTROLLER, FIELD_MANAGER,
    MANAGED_BY, MANAGED_BY_CONTROLLER, MANAGED_BY_INSTALL,
};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{action} {object}: {source}{hint}")]
    Api {
        action: &'static str,
        object: String,
        #[source]
        source: kube::Error,
        hint: &'static str,
    },
}

/// Whether `uninstall` deletes the Istio CRDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum UninstallCrds {
    /// Kept, with every VirtualService, DestinationRule, … users wrote (as `istioctl uninstall`
    /// without `--purge`).
    #[default]
    Keep,
    /// Deleted where `install` made them (labelled `app.kubernetes.io/managed-by:
    /// isthmus-install`) — and with them every resource of those kinds. Istio's are kept.
    Isthmus,
}

/// Applies every manifest in order; `say` gets one line per object.
pub async fn install(
    client: &Client,
    options: &InstallOptions,
    mut say: impl FnMut(String),
) -> Result<(), InstallError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for manifest in manifests(options) {
        let object = manifest.display_name();
        if manifest.kind() == "CustomResourceDefinition" && options.crds == CrdMode::Auto {
            let existing = crds
                .get_opt(manifest.name())
                .await
                .map_err(|source| api_error("reading", &object, source))?;
            if let Some(existing) = existing.filter(|crd| !installed_by_us(&crd.metadata.labels)) {
                let owner = existing
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(MANAGED_BY).cloned())
                    .unwrap_or_else(|| "another installer".into());
                // Istio before 1.22 has no v1 in its CRDs, and the controller reads v1.
                let serves_v1 = existing
                    .spec
                    .versions
                    .iter()
                    .any(|v| v.name == "v1" && v.served);
                let warning = if serves_v1 {
                    ""
                } else {
                    "; WARNING: it does not serve v1, which the controller reads (upgrade Istio's \
                     CRDs, or --crds always)"
                };
                say(format!(
                    "{object} exists (managed by {owner}): left alone (--crds auto){warning}"
                ));
                continue;
            }
        }
        api(client, &manifest.resource, manifest.namespace())
            .patch(manifest.name(), &params, &Patch::Apply(&manifest.object))
            .await
            .map_err(|source| api_error("applying", &object, source))?;
        say(format!("{object} applied"));
    }
    Ok(())
}

/// What `uninstall` deletes, in order, as printed without `--apply`. The controller-written
/// ConfigMaps and the CRDs depend on what the cluster holds: they are described, not listed.
pub fn uninstall_plan(options: &InstallOptions, crds: UninstallCrds) -> Vec<String> {
    let mut lines: Vec<String> = removals(options)
        .iter()
        .map(|(resource, namespace, name)| object_name(resource, namespace.as_deref(), name))
        .collect();
    lines.push(format!(
        "configmap/* in every namespace labelled {MANAGED_BY}={MANAGED_BY_CONTROLLER} \
         (the routing and registry ConfigMaps the controller wrote)"
    ));
    match crds {
        UninstallCrds::Keep => lines.push(
            "Istio CRDs: kept, with every resource of their kinds (--crds isthmus deletes those \
             install made)"
                .into(),
        ),
        UninstallCrds::Isthmus => lines.extend(KINDS.iter().map(|kind| {
            format!(
                "customresourcedefinition.apiextensions.k8s.io/{} if labelled \
                 {MANAGED_BY}={MANAGED_BY_INSTALL}, with every {} in the cluster",
                kind.crd_name(),
                kind.kind
            )
        })),
    }
    lines.push(format!(
        "namespace/{}: kept (the mesh root namespace may hold mesh-wide Istio resources): \
         `kubectl delete namespace {}` when it is empty",
        options.namespace, options.namespace
    ));
    lines
}

/// Deletes what [`uninstall_plan`] describes; an object already gone is not an error.
pub async fn uninstall(
    client: &Client,
    options: &InstallOptions,
    crds: UninstallCrds,
    mut say: impl FnMut(String),
) -> Result<(), InstallError> {
    for (resource, namespace, name) in removals(options) {
        let line = object_name(&resource, namespace.as_deref(), &name);
        let deleted = delete(&api(client, &resource, namespace.as_deref()), &name, &line).await?;
        say(format!(
            "{line} {}",
            if deleted { "deleted" } else { "not found" }
        ));
    }
    let configmaps: Api<ConfigMap> = Api::all(client.clone());
    let selector = format!("{MANAGED_BY}={MANAGED_BY_CONTROLLER}");
    let listed = configmaps
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| api_error("listing", "configmaps", source))?;
    // Filtered here too: a label selector is a request, and a wrong delete is not undone.
    let written = listed.items.into_iter().filter(|cm| {
        cm.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY))
            .map(String::as_str)
            == Some(MANAGED_BY_CONTROLLER)
    });
    for cm in written {
        let (Some(namespace), Some(name)) = (cm.metadata.namespace, cm.metadata.name) else {
            continue;
        };
        let line = format!("configmap/{name} -n {namespace}");
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
        let deleted = delete(&api, &name, &line).await?;
        say(format!(
            "{line} {}",
            if deleted { "deleted" } else { "not found" }
        ));
    }
    if crds == UninstallCrds::Isthmus {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for kind in KINDS {
            let name = kind.crd_name();
            let line = format!("customresourcedefinition.apiextensions.k8s.io/{name}");
            match api
                .get_opt(&name)
                .await
                .map_err(|source| api_error("reading", &line, source))?
            {
                None => say(format!("{line} not found")),
                Some(crd) if !installed_by_us(&crd.metadata.labels) => {
                    say(format!("{line} is not isthmus's: left alone"))
                }
                Some(_) => {
                    delete(&api, &name, &line).await?;
                    say(format!("{line} deleted"));
                }
            }
        }
    }
    Ok(())
}

/// Everything `install` made except the namespace and the CRDs, in reverse, then what the
/// controller made in the install namespace (its Lease and CA Secret).
fn removals(options: &InstallOptions) -> Vec<(ApiResource, Option<String>, String)> {
    let made = manifests(&InstallOptions {
        crds: CrdMode::Never,
        // The PDB exists only with two replicas or more, the inject ConfigMap only with an
        // inject config: both are listed, and deleting a missing one is harmless.
        replicas: options.replicas.max(2),
        inject_config: Some(String::new()),
        ..options.clone()
    });
    let mut out: Vec<_> = made
        .iter()
        .rev()
        .filter(|m| m.kind() != "Namespace")
        .map(|m| {
            let namespace = m.namespace().map(str::to_owned);
            (m.resource.clone(), namespace, m.name().to_owned())
        })
        .collect();
    let ns = Some(options.namespace.clone());
    out.push((
        ApiResource::erase::<k8s_openapi::api::coordination::v1::Lease>(&()),
        ns.clone(),
        CONTROLLER.into(),
    ));
    out.push((
        ApiResource::erase::<k8s_openapi::api::core::v1::Secret>(&()),
        ns,
        CA_SECRET.into(),
    ));
    out
}

/// `true` when deleted, `false` when it was not there.
async fn delete<K>(api: &Api<K>, name: &str, line: &str) -> Result<bool, InstallError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(source) => Err(api_error("deleting", line, source)),
    }
}

fn api(client: &Client, resource: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    }
}

fn installed_by_us(labels: &Option<std::collections::BTreeMap<String, String>>) -> bool {
    labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY))
        .map(String::as_str)
        == Some(MANAGED_BY_INSTALL)
}

fn api_error(action: &'static str, object: &str, source: kube::Error) -> InstallError {
    let hint = match &source {
        kube::Error::Api(status) if status.code == 403 => {
            " (install and uninstall need cluster-admin: does your kubeconfig's user have it?)"
        }
        _ => "",
    };
    InstallError::Api {
        action,
        object: object.to_owned(),
        source,
        hint,
    }
}
