//! One pod template: what is injected into it, exactly.

use serde_json::{json, Map, Value};

use super::annotations::{self, PodOptions};
use super::probes;
use super::{array_at, object_at, shape, InjectConfig, Quantities, Resources, TemplateError};

pub const INIT_NAME: &str = "isthmus-init";
pub const PROXY_NAME: &str = "isthmus-proxy";
/// The ConfigMap volume (whole directory, never `subPath`: a subPath mount never updates).
pub const CONFIG_VOLUME: &str = "isthmus-config";
pub const CONFIG_MOUNT: &str = "/etc/isthmus/config";
/// The projected service-account token the sidecar will present to the CA (issue 8 item 2;
/// not read yet).
pub const TOKEN_VOLUME: &str = "isthmus-token";
pub const TOKEN_MOUNT: &str = "/var/run/secrets/isthmus/tokens";
pub const PROXY_UID: u32 = 1337;
/// Set on every injected pod: what was injected, by which isthmus version.
pub const STATUS_ANNOTATION: &str = "sidecar.isthmus.io/status";
const READINESS_PORT: u16 = 15021;
const STATS_PORT: u16 = 15020;
const STATS_PATH: &str = "/stats/prometheus";
/// The classic sidecar's postStart hook: `isthmus-proxy wait` with Istio's 60 s bound; past it
/// the hook fails and the kubelet restarts the sidecar (event FailedPostStartHook).
const WAIT_COMMAND: [&str; 4] = [
    "/usr/local/bin/isthmus-proxy",
    "wait",
    "--timeout-secs",
    "60",
];
/// Token lifetime; the kubelet renews it at 80 %.
const TOKEN_SECONDS: u64 = 43_200;

/// The workload name the sidecar reports (Istio's `source_workload`): a controller's name is
/// known when its template is injected; a bare Pod's comes from the downward API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    Named(String),
    PodName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected {
        warnings: Vec<String>,
    },
    /// Left unchanged, and why.
    Skipped(String),
}

/// Injects `template` (an object with `metadata` and `spec`) in place.
pub(super) fn inject(
    template: &mut Value,
    workload: &Workload,
    config: &InjectConfig,
) -> Result<Outcome, TemplateError> {
    let t = template
        .as_object_mut()
        .ok_or_else(|| shape("", "an object"))?;
    let annotations = read_map(t, "annotations")?;
    let labels = read_map(t, "labels")?;
    if annotations::inject_wanted(&annotations, &labels)? == Some(false) {
        return Ok(Outcome::Skipped(format!(
            "{} is \"false\"",
            annotations::INJECT
        )));
    }
    if t.get("spec").and_then(|s| s.get("hostNetwork")) == Some(&Value::Bool(true)) {
        // Capture rules would be installed in the node's network namespace.
        return Ok(Outcome::Skipped("the pod uses hostNetwork".into()));
    }
    let options = annotations::read(&annotations, &config.proxy_resources)?;
    let mut warnings = options.warnings.clone();

    let spec = object_at(t, "spec", "spec")?;
    // The app's own probes first, from the earlier sidecar, before it is removed.
    let stored = probes::stored(spec);
    probes::restore(spec, &stored);
    remove_injected(spec)?;
    let app_probers = if options.rewrite_probes {
        probes::rewrite(spec, &mut warnings)
    } else {
        Map::new()
    };
    let mut proxy = proxy_container(config, &options, workload, &labels);
    if !app_probers.is_empty() {
        add_app_probers(&mut proxy, &app_probers);
    }
    let init = init_container(config, &options);
    let app_init: Vec<String> = names(spec.get("initContainers"));
    let init_containers = array_at(spec, "initContainers", "spec.initContainers")?;
    init_containers.insert(0, init);
    if config.native_sidecar {
        init_containers.insert(1, proxy);
    } else {
        if !app_init.is_empty() {
            warnings.push(format!(
                "init containers {} run after capture is installed but before the sidecar \
                 starts, so their outbound TCP fails: use native sidecars (Kubernetes ≥ 1.29), \
                 or exclude their destinations with traffic.sidecar.istio.io annotations",
                app_init.join(", ")
            ));
        }
        array_at(spec, "containers", "spec.containers")?.insert(0, proxy);
    }
    let volumes = array_at(spec, "volumes", "spec.volumes")?;
    volumes.push(config_volume(config));
    volumes.push(json!({"name": TOKEN_VOLUME, "projected": {"sources": [{
        "serviceAccountToken": {
            "audience": config.token_audience,
            "expirationSeconds": TOKEN_SECONDS,
            "path": "token",
        }
    }]}}));
    let app_container = names(spec.get("containers"))
        .into_iter()
        .find(|n| n != PROXY_NAME);

    let metadata = object_at(t, "metadata", "metadata")?;
    let annotations = object_at(metadata, "annotations", "metadata.annotations")?;
    for (key, value) in [
        ("prometheus.io/scrape", "true".to_string()),
        ("prometheus.io/port", STATS_PORT.to_string()),
        ("prometheus.io/path", STATS_PATH.to_string()),
    ] {
        match annotations.get(key).and_then(Value::as_str) {
            None => {
                annotations.insert(key.into(), Value::String(value));
            }
            Some(theirs) if theirs != value => warnings.push(format!(
                "annotation {key}={theirs:?} is kept (it scrapes the app): the sidecar's \
                 metrics on :{STATS_PORT}{STATS_PATH} are not scraped through these annotations"
            )),
            Some(_) => {}
        }
    }
    // `kubectl logs` and `exec` pick the first container otherwise, the sidecar in classic mode.
    if let Some(app) = app_container {
        annotations
            .entry("kubectl.kubernetes.io/default-container")
            .or_insert(Value::String(app));
    }
    annotations.insert(STATUS_ANNOTATION.into(), Value::String(status(config)));
    Ok(Outcome::Injected { warnings })
}

/// Drops what an earlier injection added, so injecting again gives the same result.
fn remove_injected(spec: &mut Map<String, Value>) -> Result<(), TemplateError> {
    let ours = |names: &[&str], v: &Value| {
        v.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| names.contains(&n))
    };
    for (key, names) in [
        ("initContainers", &[INIT_NAME, PROXY_NAME][..]),
        ("containers", &[PROXY_NAME][..]),
        ("volumes", &[CONFIG_VOLUME, TOKEN_VOLUME][..]),
    ] {
        if let Some(list) = spec.get_mut(key) {
            if !list.is_null() {
                list.as_array_mut()
                    .ok_or_else(|| shape(&format!("spec.{key}"), "a list"))?
                    .retain(|c| !ours(names, c));
            }
        }
    }
    Ok(())
}

/// The sidecar's config directory: routing and every registry shard as one projected volume.
/// The kubelet writes a projected volume as one generation (one `..data` swap), so the sidecar
/// never sees routing from one update and the registry from another, nor half of a re-split
/// registry; the ConfigMaps are written apart (endpoints churn more than routes). Every source
/// is optional: the shards beyond the registry's current split do not exist, and a pod may
/// start before the controller has written its namespace.
fn config_volume(config: &InjectConfig) -> Value {
    let sources: Vec<Value> = std::iter::once(config.config_map.clone())
        .chain(crate::controller::split::shard_config_maps(
            &config.registry_config_map,
        ))
        .map(|name| json!({"configMap": {"name": name, "optional": true}}))
        .collect();
    json!({"name": CONFIG_VOLUME, "projected": {"sources": sources}})
}

fn init_container(config: &InjectConfig, options: &PodOptions) -> Value {
    let mut args = vec![
        format!("--proxy-uid={PROXY_UID}"),
        format!("--proxy-gid={PROXY_UID}"),
    ];
    args.extend(options.capture_args.iter().cloned());
    let mut c = json!({
        "name": INIT_NAME,
        "image": config.init_image(),
        "args": args,
        "resources": resources(&config.init_resources),
        "securityContext": {
            // iptables needs root and these two capabilities, nothing else. The root filesystem
            // stays writable: iptables-legacy takes its lock in /run/xtables.lock (Istio's
            // istio-init does the same).
            "allowPrivilegeEscalation": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "privileged": false,
            "readOnlyRootFilesystem": false,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "runAsUser": 0,
        },
        // isthmus-init's error (what to check) shows in `kubectl describe pod`.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    pull_policy(&mut c, config);
    c
}

/// The sidecar. (The app's probes that go through it: [`probes`].)
fn proxy_container(
    config: &InjectConfig,
    options: &PodOptions,
    workload: &Workload,
    labels: &Map<String, Value>,
) -> Value {
    let field = |path: &str| json!({"fieldRef": {"apiVersion": "v1", "fieldPath": path}});
    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": field("metadata.name")}),
        json!({"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")}),
        json!({"name": "SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")}),
        match workload {
            Workload::Named(name) => json!({"name": "ISTHMUS_WORKLOAD", "value": name}),
            Workload::PodName => {
                json!({"name": "ISTHMUS_WORKLOAD", "valueFrom": field("metadata.name")})
            }
        },
    ];
    // From the pod's labels when the template has them; otherwise the proxy's `unknown` (the
    // downward API would give an empty string for a missing label).
    for (var, label) in [("ISTHMUS_APP", "app"), ("ISTHMUS_APP_VERSION", "version")] {
        if labels.contains_key(label) {
            let path = format!("metadata.labels['{label}']");
            env.push(json!({"name": var, "valueFrom": field(&path)}));
        }
    }
    if let Some(cluster) = &config.cluster {
        env.push(json!({"name": "ISTHMUS_CLUSTER", "value": cluster}));
    }
    env.push(json!({"name": "ISTHMUS_CONFIG_DIR", "value": CONFIG_MOUNT}));
    // The CA's TLS root is the config directory's `trust-bundle.pem` (the sidecar's default).
    if !config.ca_address.is_empty() {
        env.push(json!({"name": "ISTHMUS_CA_ADDRESS", "value": config.ca_address}));
    }
    let probe = |period: u32, failures: u32| {
        json!({
            "httpGet": {"path": "/healthz/ready", "port": READINESS_PORT},
            "periodSeconds": period,
            "timeoutSeconds": 3,
            "failureThreshold": failures,
        })
    };
    let mut c = json!({
        "name": PROXY_NAME,
        "image": options.proxy_image.clone().unwrap_or_else(|| config.proxy_image()),
        "env": env,
        "ports": [{"name": "isthmus-stats", "containerPort": STATS_PORT, "protocol": "TCP"}],
        // Ready once listeners are bound and a config is loaded; the app containers (native
        // sidecar) start only then. Up to 10 minutes, checked every second.
        "startupProbe": probe(1, 600),
        "readinessProbe": probe(15, 4),
        "resources": resources(&options.proxy_resources),
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "runAsUser": PROXY_UID,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT, "readOnly": true},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT, "readOnly": true},
        ],
    });
    if config.native_sidecar {
        c["restartPolicy"] = json!("Always");
    } else {
        // Kubernetes starts a pod's containers in order but waits between them only for a
        // postStart hook: this one returns once the proxy is ready, so the app (the next
        // container) never starts before its mesh does.
        c["lifecycle"] = json!({"postStart": {"exec": {"command": WAIT_COMMAND}}});
    }
    pull_policy(&mut c, config);
    c
}

/// The originals of the app's rewritten probes, and the pod IP they are sent to (where the
/// kubelet would have sent them).
fn add_app_probers(proxy: &mut Value, probers: &Map<String, Value>) {
    let Some(env) = proxy["env"].as_array_mut() else {
        return;
    };
    env.push(json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}}));
    env.push(
        json!({"name": probes::PROBERS_ENV, "value": Value::Object(probers.clone()).to_string()}),
    );
}

fn resources(r: &Resources) -> Value {
    let q = |q: &Quantities| {
        let mut m = Map::new();
        if let Some(cpu) = &q.cpu {
            m.insert("cpu".into(), json!(cpu));
        }
        if let Some(memory) = &q.memory {
            m.insert("memory".into(), json!(memory));
        }
        m
    };
    let mut out = Map::new();
    for (key, m) in [("requests", q(&r.requests)), ("limits", q(&r.limits))] {
        if !m.is_empty() {
            out.insert(key.into(), Value::Object(m));
        }
    }
    Value::Object(out)
}

fn pull_policy(container: &mut Value, config: &InjectConfig) {
    if let Some(p) = &config.image_pull_policy {
        container["imagePullPolicy"] = json!(p);
    }
}

fn status(config: &InjectConfig) -> String {
    let (init, containers): (&[&str], &[&str]) = if config.native_sidecar {
        (&[INIT_NAME, PROXY_NAME], &[])
    } else {
        (&[INIT_NAME], &[PROXY_NAME])
    };
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "initContainers": init,
        "containers": containers,
        "volumes": [CONFIG_VOLUME, TOKEN_VOLUME],
    })
    .to_string()
}

/// `metadata.<key>` of the template, read without creating it.
fn read_map(t: &Map<String, Value>, key: &str) -> Result<Map<String, Value>, TemplateError> {
    match t.get("metadata").and_then(|m| m.get(key)) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(_) => Err(shape(&format!("metadata.{key}"), "an object")),
    }
}

fn names(list: Option<&Value>) -> Vec<String> {
    list.and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(|c| c.get("name").and_then(Value::as_str).map(String::from))
                .collect()
        })
        .unwrap_or_default()
}
