//! Istio's pod annotations, read as isthmus understands them. Where isthmus cannot do what an
//! annotation asks about capture (`traffic.sidecar.istio.io/*`), injection fails: ignoring it
//! would send traffic through (or around) the sidecar against the operator's stated wish.
//! Other `sidecar.istio.io/*` annotations isthmus has no use for are ignored with a warning.

use isthmus_init::plan::{CidrList, IpRanges, PortList, PortSet};
use serde_json::{Map, Value};

use super::{Quantities, Resources, TemplateError};

/// Istio's traffic annotations isthmus honours, and the isthmus-init flag each becomes.
pub const TRAFFIC_ANNOTATIONS: [(&str, &str); 5] = [
    (
        "traffic.sidecar.istio.io/includeInboundPorts",
        "--inbound-ports",
    ),
    (
        "traffic.sidecar.istio.io/excludeInboundPorts",
        "--exclude-inbound-ports",
    ),
    (
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        "--outbound-ip-ranges",
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "--exclude-outbound-ip-ranges",
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "--exclude-outbound-ports",
    ),
];

pub(super) const INJECT: &str = "sidecar.istio.io/inject";
const ISTIO_STATUS: &str = "sidecar.istio.io/status";
const PROXY_IMAGE: &str = "sidecar.istio.io/proxyImage";
const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
/// `"false"` leaves the app's probes as they are (see `probes`).
const REWRITE_PROBES: &str = "sidecar.istio.io/rewriteAppHTTPProbers";
/// Resource annotations: (annotation, requests or limits, cpu or memory).
const RESOURCE_ANNOTATIONS: [(&str, bool, bool); 4] = [
    ("sidecar.istio.io/proxyCPU", false, true),
    ("sidecar.istio.io/proxyMemory", false, false),
    ("sidecar.istio.io/proxyCPULimit", true, true),
    ("sidecar.istio.io/proxyMemoryLimit", true, false),
];

/// What a pod's annotations ask of its injection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PodOptions {
    /// isthmus-init's capture flags, `--flag=value`, in [`TRAFFIC_ANNOTATIONS`] order.
    pub capture_args: Vec<String>,
    pub proxy_resources: Resources,
    pub proxy_image: Option<String>,
    /// Rewrite the app's probes to go through the sidecar (default true).
    pub rewrite_probes: bool,
    pub warnings: Vec<String>,
}

/// `sidecar.istio.io/inject` from the template's annotations or labels (Istio reads both):
/// `Some(false)` to skip the pod, `None` when neither says.
pub(super) fn inject_wanted(
    annotations: &Map<String, Value>,
    labels: &Map<String, Value>,
) -> Result<Option<bool>, TemplateError> {
    for source in [labels, annotations] {
        if let Some(v) = source.get(INJECT) {
            let text = value_text(v);
            return match text.to_ascii_lowercase().as_str() {
                "true" | "y" | "yes" | "on" => Ok(Some(true)),
                "false" | "n" | "no" | "off" => Ok(Some(false)),
                _ => Err(bad(INJECT, &text, "expected \"true\" or \"false\"".into())),
            };
        }
    }
    Ok(None)
}

/// Reads every annotation that bears on injection.
pub(super) fn read(
    annotations: &Map<String, Value>,
    default_resources: &Resources,
) -> Result<PodOptions, TemplateError> {
    if annotations.contains_key(ISTIO_STATUS) {
        return Err(TemplateError::InjectedByIstio);
    }
    let mut options = PodOptions {
        capture_args: Vec::new(),
        proxy_resources: default_resources.clone(),
        proxy_image: None,
        rewrite_probes: true,
        warnings: Vec::new(),
    };
    for (annotation, flag) in TRAFFIC_ANNOTATIONS {
        if let Some(v) = annotations.get(annotation) {
            let text = value_text(v);
            let canonical = canonical_capture_value(flag, &text)
                .map_err(|reason| bad(annotation, &text, reason))?;
            options.capture_args.push(format!("{flag}={canonical}"));
        }
    }
    for (annotation, limit, cpu) in RESOURCE_ANNOTATIONS {
        if let Some(v) = annotations.get(annotation) {
            let text = value_text(v);
            if !is_quantity(&text) {
                return Err(bad(
                    annotation,
                    &text,
                    "not a Kubernetes quantity (e.g. 100m, 1, 64Mi)".into(),
                ));
            }
            let q: &mut Quantities = if limit {
                &mut options.proxy_resources.limits
            } else {
                &mut options.proxy_resources.requests
            };
            *if cpu { &mut q.cpu } else { &mut q.memory } = Some(text);
        }
    }
    if let Some(v) = annotations.get(PROXY_IMAGE) {
        options.proxy_image = Some(value_text(v));
    }
    if let Some(v) = annotations.get(INTERCEPTION_MODE) {
        let text = value_text(v);
        if text != "REDIRECT" {
            return Err(TemplateError::Unsupported {
                annotation: format!("{INTERCEPTION_MODE}={text}"),
                why: "isthmus-init captures with REDIRECT only",
            });
        }
    }
    if let Some(v) = annotations.get(REWRITE_PROBES) {
        let text = value_text(v);
        options.rewrite_probes = super::probes::rewrite_wanted(&text).ok_or_else(|| {
            bad(
                REWRITE_PROBES,
                &text,
                "expected \"true\" or \"false\"".into(),
            )
        })?;
    }
    for name in annotations.keys() {
        let known = name == INJECT
            || name == PROXY_IMAGE
            || name == REWRITE_PROBES
            || name == INTERCEPTION_MODE
            || TRAFFIC_ANNOTATIONS.iter().any(|(a, _)| a == name)
            || RESOURCE_ANNOTATIONS.iter().any(|(a, _, _)| a == name);
        if known {
            continue;
        }
        if name.starts_with("traffic.sidecar.istio.io/") {
            return Err(TemplateError::Unsupported {
                annotation: name.clone(),
                why: "it changes which traffic is captured and isthmus-init has no such option",
            });
        }
        if name.starts_with("sidecar.istio.io/")
            || name.starts_with("proxy.istio.io/")
            || name.starts_with("status.sidecar.istio.io/")
            || name.starts_with("readiness.status.sidecar.istio.io/")
        {
            options
                .warnings
                .push(format!("annotation {name} is ignored by isthmus"));
        }
    }
    Ok(options)
}

/// A Kubernetes resource quantity as the API server accepts it (no sign: resources are never
/// negative): a decimal number, then a binary (`Ki`…`Ei`) or decimal (`n u m k M G T P E`)
/// suffix or an exponent (`e3`).
pub(super) fn is_quantity(s: &str) -> bool {
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number_ok = number.bytes().any(|b| b.is_ascii_digit())
        && number.bytes().filter(|&b| b == b'.').count() <= 1;
    let suffix_ok = matches!(
        suffix,
        "" | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
            | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
        .is_some_and(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()));
    number_ok && suffix_ok
}

/// The value isthmus-init will be given, parsed with isthmus-init's own parsers (so a typo
/// fails here, not in a crash-looping init container) and written back canonically.
fn canonical_capture_value(flag: &str, text: &str) -> Result<String, String> {
    let join = |items: Vec<String>| items.join(",");
    let ports = |p: &[u16]| join(p.iter().map(u16::to_string).collect());
    let r = match flag {
        "--inbound-ports" => text.parse::<PortSet>().map(|s| match s {
            PortSet::All => "*".to_string(),
            PortSet::List(p) => ports(&p),
        }),
        "--outbound-ip-ranges" => text.parse::<IpRanges>().map(|r| match r {
            IpRanges::All => "*".to_string(),
            IpRanges::List(n) => join(n.iter().map(ToString::to_string).collect()),
        }),
        "--exclude-outbound-ip-ranges" => text
            .parse::<CidrList>()
            .map(|l| join(l.0.iter().map(ToString::to_string).collect())),
        _ => text.parse::<PortList>().map(|l| ports(&l.0)),
    };
    r.map_err(|e| e.to_string())
}

/// Annotation and label values are strings; a bare YAML `true` or `8080` is read as its text.
fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn bad(annotation: &str, value: &str, reason: String) -> TemplateError {
    TemplateError::BadAnnotation {
        annotation: annotation.into(),
        value: value.into(),
        reason,
    }
}
