//! Any bytes as an HTTP/1 request head, a response head, and a chunked body: no panic; a
//! parsed head stays within the input and parses the same once written back; a chunked body
//! scans to the same end, data and verdict however the input is split.
#![no_main]

use isthmus_proxy::http::h1::{
    encode_request_head, encode_response_head, parse_request, parse_response, Chunked, Limits,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_head: 4096,
        max_headers: 32,
        max_chunk_meta: 256,
    };
    // Written back with CRLF and ": ", a head can outgrow the limit it was parsed under.
    let roomy = |out: &[u8]| Limits {
        max_head: out.len() + 1,
        ..limits
    };
    if let Ok(Some((head, n))) = parse_request(data, &limits) {
        assert!(n <= data.len());
        let mut out = Vec::new();
        encode_request_head(&head, &mut out);
        let (again, m) = parse_request(&out, &roomy(&out))
            .expect("a written head parses")
            .expect("a written head is complete");
        assert_eq!(m, out.len());
        assert_eq!(again, head);
    }
    if let Ok(Some((head, n))) = parse_response(data, "GET", &limits) {
        assert!(n <= data.len());
        let mut out = Vec::new();
        encode_response_head(&head, &mut out);
        let (again, _) = parse_response(&out, "GET", &roomy(&out))
            .expect("a written head parses")
            .expect("a written head is complete");
        assert_eq!(again, head);
    }
    // The first byte picks where the body is split in two.
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let whole = scan(body, &[body.len()], &limits);
    let cut = usize::from(cut) % (body.len() + 1);
    let split = scan(body, &[cut, body.len()], &limits);
    assert_eq!(whole, split, "split at {cut}");
});

/// Scans `body` fed in pieces ending at `ends`; returns (consumed, data, done) or the error.
fn scan(body: &[u8], ends: &[usize], limits: &Limits) -> Result<(usize, Vec<u8>, bool), String> {
    let mut chunked = Chunked::new(limits);
    let (mut consumed, mut data, mut start) = (0, Vec::new(), 0);
    for &end in ends {
        if chunked.is_done() {
            break;
        }
        let piece = &body[start..end];
        let scanned = chunked.scan(piece).map_err(|e| e.to_string())?;
        assert!(scanned.consumed <= piece.len());
        for range in &scanned.data {
            assert!(range.end <= scanned.consumed);
            data.extend_from_slice(&piece[range.clone()]);
        }
        consumed += scanned.consumed;
        start = end;
        if scanned.done {
            break;
        }
    }
    Ok((consumed, data, chunked.is_done()))
}
