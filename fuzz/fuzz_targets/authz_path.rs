//! AuthorizationPolicy `paths` templates (`{*}`, `{**}`) against an independent oracle: the
//! anchored regex Envoy builds from a URI template. A template isthmus accepts must be one the
//! oracle calls valid, and the decision on any path must be the regex's.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use arbitrary::Arbitrary;
use isthmus_config::{load, HttpRequest, Labels, Request, SourceFile, Workload};
use libfuzzer_sys::fuzz_target;

/// Pieces of text, mostly path-like, some that a template forbids or a segment cannot hold.
const TEXT: &[&str] = &["a", "bc", "x.y", "%20", "~", "*", "{", "}", "?q=1", "#f", "é", ":@"];

#[derive(Arbitrary, Debug)]
enum Token {
    Slash,
    Text(u8),
    One,
    Many,
}

#[derive(Arbitrary, Debug)]
struct Input {
    template: Vec<Token>,
    path: Vec<Token>,
}

fn render(tokens: &[Token], operators: bool) -> String {
    let mut s = String::new();
    for t in tokens {
        match t {
            Token::Slash => s.push('/'),
            Token::Text(i) => s.push_str(TEXT[usize::from(*i) % TEXT.len()]),
            Token::One if operators => s.push_str("{*}"),
            Token::Many if operators => s.push_str("{**}"),
            Token::One | Token::Many => s.push('/'),
        }
    }
    s
}

/// Istio's validity rule and Envoy's regex for a template; `None`: not a valid template.
fn oracle(template: &str) -> Option<regex::Regex> {
    const LITERAL: &str = r"a-zA-Z0-9\-._~%!$&'()+,;:@=";
    if !template.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    let mut seen_many = false;
    for segment in template.split('/') {
        match segment {
            "{*}" | "{**}" if seen_many => return None,
            "{*}" => parts.push(format!("[{LITERAL}]+")),
            "{**}" => {
                seen_many = true;
                parts.push(format!("[{LITERAL}/]*"));
            }
            s if s.contains(['*', '{', '}']) => return None,
            s => parts.push(regex::escape(s)),
        }
    }
    Some(regex::Regex::new(&format!("^{}$", parts.join("/"))).expect("oracle regex"))
}

fuzz_target!(|input: Input| {
    let template = render(&input.template, true);
    if !(template.contains("{*}") || template.contains("{**}")) {
        return;
    }
    let path = render(&input.path, false);
    let policy = format!(
        r#"{{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {{"name": "p", "namespace": "foo"}},
            "spec": {{"rules": [{{"to": [{{"operation": {{"paths": [{}]}}}}]}}]}}}}"#,
        serde_json::to_string(&template).unwrap()
    );
    let loaded = load(&[SourceFile::new("p.json", policy)]);
    let expected = oracle(&template);
    let snap = match (loaded, &expected) {
        (Ok(snap), Some(_)) => snap,
        (Err(_), None) => return,
        (Ok(_), None) => panic!("accepted a template Istio calls invalid: {template:?}"),
        (Err(e), Some(_)) => panic!("refused a valid template {template:?}: {e}"),
    };
    let labels = Labels::default();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let headers: Vec<(&str, &str)> = Vec::new();
    let decision = snap.authorize(
        Workload {
            namespace: "foo",
            labels: &labels,
        },
        &Request {
            source_principal: None,
            source_namespace: None,
            source_ip: ip,
            remote_ip: None,
            destination_ip: ip,
            destination_port: 80,
            sni: None,
            http: Some(HttpRequest {
                host: "h",
                method: "GET",
                path: &path,
                headers: &headers,
            }),
        },
    );
    // Istio matches the path without its query or fragment (Envoy's `url_path`).
    let url_path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    let want = expected.unwrap().is_match(url_path);
    assert_eq!(
        decision.is_allowed(),
        want,
        "template {template:?}, path {path:?}"
    );
});
