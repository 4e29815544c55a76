//! CORS (VirtualService `corsPolicy`, Envoy's CORS filter): a preflight from an allowed
//! origin is answered by the proxy; an actual request from one gets the `Access-Control-*`
//! response headers. Requests from other origins pass through untouched (a preflight from one
//! goes upstream, unless `unmatchedPreflights: IGNORE`, then it is answered without CORS
//! headers).

use isthmus_config::CorsPolicy;

use super::h1::Header;
use super::local::{header, Local};
use super::router::RequestView;
use crate::telemetry::ResponseFlag;

/// What the CORS policy does with a request.
pub enum Cors {
    /// Not a CORS request, or an origin the policy does not allow: nothing to add.
    None,
    /// Answer this preflight locally.
    Preflight(Local),
    /// An allowed actual request: add these headers to its response.
    Allowed(Vec<Header>),
}

/// Applies `policy` to a request.
pub fn check(policy: &CorsPolicy, req: &RequestView<'_>) -> Cors {
    let Some(origin) = req.header("origin") else {
        return Cors::None;
    };
    let allowed = policy.allow_origins.iter().any(|o| o.matches(origin));
    let preflight = req.method.eq_ignore_ascii_case("OPTIONS")
        && req.header("access-control-request-method").is_some();
    match (preflight, allowed) {
        (true, true) => {
            let mut local = Local::new(200, Vec::new(), ResponseFlag::None);
            local
                .headers
                .push(header("access-control-allow-origin", origin.as_bytes()));
            let list = |values: &[String]| values.join(",");
            if !policy.allow_methods.is_empty() {
                local.headers.push(header(
                    "access-control-allow-methods",
                    list(&policy.allow_methods).as_bytes(),
                ));
            }
            if !policy.allow_headers.is_empty() {
                local.headers.push(header(
                    "access-control-allow-headers",
                    list(&policy.allow_headers).as_bytes(),
                ));
            }
            if let Some(age) = policy.max_age {
                local.headers.push(header(
                    "access-control-max-age",
                    age.as_secs().to_string().as_bytes(),
                ));
            }
            if policy.allow_credentials == Some(true) {
                local
                    .headers
                    .push(header("access-control-allow-credentials", b"true"));
            }
            Cors::Preflight(local)
        }
        (true, false) if !policy.unmatched_preflights_forward => {
            Cors::Preflight(Local::new(200, Vec::new(), ResponseFlag::None))
        }
        (false, true) => {
            let mut headers = vec![header("access-control-allow-origin", origin.as_bytes())];
            if !policy.expose_headers.is_empty() {
                headers.push(header(
                    "access-control-expose-headers",
                    policy.expose_headers.join(",").as_bytes(),
                ));
            }
            if policy.allow_credentials == Some(true) {
                headers.push(header("access-control-allow-credentials", b"true"));
            }
            Cors::Allowed(headers)
        }
        _ => Cors::None,
    }
}
