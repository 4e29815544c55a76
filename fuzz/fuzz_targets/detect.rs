//! Any bytes as a connection's first bytes → `isthmus_proxy::detect::classify`: no panic, the
//! same answer twice, and a verdict that stays settled: once a prefix is classified `Is(p)`,
//! every longer prefix of the same bytes gets `Is(p)` too. The sniffer stops reading at the
//! first `Is`, so without this the protocol would depend on how TCP cut the client's bytes.
#![no_main]

use isthmus_proxy::detect::{classify, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    assert_eq!(classify(data), classify(data), "not pure");
    let mut settled: Option<(usize, Verdict)> = None;
    for end in 0..=data.len() {
        let verdict = classify(&data[..end]);
        match settled {
            Some((at, first)) => assert_eq!(
                verdict,
                first,
                "the first {at} bytes gave {first:?}, the first {end} give {verdict:?}: {:?}",
                String::from_utf8_lossy(&data[..end])
            ),
            None if verdict != Verdict::NeedMore => settled = Some((end, verdict)),
            None => {}
        }
    }
});
