//! What an app probe's `httpGet` must be for the sidecar to send it as an HTTP/1.1 request: the
//! one rule both the injector (which leaves other probes un-rewritten, with a warning) and the
//! sidecar (which answers 503 for such an entry) apply, so the injector never hands the sidecar
//! a probe it cannot run.

/// Why the sidecar cannot send a GET of `path` with `headers` (name, value) as they are, or
/// `None`. The kubelet URL-escapes a path; the sidecar sends it verbatim, so whitespace and
/// control characters would break the request line, and a header name must be an HTTP token.
pub fn http_get_problem<'a>(
    path: &str,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<String> {
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some(format!(
            "the path {path:?} holds spaces or control characters"
        ));
    }
    for (name, value) in headers {
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Some(format!("header name {name:?} is not an HTTP token"));
        }
        if value.contains(['\r', '\n', '\0']) {
            return Some(format!("header `{name}`'s value holds a line break"));
        }
    }
    None
}

/// RFC 9110's `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::http_get_problem;

    #[test]
    fn request_breaking_paths_and_headers_are_named() {
        assert_eq!(
            http_get_problem("/healthz?full=1", [("X-Probe", "a b")]),
            None
        );
        assert!(http_get_problem("/health check", [])
            .unwrap()
            .contains("spaces"));
        assert!(http_get_problem("/a\r\nX: 1", []).is_some());
        assert!(http_get_problem("/", [("Bad Name", "v")])
            .unwrap()
            .contains("token"));
        assert!(http_get_problem("/", [("X:Y", "v")]).is_some());
        assert!(http_get_problem("/", [("", "v")]).is_some());
        assert!(http_get_problem("/", [("X", "a\r\nInjected: 1")]).is_some());
    }
}
