//! What the CA returned, checked before it is used: the leaf must name exactly our identity
//! and carry our key (a CA that answered with anything else is not trusted with this
//! identity), and its fields are read once for `/config_dump`.

use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The leaf's facts shown to operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub spiffe_id: String,
    /// Hex, colon-separated (as `openssl x509 -serial` groups it).
    pub serial: String,
    pub issuer: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// An issued identity: key, chain (leaf first), the roots to trust peers by, and the leaf's
/// facts. Immutable; a renewal makes a new one.
pub struct Certified {
    pub key: PrivatePkcs8KeyDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub trust_bundle: Vec<CertificateDer<'static>>,
    pub info: CertInfo,
}

impl std::fmt::Debug for Certified {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certified")
            .field("info", &self.info)
            .field("chain", &self.chain.len())
            .field("trust_bundle", &self.trust_bundle.len())
            .finish_non_exhaustive()
    }
}

/// Why a CA's answer was not used.
#[derive(Debug, thiserror::Error)]
pub enum InvalidCertificate {
    #[error("the certificate chain is empty or not PEM")]
    NoChain,
    #[error("the trust bundle holds no PEM certificate")]
    NoTrustBundle,
    #[error("the leaf certificate does not parse: {0}")]
    Parse(String),
    #[error("the leaf names {found:?}, not exactly {expected}")]
    WrongIdentity {
        expected: String,
        found: Vec<String>,
    },
    #[error("the leaf certificate is not for the key this sidecar sent")]
    WrongKey,
    #[error("the leaf certificate is already expired")]
    Expired,
}

impl Certified {
    /// Checks the CA's answer against what was asked (`spiffe_id`, `key`) and builds the
    /// identity from it.
    pub fn new(
        key: &rcgen::KeyPair,
        spiffe_id: &str,
        chain_pem: &[String],
        trust_bundle_pem: &str,
        now: SystemTime,
    ) -> Result<Certified, InvalidCertificate> {
        let chain: Vec<CertificateDer<'static>> = chain_pem
            .iter()
            .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| InvalidCertificate::NoChain)?;
        let trust_bundle: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(trust_bundle_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|_| InvalidCertificate::NoTrustBundle)?;
        if trust_bundle.is_empty() {
            return Err(InvalidCertificate::NoTrustBundle);
        }
        let leaf = chain.first().ok_or(InvalidCertificate::NoChain)?;
        let info = leaf_info(leaf, key.public_key_raw(), spiffe_id)?;
        if info.not_after <= now {
            return Err(InvalidCertificate::Expired);
        }
        Ok(Certified {
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            chain,
            trust_bundle,
            info,
        })
    }
}

fn leaf_info(
    leaf: &CertificateDer<'_>,
    public_key: &[u8],
    spiffe_id: &str,
) -> Result<CertInfo, InvalidCertificate> {
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| InvalidCertificate::Parse(e.to_string()))?;
    let names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(uri) => uri.to_string(),
                other => other.to_string(),
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(InvalidCertificate::Parse(e.to_string())),
    };
    if names != [spiffe_id] {
        return Err(InvalidCertificate::WrongIdentity {
            expected: spiffe_id.to_string(),
            found: names,
        });
    }
    if cert.public_key().subject_public_key.data.as_ref() != public_key {
        return Err(InvalidCertificate::WrongKey);
    }
    let time = |t: &x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok(CertInfo {
        spiffe_id: spiffe_id.to_string(),
        serial: cert.raw_serial_as_string(),
        issuer: cert.issuer().to_string(),
        not_before: time(&cert.validity().not_before),
        not_after: time(&cert.validity().not_after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, Issuer, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";

    /// A leaf for `key` naming `names`, valid `secs` from now, and its CA's PEM.
    fn issue(key: &KeyPair, names: &[&str], secs: u64) -> (String, String) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);
        let mut params = CertificateParams::default();
        params.subject_alt_names = names
            .iter()
            .map(|n| SanType::URI((*n).try_into().unwrap()))
            .collect();
        params.not_after = (SystemTime::now() + Duration::from_secs(secs)).into();
        (params.signed_by(key, &issuer).unwrap().pem(), ca_pem)
    }

    #[test]
    fn a_leaf_for_our_key_and_identity_is_taken_with_its_facts() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let (leaf, ca) = issue(&key, &[ID], 3600);
        let c = Certified::new(&key, ID, &[leaf, ca.clone()], &ca, SystemTime::now()).unwrap();
        assert_eq!(c.info.spiffe_id, ID);
        assert_eq!(c.chain.len(), 2);
        assert_eq!(c.trust_bundle.len(), 1);
        assert!(c.info.not_after > SystemTime::now() + Duration::from_secs(3500));
        assert!(!c.info.serial.is_empty());
        assert!(
            !format!("{c:?}").contains("key:"),
            "Debug never shows the key"
        );
    }

    #[test]
    fn a_leaf_for_another_key_or_identity_or_already_expired_is_refused() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let now = SystemTime::now();
        let (leaf, ca) = issue(&other, &[ID], 3600);
        assert!(matches!(
            Certified::new(&key, ID, &[leaf], &ca, now),
            Err(InvalidCertificate::WrongKey)
        ));
        let (leaf, ca) = issue(&key, &[ID, "spiffe://cluster.local/ns/shop/sa/admin"], 3600);
        assert!(matches!(
            Certified::new(&key, ID, &[leaf], &ca, now),
            Err(InvalidCertificate::WrongIdentity { .. })
        ));
        let (leaf, ca) = issue(&key, &[ID], 3600);
        assert!(matches!(
            Certified::new(
                &key,
                ID,
                std::slice::from_ref(&leaf),
                &ca,
                now + Duration::from_secs(7200)
            ),
            Err(InvalidCertificate::Expired)
        ));
        assert!(matches!(
            Certified::new(&key, ID, &[], &ca, now),
            Err(InvalidCertificate::NoChain)
        ));
        assert!(matches!(
            Certified::new(&key, ID, &[leaf], "", now),
            Err(InvalidCertificate::NoTrustBundle)
        ));
    }
}
