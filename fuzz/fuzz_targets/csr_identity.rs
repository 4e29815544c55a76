//! Any bytes → the controller CA's CSR check (`csr::parse`) and, as text, the identity parsers
//! (`SpiffeId::parse`, `SpiffeId::from_username`): no panic, the same answer twice, an accepted
//! identity is canonical (printed back, it is the input and parses to itself), an accepted CSR
//! names an identity that parses on its own, and a username's identity is the SPIFFE ID of
//! its parts. The two files are included as they are in ctl (both are std + x509-parser only),
//! so the target does not build the controller's Kubernetes client.
#![no_main]

use libfuzzer_sys::fuzz_target;

// Siblings at the crate root, as in ctl's `controller` module (csr.rs names `super::identity`).
#[allow(dead_code)]
#[path = "../../ctl/src/controller/csr.rs"]
mod csr;
#[allow(dead_code)]
#[path = "../../ctl/src/controller/identity.rs"]
mod identity;

use identity::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let checked = csr::parse(data);
    assert_eq!(checked, csr::parse(data), "not pure");
    if let Ok(checked) = &checked {
        let printed = checked.identity.to_string();
        assert_eq!(SpiffeId::parse(&printed).as_ref(), Ok(&checked.identity));
        assert!(!checked.public_key_der.is_empty());
        assert_eq!(csr::authorize(checked, &checked.identity), Ok(()));
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(text) {
        assert_eq!(id.to_string(), text, "an accepted SPIFFE ID is canonical");
        assert!(text.len() <= "spiffe://".len() + 255 + "/ns/".len() + 63 + "/sa/".len() + 253);
    }
    for domain in ["cluster.local", "example.org"] {
        if let Ok(id) = SpiffeId::from_username(text, domain) {
            assert_eq!(
                format!("system:serviceaccount:{}:{}", id.namespace(), id.service_account()),
                text
            );
            assert_eq!(
                id.to_string(),
                format!("spiffe://{domain}/ns/{}/sa/{}", id.namespace(), id.service_account())
            );
            assert_eq!(SpiffeId::parse(&id.to_string()), Ok(id));
        }
    }
});
