//! The controller's certificate authority and the webhook's serving certificate.
//!
//! The CA is a self-made root kept in a Secret (`--ca-secret`, keys `ca.crt` and `ca.key`, PEM)
//! in the controller's namespace: the first replica that finds none makes one and creates the
//! Secret; a replica that loses that race (409) reads the winner's. Every replica then issues
//! itself a serving certificate for the controller's Service from it, in memory only (nothing
//! to rotate by hand: it is re-issued well before it expires). The API server trusts the CA
//! through the webhook configuration's `caBundle`, which the controller keeps equal to `ca.crt`.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The Secret keys of the CA, PEM.
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";
/// The CA's common name. A CA in the Secret must carry it: certificates are issued under it.
pub const CA_COMMON_NAME: &str = "isthmus-ca";
/// The CA lives ten years; rotating it means replacing the Secret (docs/OPERATIONS.md).
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The serving certificate lives 90 days and is re-issued after two thirds of that.
pub const SERVING_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Certificates start a little in the past: clocks in a cluster are not exactly equal.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("Secret {namespace}/{name}: {reason}")]
    BadSecret {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("reading or creating Secret {namespace}/{name}: {source} (may the controller get and create secrets in its namespace?)")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("the serving certificate does not verify against ca.crt ({0}): was ca.crt made by isthmus (CN {CA_COMMON_NAME}) with ca.key as its key?")]
    Chain(rustls::Error),
    #[error("TLS: {0}")]
    Tls(rustls::Error),
}

/// The controller's certificate authority: a self-signed root and its key.
///
/// Reusable on purpose: the webhook's serving certificate is its first user; issue 9's CSR
/// endpoint will sign workload certificates with [`CertificateAuthority::sign`] from the same
/// root, and distribute [`CertificateAuthority::cert_pem`] as the mesh's trust bundle.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, as issued by the CA.
pub struct Issued {
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_der: PrivatePkcs8KeyDer<'static>,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("CertificateAuthority")
            .field("common_name", &CA_COMMON_NAME)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new root: ECDSA P-256, CN `isthmus-ca`, valid ten years from `now`, allowed to sign
    /// end-entity certificates only (path length 0).
    pub fn generate(now: SystemTime) -> Result<Self, CertError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_LIFETIME).into();
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA from its PEM certificate and key (a Secret's `ca.crt` and `ca.key`). Checked by
    /// issuing a certificate and verifying it against `ca.crt`, exactly as a client will.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("ca.key: {e}"))?;
        let cert_der = pem_certificate(cert_pem).ok_or("ca.crt holds no PEM CERTIFICATE")?;
        let ca = CertificateAuthority {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            key_pem: key_pem.to_owned(),
            issuer: Issuer::new(ca_params(), key),
        };
        let probe = ca
            .serving_certificate(&["isthmus-ca-check.invalid".to_owned()], SystemTime::now())
            .map_err(|e| e.to_string())?;
        ca.verify(&probe, "isthmus-ca-check.invalid")
            .map_err(|e| e.to_string())?;
        Ok(ca)
    }

    /// `ca.crt`: what clients (the API server, issue 9's sidecars) trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Signs `params` for a fresh key pair of the CA's algorithm.
    pub fn sign(&self, params: &CertificateParams) -> Result<Issued, CertError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_after: params.not_after.into(),
        })
    }

    /// Signs `params` for a key the CA never sees (a workload's, from its CSR): the PEM.
    pub fn sign_public_key(
        &self,
        params: &CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<String, CertError> {
        Ok(params.signed_by(public_key, &self.issuer)?.pem())
    }

    /// A TLS server certificate for `dns_names`, valid [`SERVING_LIFETIME`] from `now`.
    pub fn serving_certificate(
        &self,
        dns_names: &[String],
        now: SystemTime,
    ) -> Result<Issued, CertError> {
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        let mut name = DistinguishedName::new();
        if let Some(first) = dns_names.first() {
            name.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = name;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + SERVING_LIFETIME).into();
        self.sign(&params)
    }

    /// Verifies `issued` as a TLS client that trusts only this CA would, for `dns_name`.
    pub fn verify(&self, issued: &Issued, dns_name: &str) -> Result<(), CertError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone()).map_err(CertError::Chain)?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| CertError::Chain(rustls::Error::General(e.to_string())))?;
        let server_name = ServerName::try_from(dns_name.to_owned())
            .map_err(|e| CertError::Chain(rustls::Error::General(e.to_string())))?;
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            verifier.as_ref(),
            &issued.cert_der,
            &[],
            &server_name,
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
        .map_err(CertError::Chain)
    }

    /// The Secret holding this CA.
    fn to_secret(&self, namespace: &str, name: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_owned(),
                        super::FIELD_MANAGER.to_owned(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(
                [
                    (
                        CA_CERT_KEY.to_owned(),
                        ByteString(self.cert_pem.as_bytes().to_vec()),
                    ),
                    (
                        CA_KEY_KEY.to_owned(),
                        ByteString(self.key_pem.as_bytes().to_vec()),
                    ),
                ]
                .into(),
            ),
            ..Secret::default()
        }
    }
}

/// The CA's parameters. Also what issuing is done under, so a CA read back from its Secret
/// must have been made with them (checked in [`CertificateAuthority::from_pem`]).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn pem_certificate(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()
}

/// The CA from Secret `name` in `namespace`, made and stored there if there is none. Two
/// replicas starting together both make one; the second create answers 409 and that replica
/// reads (and uses) the first's.
pub async fn load_or_create(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<CertificateAuthority, CertError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let api_error = |source| CertError::Api {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    if let Some(secret) = api.get_opt(name).await.map_err(api_error)? {
        return from_secret(&secret, namespace, name);
    }
    let ca = CertificateAuthority::generate(SystemTime::now())?;
    match api
        .create(&PostParams::default(), &ca.to_secret(namespace, name))
        .await
    {
        Ok(_) => {
            tracing::info!(
                namespace,
                secret = name,
                "made the controller's CA and stored it"
            );
            Ok(ca)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            tracing::info!(
                namespace,
                secret = name,
                "another replica stored its CA first: using that one"
            );
            let secret = api.get(name).await.map_err(api_error)?;
            from_secret(&secret, namespace, name)
        }
        Err(e) => Err(api_error(e)),
    }
}

fn from_secret(
    secret: &Secret,
    namespace: &str,
    name: &str,
) -> Result<CertificateAuthority, CertError> {
    let bad = |reason: String| CertError::BadSecret {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason,
    };
    let field = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|b| std::str::from_utf8(&b.0).ok())
            .ok_or_else(|| bad(format!("no {key} (PEM) in its data")))
    };
    CertificateAuthority::from_pem(field(CA_CERT_KEY)?, field(CA_KEY_KEY)?).map_err(bad)
}

/// The webhook's certificate, swappable while the server runs: rustls asks for it on every
/// handshake, [`ServingCert::renew`] replaces it.
#[derive(Debug)]
pub struct ServingCert {
    dns_names: Vec<String>,
    current: RwLock<(Arc<CertifiedKey>, SystemTime)>,
}

impl ServingCert {
    /// Issues the first certificate for `dns_names`.
    pub fn new(ca: &CertificateAuthority, dns_names: Vec<String>) -> Result<Self, CertError> {
        let (key, not_after) = certified_key(ca, &dns_names)?;
        Ok(ServingCert {
            dns_names,
            current: RwLock::new((key, not_after)),
        })
    }

    /// The DNS names the API server may call the webhook by: `<service>.<ns>.svc` and
    /// `<service>.<ns>.svc.cluster.local`.
    pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
        vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
        ]
    }

    /// When the current certificate should be replaced: after two thirds of its life.
    pub fn renew_at(&self) -> SystemTime {
        let not_after = self
            .current
            .read()
            .map(|c| c.1)
            .unwrap_or(SystemTime::now());
        not_after - SERVING_LIFETIME / 3
    }

    /// Issues a new certificate and serves it from the next handshake on.
    pub fn renew(&self, ca: &CertificateAuthority) -> Result<(), CertError> {
        let fresh = certified_key(ca, &self.dns_names)?;
        if let Ok(mut current) = self.current.write() {
            *current = fresh;
        }
        Ok(())
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.0.clone())
    }
}

fn certified_key(
    ca: &CertificateAuthority,
    dns_names: &[String],
) -> Result<(Arc<CertifiedKey>, SystemTime), CertError> {
    let issued = ca.serving_certificate(dns_names, SystemTime::now())?;
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(issued.key_der.clone_key()))
        .map_err(CertError::Tls)?;
    let chain = vec![issued.cert_der.clone(), ca.cert_der.clone()];
    Ok((Arc::new(CertifiedKey::new(chain, key)), issued.not_after))
}

/// A rustls server config that serves `cert` (HTTP/1.1 only: the API server speaks it to
/// webhooks when nothing else is offered).
pub fn server_config(cert: Arc<ServingCert>) -> Result<rustls::ServerConfig, CertError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(CertError::Tls)?
    .with_no_client_auth()
    .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_certificate_verifies_against_the_ca_for_its_names_only() {
        let ca = CertificateAuthority::generate(SystemTime::now()).unwrap();
        let names = ServingCert::service_names("isthmus-controller", "isthmus-system");
        let issued = ca.serving_certificate(&names, SystemTime::now()).unwrap();
        ca.verify(&issued, "isthmus-controller.isthmus-system.svc")
            .unwrap();
        ca.verify(
            &issued,
            "isthmus-controller.isthmus-system.svc.cluster.local",
        )
        .unwrap();
        assert!(ca.verify(&issued, "other.isthmus-system.svc").is_err());
    }

    #[test]
    fn a_ca_read_back_from_its_pem_issues_what_the_original_verifies() {
        let original = CertificateAuthority::generate(SystemTime::now()).unwrap();
        let read = CertificateAuthority::from_pem(&original.cert_pem, &original.key_pem).unwrap();
        let issued = read
            .serving_certificate(&["a.b.svc".to_owned()], SystemTime::now())
            .unwrap();
        original.verify(&issued, "a.b.svc").unwrap();
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let one = CertificateAuthority::generate(SystemTime::now()).unwrap();
        let other = CertificateAuthority::generate(SystemTime::now()).unwrap();
        let err = CertificateAuthority::from_pem(&one.cert_pem, &other.key_pem).unwrap_err();
        assert!(err.contains("does not verify"), "{err}");
        assert!(CertificateAuthority::from_pem("junk", &one.key_pem).is_err());
        assert!(CertificateAuthority::from_pem(&one.cert_pem, "junk").is_err());
    }

    #[test]
    fn renewal_is_due_after_two_thirds_of_the_lifetime() {
        let ca = CertificateAuthority::generate(SystemTime::now()).unwrap();
        let cert = ServingCert::new(&ca, vec!["a.b.svc".into()]).unwrap();
        let due = cert.renew_at().duration_since(SystemTime::now()).unwrap();
        let expected = SERVING_LIFETIME * 2 / 3;
        assert!(due <= expected && due > expected - Duration::from_secs(60));
    }
}
