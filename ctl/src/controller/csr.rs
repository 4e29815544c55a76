//! A workload's certificate signing request, checked before the CA signs anything: PKCS#10 in
//! PEM, its self-signature valid, an ECDSA P-256 key, and exactly one subject alternative name —
//! the URI of the identity the caller proved. Pure (x509-parser only) so the fuzz target
//! includes this file as is; the CA signs its own parameters for the key, never the request's.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_X509_EXT_SUBJECT_ALT_NAME,
};
use x509_parser::prelude::FromDer;

use super::identity::{IdentityError, SpiffeId};

/// Why a CSR is refused. [`CsrError::reason`] is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is not one PEM CERTIFICATE REQUEST")]
    Pem,
    #[error("the CSR is not a DER PKCS#10 request: {0}")]
    Der(String),
    #[error("the CSR's signature does not verify with its own key")]
    Signature,
    #[error("the CSR's key is not ECDSA P-256")]
    Key,
    #[error("the CSR must carry exactly one URI SAN (the workload's SPIFFE ID) and no other name")]
    Names,
    #[error("the CSR's URI SAN is not a workload identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("the CSR asks for {asked}, the token proves {proved}")]
    Forbidden { asked: String, proved: String },
}

impl CsrError {
    /// The `reason` label of `isthmus_controller_csr_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            CsrError::Pem | CsrError::Der(_) => "malformed_csr",
            CsrError::Signature => "bad_signature",
            CsrError::Key => "unsupported_key",
            CsrError::Names | CsrError::Identity(_) => "bad_identity",
            CsrError::Forbidden { .. } => "forbidden_identity",
        }
    }
}

/// A request whose signature verified: the identity it asks for and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCsr {
    pub identity: SpiffeId,
    /// The DER SubjectPublicKeyInfo (ECDSA P-256) the certificate is issued for.
    pub public_key_der: Vec<u8>,
}

/// Parses and checks `pem` (anything: this is where garbage arrives).
pub fn parse(pem: &[u8]) -> Result<CheckedCsr, CsrError> {
    let (rest, block) = x509_parser::pem::parse_x509_pem(pem).map_err(|_| CsrError::Pem)?;
    if block.label != "CERTIFICATE REQUEST" || !rest.iter().all(u8::is_ascii_whitespace) {
        return Err(CsrError::Pem);
    }
    let (trailing, request) = X509CertificationRequest::from_der(&block.contents)
        .map_err(|e| CsrError::Der(e.to_string()))?;
    if !trailing.is_empty() {
        return Err(CsrError::Der("trailing bytes".into()));
    }
    let spki = &request.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(CsrError::Key);
    }
    request
        .verify_signature()
        .map_err(|_| CsrError::Signature)?;
    let identity = SpiffeId::parse(single_uri(&request)?)?;
    Ok(CheckedCsr {
        identity,
        public_key_der: spki.raw.to_vec(),
    })
}

/// Checks that `csr` asks for exactly the identity the token proved.
pub fn authorize(csr: &CheckedCsr, proved: &SpiffeId) -> Result<(), CsrError> {
    if &csr.identity == proved {
        Ok(())
    } else {
        Err(CsrError::Forbidden {
            asked: csr.identity.to_string(),
            proved: proved.to_string(),
        })
    }
}

/// The one URI among every requested subject alternative name (in every extension request).
fn single_uri<'a>(request: &'a X509CertificationRequest<'_>) -> Result<&'a str, CsrError> {
    let mut names = Vec::new();
    for attribute in request.certification_request_info.attributes() {
        let ParsedCriAttribute::ExtensionRequest(extensions) = attribute.parsed_attribute() else {
            continue;
        };
        for extension in &extensions.extensions {
            match extension.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    names.extend(san.general_names.iter())
                }
                // A SAN we could not read might name anything.
                _ if extension.oid == OID_X509_EXT_SUBJECT_ALT_NAME => return Err(CsrError::Names),
                _ => {}
            }
        }
    }
    match names.as_slice() {
        [GeneralName::URI(uri)] => Ok(uri),
        _ => Err(CsrError::Names),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, PublicKeyData, SanType};

    fn csr(key: &KeyPair, names: Vec<SanType>) -> String {
        let mut params = CertificateParams::default();
        params.subject_alt_names = names;
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    #[test]
    fn a_p256_request_for_one_spiffe_uri_is_accepted() {
        let key = KeyPair::generate().unwrap();
        let checked = parse(csr(&key, vec![uri(WEB)]).as_bytes()).unwrap();
        assert_eq!(checked.identity.to_string(), WEB);
        assert_eq!(checked.public_key_der, key.subject_public_key_info());
        let proved = SpiffeId::parse(WEB).unwrap();
        assert_eq!(authorize(&checked, &proved), Ok(()));
        let other = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/db").unwrap();
        assert_eq!(
            authorize(&checked, &other).unwrap_err().reason(),
            "forbidden_identity"
        );
    }

    #[test]
    fn other_names_keys_and_tampering_are_refused() {
        let key = KeyPair::generate().unwrap();
        let dns = SanType::DnsName("web.shop.svc".try_into().unwrap());
        for names in [
            vec![],
            vec![uri(WEB), dns.clone()],
            vec![dns],
            vec![uri(WEB), uri(WEB)],
        ] {
            assert_eq!(parse(csr(&key, names).as_bytes()), Err(CsrError::Names));
        }
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert_eq!(
            parse(csr(&p384, vec![uri(WEB)]).as_bytes()),
            Err(CsrError::Key)
        );
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert_eq!(
            parse(csr(&ed, vec![uri(WEB)]).as_bytes()),
            Err(CsrError::Key)
        );

        // The same request with its SAN changed after signing: the signature no longer covers it.
        let good = csr(&key, vec![uri(WEB)]);
        let (_, block) = x509_parser::pem::parse_x509_pem(good.as_bytes()).unwrap();
        let mut der = block.contents.clone();
        let at = der.windows(3).position(|w| w == b"web").unwrap();
        der[at..at + 3].copy_from_slice(b"wex");
        let forged = pem_of(&der);
        assert_eq!(parse(forged.as_bytes()), Err(CsrError::Signature));

        assert_eq!(parse(b"garbage"), Err(CsrError::Pem));
        let cert_label = good.replace("CERTIFICATE REQUEST", "CERTIFICATE");
        assert_eq!(parse(cert_label.as_bytes()), Err(CsrError::Pem));
        assert!(matches!(
            parse(pem_of(b"\x30\x03\x02\x01\x00").as_bytes()),
            Err(CsrError::Der(_))
        ));
    }

    #[test]
    fn a_request_made_by_openssl_is_accepted() {
        // `openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -subj / -addext
        // subjectAltName=URI:spiffe://cluster.local/ns/shop/sa/web`: also a fuzz seed.
        let pem = include_str!("../../../fuzz/corpus/csr_identity/csr-web.pem");
        assert_eq!(parse(pem.as_bytes()).unwrap().identity.to_string(), WEB);
        let p384 = include_str!("../../../fuzz/corpus/csr_identity/csr-p384-two-names.pem");
        assert_eq!(parse(p384.as_bytes()), Err(CsrError::Key));
    }

    fn pem_of(der: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n")
    }
}
