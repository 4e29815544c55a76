//! What a VirtualService rule does to a request or response on its way: header operations,
//! URI and authority rewrites, and the redirect a rule answers with. Pure functions over
//! heads, table-tested.

use isthmus_config::{DerivePort, HeaderOps, HttpMatch, Redirect, Rewrite, StringMatch};

use super::h1::Header;
use super::local::{header, Local};
use crate::telemetry::ResponseFlag;

/// Applies `set` (replace every value), `add` (append) and `remove`, in Istio's order: set,
/// add, then remove.
pub fn apply_header_ops(ops: &HeaderOps, headers: &mut Vec<Header>) {
    for (name, value) in &ops.set {
        let mut kept = false;
        headers.retain_mut(|h| {
            if !h.is(name) {
                return true;
            }
            if kept {
                return false;
            }
            kept = true;
            h.value = value.as_bytes().into();
            true
        });
        if !kept {
            headers.push(header(name, value.as_bytes()));
        }
    }
    for (name, value) in &ops.add {
        headers.push(header(name, value.as_bytes()));
    }
    for name in &ops.remove {
        headers.retain(|h| !h.is(name));
    }
}

/// Rewrites the request target (path and query) and authority. The URI rewrite replaces
/// the part the rule's `uri` prefix matched (the whole path for exact and regex matches), as
/// Envoy's `prefix_rewrite`; `uriRegexRewrite` substitutes every match.
pub fn rewrite(
    rule: &Rewrite,
    matched: Option<&HttpMatch>,
    target: &mut String,
    authority: &mut Option<String>,
) {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.clone(), None),
    };
    let mut new_path = path.clone();
    if let Some(uri) = &rule.uri {
        new_path = match matched.and_then(|m| m.uri.as_ref()) {
            Some(StringMatch::Prefix(prefix)) if path.len() >= prefix.len() => {
                format!("{uri}{}", &path[prefix.len()..])
            }
            _ => uri.clone(),
        };
    }
    if let Some((regex, replacement)) = &rule.uri_regex {
        let envoy_style = replacement.replace("\\", "$");
        new_path = regex
            .replace_all(&new_path, envoy_style.as_str())
            .into_owned();
    }
    if new_path != path {
        *target = match query {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
    }
    if let Some(a) = &rule.authority {
        *authority = Some(a.clone());
    }
}

/// The redirect response for a request to `scheme://authority` + `target`.
pub fn redirect(rule: &Redirect, scheme: &str, authority: &str, target: &str) -> Local {
    let (host, port) = split_authority(authority);
    let scheme = rule.scheme.as_deref().unwrap_or(scheme);
    let host = rule
        .authority
        .as_deref()
        .map(|a| split_authority(a).0)
        .unwrap_or(host);
    let port = match (rule.port, &rule.derive_port) {
        (Some(p), _) => Some(p),
        (None, Some(DerivePort::FromProtocolDefault)) => None,
        (None, Some(DerivePort::FromRequestPort)) => port,
        (None, None) => rule
            .authority
            .as_deref()
            .and_then(|a| split_authority(a).1)
            .or(port),
    };
    let default_port = if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    };
    let port = port.filter(|p| *p != default_port);
    let path = rule.uri.as_deref().unwrap_or(target);
    let location = match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}"),
        None => format!("{scheme}://{host}{path}"),
    };
    let mut local = Local::new(rule.code, Vec::new(), ResponseFlag::None);
    local.headers.push(header("location", location.as_bytes()));
    local
}

fn split_authority(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (authority, None),
        Some((h, p)) => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        None => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, value: &str) -> Header {
        header(name, value.as_bytes())
    }

    #[test]
    fn header_ops_set_add_remove() {
        let ops = HeaderOps {
            set: vec![("x-a".into(), "1".into())],
            add: vec![("x-b".into(), "2".into())],
            remove: vec!["x-c".into()],
        };
        let mut headers = vec![
            h("X-A", "old"),
            h("x-a", "dup"),
            h("X-C", "gone"),
            h("x-b", "1"),
        ];
        apply_header_ops(&ops, &mut headers);
        assert_eq!(headers, vec![h("X-A", "1"), h("x-b", "1"), h("x-b", "2")]);
    }

    #[test]
    fn redirect_keeps_what_it_does_not_replace() {
        let rule = Redirect {
            uri: Some("/v1/new".into()),
            authority: Some("new.example".into()),
            port: None,
            derive_port: None,
            scheme: None,
            code: 301,
        };
        let local = redirect(&rule, "http", "old.example:8080", "/old?x=1");
        assert_eq!(local.status, 301);
        let location = local.headers.iter().find(|h| h.is("location")).unwrap();
        assert_eq!(&*location.value, b"http://new.example:8080/v1/new");
    }
}
