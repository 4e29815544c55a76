//! Which VirtualService `http` rule takes a request: pure functions of (routes, request,
//! source), table-tested without sockets. Istio's semantics: rules in order, the first whose
//! match accepts wins; a rule's `match` blocks are ORed, the conditions inside one are ANDed;
//! no rule → 404 with flag `NR`.

use isthmus_config::{HeaderMatch, HttpMatch, HttpRoute, StringMatch};

use super::h1::Header;

/// What routing looks at in a request, whichever protocol carried it.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// The path without the query.
    pub path: &'a str,
    /// After `?`, without it; empty when there is none.
    pub query: &'a str,
    pub authority: &'a str,
    pub scheme: &'a str,
    pub headers: &'a [Header],
    /// The service port the request came to.
    pub port: u16,
}

impl<'a> RequestView<'a> {
    /// Splits an origin-form target into path and query.
    pub fn split_target(target: &str) -> (&str, &str) {
        match target.split_once('?') {
            Some((path, query)) => (path, query),
            None => (target, ""),
        }
    }

    /// The first value of header `name` (any case), as text.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|h| h.is(name))
            .and_then(|h| std::str::from_utf8(&h.value).ok())
    }

    /// The value of query parameter `name` (`Some("")` for `?name` alone).
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v)
        })
    }
}

/// Who sent the request: this sidecar's own workload on outbound.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub labels: &'a [(String, String)],
    pub namespace: &'a str,
}

/// The first rule that accepts the request, with the match block that accepted it (`None`
/// when the rule has no match: it takes everything).
pub fn select<'r>(
    routes: &'r [HttpRoute],
    req: &RequestView<'_>,
    source: &Source<'_>,
) -> Option<(&'r HttpRoute, Option<&'r HttpMatch>)> {
    routes.iter().find_map(|route| {
        if route.matches.is_empty() {
            return Some((route, None));
        }
        route
            .matches
            .iter()
            .find(|m| accepts(m, req, source))
            .map(|m| (route, Some(m)))
    })
}

/// Whether every condition of one match block holds.
pub fn accepts(m: &HttpMatch, req: &RequestView<'_>, source: &Source<'_>) -> bool {
    let uri_ok = match &m.uri {
        None => true,
        Some(uri) if m.ignore_uri_case => uri.matches_ignoring_case(req.path),
        Some(uri) => uri.matches(req.path),
    };
    uri_ok
        && optional(&m.scheme, req.scheme)
        && optional(&m.method, req.method)
        && optional(&m.authority, req.authority)
        && m.port.is_none_or(|p| p == req.port)
        && m.headers.iter().all(|h| header_matches(h, req))
        && !m.without_headers.iter().any(|h| header_matches(h, req))
        && m.query_params
            .iter()
            .all(|(name, value)| match (req.query_param(name), value) {
                (Some(_), None) => true,
                (Some(v), Some(want)) => want.matches(v),
                (None, _) => false,
            })
        && m.source_labels
            .iter()
            .all(|(k, v)| source.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        && m.source_namespace
            .as_deref()
            .is_none_or(|ns| ns == source.namespace)
}

fn optional(want: &Option<StringMatch>, have: &str) -> bool {
    want.as_ref().is_none_or(|w| w.matches(have))
}

fn header_matches(m: &HeaderMatch, req: &RequestView<'_>) -> bool {
    match (req.header(&m.name), &m.value) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(v), Some(want)) => want.matches(v),
    }
}

#[cfg(test)]
mod tests {
    use isthmus_config::{load, HttpAction, SourceFile};

    use super::*;
    use crate::http::local::header;

    const REGISTRY: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
        metadata: {name: web, namespace: test}\nspec:\n  hosts: [web]\n  addresses: [10.96.0.2]\n\
        \x20 ports: [{number: 80, name: http}]\n  resolution: STATIC\n\
        \x20 endpoints: [{address: 10.0.0.1, labels: {version: v1}}, {address: 10.0.0.2, labels: {version: v2}}]\n---\n\
        apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: test}\n\
        spec: {host: web, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}\n";

    /// The name of the rule that takes the request, `None` for no match.
    fn winner(http: &str, req: &RequestView<'_>, source: &Source<'_>) -> Option<String> {
        let vs = format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: test}}\n\
             spec:\n  hosts: [web]\n  http:\n{http}"
        );
        let snapshot = load(&[
            SourceFile::new("r.yaml", REGISTRY),
            SourceFile::new("vs.yaml", vs),
        ])
        .unwrap();
        let (_, port) = snapshot
            .service_port("10.96.0.2:80".parse().unwrap())
            .unwrap();
        select(&port.http_routes, req, source).map(|(route, _)| {
            assert!(matches!(route.action, HttpAction::Route(_)));
            route.name.clone().unwrap_or_default()
        })
    }

    fn request<'a>(method: &'a str, target: &'a str, headers: &'a [Header]) -> RequestView<'a> {
        let (path, query) = RequestView::split_target(target);
        RequestView {
            method,
            path,
            query,
            authority: "web",
            scheme: "http",
            headers,
            port: 80,
        }
    }

    const SOURCE: Source<'static> = Source {
        labels: &[],
        namespace: "test",
    };

    fn rule(name: &str, matches: &str) -> String {
        format!("  - name: {name}\n    match: {matches}\n    route: [{{destination: {{host: web, subset: v1}}}}]\n")
    }

    #[test]
    fn uri_matches_exact_prefix_regex_and_case() {
        let rules = [
            rule("exact", "[{uri: {exact: /a}}]"),
            rule("prefix", "[{uri: {prefix: /b/}}]"),
            rule("regex", "[{uri: {regex: '/c/[0-9]+'}}]"),
            rule("nocase", "[{uri: {exact: /D}, ignoreUriCase: true}]"),
        ]
        .concat();
        let cases = [
            ("/a", Some("exact")),
            ("/a?x=1", Some("exact")),
            ("/ab", None),
            ("/b/x", Some("prefix")),
            ("/b", None),
            ("/c/42", Some("regex")),
            ("/c/42x", None),
            ("/d", Some("nocase")),
        ];
        for (target, want) in cases {
            let got = winner(&rules, &request("GET", target, &[]), &SOURCE);
            assert_eq!(got.as_deref(), want, "{target}");
        }
    }

    #[test]
    fn blocks_are_ored_conditions_anded_first_rule_wins() {
        let rules = [
            rule(
                "both",
                "[{method: {exact: POST}, headers: {x-a: {exact: '1'}}}]",
            ),
            rule(
                "either",
                "[{headers: {x-b: {}}}, {queryParams: {q: {prefix: go}}}]",
            ),
            rule(
                "without",
                "[{withoutHeaders: {x-c: {}}, uri: {prefix: /w}}]",
            ),
            rule("all", "[{uri: {prefix: /}}]"),
        ]
        .concat();
        let a = [header("X-A", b"1")];
        let b = [header("x-b", b"")];
        let c = [header("x-c", b"v")];
        let cases: [(&str, &str, &[Header], &str); 7] = [
            ("POST", "/", &a, "both"),
            ("GET", "/", &a, "all"),
            ("GET", "/", &b, "either"),
            ("GET", "/?q=go-ahead", &[], "either"),
            ("GET", "/?q=no", &[], "all"),
            ("GET", "/w", &[], "without"),
            ("GET", "/w", &c, "all"),
        ];
        for (method, target, headers, want) in cases {
            let got = winner(&rules, &request(method, target, headers), &SOURCE);
            assert_eq!(got.as_deref(), Some(want), "{method} {target} {headers:?}");
        }
    }

    #[test]
    fn source_labels_and_namespace() {
        let rules = [
            rule("canary-client", "[{sourceLabels: {version: v2}}]"),
            rule("other-ns", "[{sourceNamespace: prod}]"),
        ]
        .concat();
        let v2 = [
            ("app".to_string(), "c".to_string()),
            ("version".to_string(), "v2".to_string()),
        ];
        let req = request("GET", "/", &[]);
        let from_v2 = Source {
            labels: &v2,
            namespace: "test",
        };
        assert_eq!(
            winner(&rules, &req, &from_v2).as_deref(),
            Some("canary-client")
        );
        let prod = Source {
            labels: &[],
            namespace: "prod",
        };
        assert_eq!(winner(&rules, &req, &prod).as_deref(), Some("other-ns"));
        assert_eq!(winner(&rules, &req, &SOURCE), None);
    }
}
