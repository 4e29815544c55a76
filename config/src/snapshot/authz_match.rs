//! The value matchers of AuthorizationPolicy, compiled once: Istio's string forms (exact,
//! `prefix*`, `*suffix`, `*` = any non-empty value), the `{*}` / `{**}` path templates, CIDR
//! lists and port lists. Matching never allocates.

use std::net::IpAddr;

use crate::net::IpNet;

/// One value as Istio's `StringMatcherWithPrefix` reads it: `*` alone is "present and
/// non-empty" (Envoy regex `.+`), a leading `*` a suffix match, a trailing `*` a prefix match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pattern {
    Present,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Template(PathTemplate),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PatternError {
    #[error("empty value not allowed")]
    Empty,
    #[error("`{0}`: a `*` is allowed only as the whole value, its first or its last character")]
    Wildcard(String),
    #[error("`{0}`: {1}")]
    Template(String, &'static str),
}

impl Pattern {
    /// Parses a value of a field that takes Istio's string forms.
    pub(crate) fn parse(value: &str) -> Result<Pattern, PatternError> {
        if value.is_empty() {
            return Err(PatternError::Empty);
        }
        if value == "*" {
            return Ok(Pattern::Present);
        }
        let pattern = if let Some(suffix) = value.strip_prefix('*') {
            Pattern::Suffix(suffix.into())
        } else if let Some(prefix) = value.strip_suffix('*') {
            Pattern::Prefix(prefix.into())
        } else {
            Pattern::Exact(value.into())
        };
        // Istio would take `a*b` as the exact text `a*b` and `*a*` as the suffix `a*`: almost
        // certainly not what was meant, so isthmus refuses both.
        let inner = match &pattern {
            Pattern::Suffix(s) | Pattern::Prefix(s) | Pattern::Exact(s) => s,
            _ => unreachable!("built above"),
        };
        if inner.contains('*') {
            return Err(PatternError::Wildcard(value.to_owned()));
        }
        Ok(pattern)
    }

    /// Parses a `paths` value: a path template when it contains `{*}` or `{**}`, else a string
    /// form.
    pub(crate) fn parse_path(value: &str) -> Result<Pattern, PatternError> {
        if value.contains("{*}") || value.contains("{**}") {
            return PathTemplate::parse(value).map(Pattern::Template);
        }
        Pattern::parse(value)
    }

    pub(crate) fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Present => !s.is_empty(),
            Pattern::Exact(e) => s == &**e,
            Pattern::Prefix(p) => s.starts_with(&**p),
            Pattern::Suffix(x) => s.ends_with(&**x),
            Pattern::Template(t) => t.matches(s),
        }
    }

    /// ASCII case-insensitive (`hosts`).
    pub(crate) fn matches_ignoring_case(&self, s: &str) -> bool {
        match self {
            Pattern::Present => !s.is_empty(),
            Pattern::Exact(e) => s.eq_ignore_ascii_case(e),
            Pattern::Prefix(p) => s
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            Pattern::Suffix(x) => s
                .len()
                .checked_sub(x.len())
                .and_then(|at| s.get(at..))
                .is_some_and(|tail| tail.eq_ignore_ascii_case(x)),
            Pattern::Template(t) => t.matches(s),
        }
    }
}

/// Characters a template operator may match inside one segment: Envoy's `kLiteral` set
/// (`uri_template` matcher), i.e. RFC 3986 `pchar` without `/`.
fn is_template_literal(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b)
}

/// An Envoy URI template as Istio's `paths` takes it (Istio ≥ 1.22): `{*}` matches exactly one
/// non-empty path segment, `{**}` zero or more characters including `/`, and must be the last
/// operator; an operator fills its whole segment; no other `*`, `{` or `}` may appear. The
/// match is of the whole path (Envoy anchors the regex it builds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathTemplate {
    /// Literal text and `{*}` operators, in order, before the optional `{**}`.
    head: Box<[Piece]>,
    /// `Some(suffix)`: a `{**}` followed by the literal `suffix`.
    rest: Option<Box<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(Box<str>),
    Segment,
}

impl PathTemplate {
    pub(crate) fn parse(value: &str) -> Result<PathTemplate, PatternError> {
        let fail = |why| Err(PatternError::Template(value.to_owned(), why));
        if !value.starts_with('/') {
            return fail("a path template must start with `/`");
        }
        let mut head = Vec::new();
        let mut literal = String::new();
        // Once `{**}` is seen: the literal text after it.
        let mut rest: Option<String> = None;
        for (i, segment) in value.split('/').enumerate() {
            let separator = if i > 0 { "/" } else { "" };
            match segment {
                "{*}" | "{**}" if rest.is_some() => {
                    return fail("`{**}` must be the last operator")
                }
                "{*}" | "{**}" => {
                    literal.push_str(separator);
                    head.push(Piece::Literal(std::mem::take(&mut literal).into()));
                    if segment == "{*}" {
                        head.push(Piece::Segment);
                    } else {
                        rest = Some(String::new());
                    }
                }
                s if s.contains(['*', '{', '}']) => {
                    return fail(
                        "`*`, `{` and `}` may appear only as a whole `{*}` or `{**}` segment",
                    )
                }
                s => {
                    let text = rest.as_mut().unwrap_or(&mut literal);
                    text.push_str(separator);
                    text.push_str(s);
                }
            }
        }
        if rest.is_none() && !literal.is_empty() {
            head.push(Piece::Literal(literal.into()));
        }
        Ok(PathTemplate {
            head: head.into(),
            rest: rest.map(Into::into),
        })
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        let mut at = path;
        for piece in self.head.iter() {
            match piece {
                Piece::Literal(l) => match at.strip_prefix(&**l) {
                    Some(next) => at = next,
                    None => return false,
                },
                Piece::Segment => {
                    let end = at.find('/').unwrap_or(at.len());
                    let (segment, next) = at.split_at(end);
                    if segment.is_empty() || !segment.bytes().all(is_template_literal) {
                        return false;
                    }
                    at = next;
                }
            }
        }
        match &self.rest {
            None => at.is_empty(),
            Some(suffix) => at
                .strip_suffix(&**suffix)
                .is_some_and(|middle| middle.bytes().all(|b| b == b'/' || is_template_literal(b))),
        }
    }
}

/// A field's values and its `not*` values: matches when some value matches (or there are
/// none) and no `not` value matches.
#[derive(Debug, Clone)]
pub(crate) struct Either<T> {
    pub(crate) values: Box<[T]>,
    pub(crate) not_values: Box<[T]>,
}

impl<T> Default for Either<T> {
    fn default() -> Self {
        Either {
            values: Box::default(),
            not_values: Box::default(),
        }
    }
}

impl<T> Either<T> {
    pub(crate) fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }

    /// `hit`: whether one value matches the attribute (false when the attribute is absent).
    pub(crate) fn check(&self, hit: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&hit)) && !self.not_values.iter().any(hit)
    }
}

pub(crate) fn strings_match(patterns: &Either<Pattern>, value: Option<&str>) -> bool {
    patterns.check(|p| value.is_some_and(|v| p.matches(v)))
}

pub(crate) fn nets_match(nets: &Either<IpNet>, ip: IpAddr) -> bool {
    nets.check(|n| n.contains(ip))
}

pub(crate) fn ports_match(ports: &Either<u16>, port: u16) -> bool {
    ports.check(|p| *p == port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(template: &str) -> PathTemplate {
        PathTemplate::parse(template).unwrap()
    }

    #[test]
    fn string_forms_are_istios() {
        let p = |v: &str| Pattern::parse(v).unwrap();
        assert!(p("/info*").matches("/info"));
        assert!(p("/info*").matches("/info/x"));
        assert!(!p("/info*").matches("/inf"));
        assert!(p("*/sa/sleep").matches("cluster.local/ns/a/sa/sleep"));
        assert!(p("*").matches("x") && !p("*").matches(""));
        assert!(p("GET").matches("GET") && !p("GET").matches("get"));
        assert!(p("*.Example.com").matches_ignoring_case("api.example.COM"));
        assert!(!p("*.example.com").matches_ignoring_case("example.com"));
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        assert!(matches!(
            Pattern::parse("a*b"),
            Err(PatternError::Wildcard(_))
        ));
        assert!(matches!(
            Pattern::parse("*a*"),
            Err(PatternError::Wildcard(_))
        ));
    }

    /// The examples of Istio's `Operation.paths` reference, except where it contradicts
    /// Envoy's anchored match (see `templates_match_whole_paths`).
    #[test]
    fn path_templates_match_as_istio_documents() {
        assert!(t("/foo/{*}").matches("/foo/bar"));
        assert!(!t("/foo/{*}").matches("/foo/bar/baz"));
        assert!(!t("/foo/{*}").matches("/foo/"));
        assert!(t("/foo/{**}/").matches("/foo/bar/"));
        assert!(t("/foo/{**}/").matches("/foo//"));
        assert!(!t("/foo/{**}/").matches("/foo/bar"));
        assert!(t("/foo/{*}/bar/{**}").matches("/foo/buzz/bar/"));
        assert!(t("/foo/{*}/bar/{**}").matches("/foo/buzz/bar/baz"));
        assert!(t("/foo/{*}/bar/{**}").matches("/foo/buzz/bar/baz/qux"));
        assert!(!t("/foo/{*}/bar/{**}").matches("/foo/buzz/baz/"));
        for bad in [
            "/*/baz/{*}",
            "/**/baz/{*}",
            "/{**}/foo/{*}",
            "/foo/{*}.txt",
            "foo/{*}",
        ] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    /// Istio's reference lists `/foo/bar/baz.txt` as matching `/foo/{**}/`; Envoy, which does
    /// the matching, anchors the whole template (`RE2::FullMatch`), so it does not. isthmus
    /// follows Envoy.
    #[test]
    fn templates_match_whole_paths() {
        assert!(!t("/foo/{**}/").matches("/foo/bar/baz.txt"));
        assert!(t("/{**}").matches("/"));
        assert!(t("/{**}").matches("/a/b/c"));
        assert!(
            !t("/a/{*}").matches("/a/b?c"),
            "`?` is not a segment character"
        );
    }

    #[test]
    fn not_values_exclude() {
        let either = Either {
            values: vec![Pattern::parse("/admin*").unwrap()].into(),
            not_values: vec![Pattern::parse("/admin/public").unwrap()].into(),
        };
        assert!(strings_match(&either, Some("/admin/x")));
        assert!(!strings_match(&either, Some("/admin/public")));
        assert!(!strings_match(&either, None));
        let only_not = Either {
            values: Box::default(),
            not_values: vec![Pattern::Present].into(),
        };
        assert!(strings_match(&only_not, None), "absent is not any value");
        assert!(!strings_match(&only_not, Some("x")));
    }
}
