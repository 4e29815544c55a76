//! Puts the injection webhook together: the CA from its Secret ([`certs`]), the serving
//! certificate (re-issued before it expires), the TLS listener ([`webhook`]) and the
//! MutatingWebhookConfiguration's `caBundle`, kept equal to the CA.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};

use super::certs::{CertificateAuthority, ServingCert};
use super::lease::Leadership;
use super::{https, webhook};
use crate::inject::InjectConfig;

/// The webhook's flags.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// `--webhook`: where HTTPS is served (`[::]:15017`; the Service maps 443 to it).
    pub listen: SocketAddr,
    /// `POD_NAMESPACE`: where the CA Secret is, and the Service's namespace.
    pub namespace: String,
    /// `--service`: the controller's Service, named in the serving certificate.
    pub service: String,
    /// `--ca-secret`: the Secret holding the CA.
    pub ca_secret: String,
    /// `--webhook-config`: the MutatingWebhookConfiguration whose caBundle is kept; `None`
    /// leaves it to someone else.
    pub webhook_config: Option<String>,
    /// What is injected (`--inject-config`, `--hub`, `--tag`).
    pub inject: InjectConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("invalid inject config: {0}")]
    Inject(#[from] crate::inject::InjectError),
    #[error("the webhook: {0} (--webhook changes the address)")]
    Bind(#[from] https::BindError),
}

/// Loads (or makes) the CA, binds the listener and starts serving. The caBundle is written
/// only while `leadership` says so.
pub async fn start(
    client: &kube::Client,
    options: &WebhookOptions,
    leadership: Leadership,
    metrics: webhook::Metrics,
) -> Result<https::Running, AdmissionError> {
    options.inject.validate()?;
    let bound = https::bind(
        client,
        &options.namespace,
        &options.service,
        &options.ca_secret,
        options.listen,
    )
    .await?;
    let addr = bound.addr;
    tracing::info!(%addr, path = webhook::PATH, service = %options.service, "serving the injection webhook");
    let mut tasks = vec![
        tokio::spawn(https::serve(
            bound.listener,
            bound.acceptor,
            webhook::LIMITS,
            Arc::new(webhook::Webhook {
                config: options.inject.clone(),
                metrics,
            }),
            "webhook",
        )),
        tokio::spawn(renew(bound.ca.clone(), bound.cert)),
    ];
    if let Some(name) = &options.webhook_config {
        tasks.push(tokio::spawn(keep_ca_bundle(
            client.clone(),
            name.clone(),
            bound.ca.cert_pem().as_bytes().to_vec(),
            leadership,
        )));
    }
    Ok(https::Running::new(addr, tasks))
}

/// Re-issues the serving certificate after two thirds of its life.
pub(super) async fn renew(ca: Arc<CertificateAuthority>, cert: Arc<ServingCert>) {
    loop {
        let wait = cert
            .renew_at()
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait).await;
        match cert.renew(&ca) {
            Ok(()) => tracing::info!("serving certificate renewed"),
            Err(e) => {
                tracing::error!(error = %e, "renewing a serving certificate failed; retrying in a minute");
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    }
}

/// Watches the webhook configuration and, while leader, writes `ca` into every webhook's
/// `clientConfig.caBundle` where it differs. A configuration that does not exist is logged,
/// not fatal (the controller also runs without one).
async fn keep_ca_bundle(
    client: kube::Client,
    name: String,
    ca: Vec<u8>,
    mut leadership: Leadership,
) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let events = watcher(api.clone(), config).default_backoff();
    tokio::pin!(events);
    let mut warned_missing = false;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(webhook_config = %name, error = %e, "watching the webhook configuration failed; retrying (may the controller watch mutatingwebhookconfigurations?)");
                    continue;
                }
                None => return,
            },
            () = leadership.changed() => {}
        }
        if !leadership.is_leader() {
            continue;
        }
        match patch_ca_bundle(&api, &name, &ca).await {
            Ok(Patched::Missing) if !warned_missing => {
                warned_missing = true;
                tracing::warn!(webhook_config = %name, "no MutatingWebhookConfiguration of that name: pods are not injected until it exists (isthmus-ctl install creates it)");
            }
            Ok(Patched::Written(n)) => {
                warned_missing = false;
                tracing::info!(webhook_config = %name, webhooks = n, "caBundle set to the controller's CA");
            }
            Ok(_) => {}
            Err(e) => {
                // The watch brings the next version (a conflict is someone else's write).
                tracing::warn!(webhook_config = %name, error = %e, "writing the caBundle failed (may the controller update mutatingwebhookconfigurations?)");
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Patched {
    Missing,
    Current,
    /// Written into this many webhooks.
    Written(usize),
}

/// Replaces the configuration with every caBundle set to `ca`, if any differs, with its
/// resourceVersion as precondition.
async fn patch_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    ca: &[u8],
) -> Result<Patched, kube::Error> {
    let Some(mut config) = api.get_opt(name).await? else {
        return Ok(Patched::Missing);
    };
    let changed = set_ca_bundle(&mut config, ca);
    if changed == 0 {
        return Ok(Patched::Current);
    }
    api.replace(name, &PostParams::default(), &config).await?;
    Ok(Patched::Written(changed))
}

/// Sets every webhook's caBundle to `ca`; returns how many changed.
fn set_ca_bundle(config: &mut MutatingWebhookConfiguration, ca: &[u8]) -> usize {
    let mut changed = 0;
    for hook in config.webhooks.iter_mut().flatten() {
        if hook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice())
            != Some(ca)
        {
            hook.client_config.ca_bundle = Some(ByteString(ca.to_vec()));
            changed += 1;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_differing_ca_bundles_are_rewritten() {
        let mut config: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": "isthmus-sidecar-injector"},
            "webhooks": [
                {"name": "a.isthmus.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                 "clientConfig": {"service": {"name": "isthmus-controller", "namespace": "isthmus-system", "path": "/inject"}}},
                {"name": "b.isthmus.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                 "clientConfig": {"caBundle": "Q0E=", "url": "https://x/inject"}},
            ],
        }))
        .unwrap();
        assert_eq!(set_ca_bundle(&mut config, b"CA"), 1);
        assert_eq!(set_ca_bundle(&mut config, b"CA"), 0);
        assert_eq!(set_ca_bundle(&mut config, b"CA2"), 2);
    }
}
