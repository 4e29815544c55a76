//! A fresh ECDSA P-256 key and the PKCS#10 request for one identity. The key exists only in
//! this process's memory; each renewal gets a new one (as Istio's agent does), so a key that
//! leaked is useless once its certificate is replaced.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};

/// A key and the CSR it signed.
pub struct Request {
    pub key: KeyPair,
    pub csr_pem: String,
}

/// The CSR carries exactly one URI SAN, the SPIFFE id, and an empty subject: the CA signs
/// nothing else (no DNS or IP names).
pub fn new_request(spiffe_id: &str) -> Result<Request, rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
    let csr_pem = params.serialize_request(&key)?.pem()?;
    Ok(Request { key, csr_pem })
}
