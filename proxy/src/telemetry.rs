//! Who this proxy is, and the Istio label sets it reports connections under.

use std::sync::Arc;

use isthmus_config::{Cluster, Endpoint, Service};

use crate::metrics::{TcpLabels, Value};

/// The workload this sidecar fronts, from flags or the pod's downward-API environment.
#[derive(Debug, Clone)]
pub struct Identity {
    pub workload: Value,
    pub namespace: Value,
    pub app: Value,
    pub version: Value,
    pub cluster: Value,
}

/// Envoy's response flags, the vocabulary Istio users already read (see docs/OPERATIONS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlag {
    None,
    /// Upstream connection failure: every endpoint tried refused or timed out.
    UpstreamConnectFailure,
    /// No healthy upstream: the cluster has no endpoints.
    NoHealthyUpstream,
    /// No route: the destination is not in the registry and the policy is REGISTRY_ONLY, or
    /// no VirtualService `http` rule matches the request.
    NoRoute,
    /// Upstream overflow: a circuit breaker (`connectionPool` limit) refused the request.
    UpstreamOverflow,
    /// Upstream retry limit exceeded: the last retriable failure was returned.
    UpstreamRetryLimitExceeded,
    /// Upstream request timeout: the route's `timeout` (or a per-try timeout) passed.
    UpstreamRequestTimeout,
    /// Downstream connection termination: the client went away mid-request.
    DownstreamConnectionTermination,
    /// Upstream connection termination: the upstream closed before a complete response.
    UpstreamConnectionTermination,
    /// Local reset: the proxy reset the stream (a malformed message, a bound).
    LocalReset,
    /// Upstream remote reset: the upstream reset the connection.
    UpstreamRemoteReset,
    /// Downstream protocol error: the client's message broke HTTP framing.
    DownstreamProtocolError,
    /// Fault injection abort.
    FaultInjected,
    /// Fault injection delay.
    DelayInjected,
    /// Retries ran out on failures that produced no response: Envoy's `UF,URX`, `UT,URX`,
    /// `UC,URX`, `UR,URX` (the failure's flag, then retry limit exceeded).
    RetriesExhausted(Exhausted),
}

/// The failure that retries ran out on (see [`ResponseFlag::RetriesExhausted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    ConnectFailure,
    Timeout,
    ConnectionTermination,
    RemoteReset,
}

impl ResponseFlag {
    /// This failure's flag once retries have run out on it (Envoy adds `URX`).
    pub fn retries_exhausted(self) -> ResponseFlag {
        let failure = match self {
            ResponseFlag::UpstreamConnectFailure => Exhausted::ConnectFailure,
            ResponseFlag::UpstreamRequestTimeout => Exhausted::Timeout,
            ResponseFlag::UpstreamConnectionTermination => Exhausted::ConnectionTermination,
            ResponseFlag::UpstreamRemoteReset => Exhausted::RemoteReset,
            other => return other,
        };
        ResponseFlag::RetriesExhausted(failure)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::UpstreamConnectFailure => "UF",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::LocalReset => "LR",
            ResponseFlag::UpstreamRemoteReset => "UR",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::RetriesExhausted(Exhausted::ConnectFailure) => "UF,URX",
            ResponseFlag::RetriesExhausted(Exhausted::Timeout) => "UT,URX",
            ResponseFlag::RetriesExhausted(Exhausted::ConnectionTermination) => "UC,URX",
            ResponseFlag::RetriesExhausted(Exhausted::RemoteReset) => "UR,URX",
        }
    }
}

fn v(s: &str) -> Value {
    Arc::from(s)
}

fn unknown() -> Value {
    v("unknown")
}

fn label_or_unknown(endpoint: Option<&Endpoint>, key: &str) -> Value {
    endpoint
        .and_then(|e| e.labels.get_shared(key))
        .cloned()
        .unwrap_or_else(unknown)
}

impl Identity {
    fn base(&self, reporter: &str) -> TcpLabels {
        TcpLabels {
            reporter: v(reporter),
            source_workload: unknown(),
            source_canonical_service: unknown(),
            source_canonical_revision: v("latest"),
            source_workload_namespace: unknown(),
            source_principal: unknown(),
            source_app: unknown(),
            source_version: unknown(),
            source_cluster: unknown(),
            destination_workload: unknown(),
            destination_workload_namespace: unknown(),
            destination_principal: unknown(),
            destination_app: unknown(),
            destination_version: unknown(),
            destination_service: unknown(),
            destination_canonical_service: unknown(),
            destination_canonical_revision: v("latest"),
            destination_service_name: unknown(),
            destination_service_namespace: unknown(),
            destination_cluster: unknown(),
            request_protocol: v("tcp"),
            response_flags: v("-"),
            connection_security_policy: unknown(),
        }
    }

    fn as_source(&self, labels: &mut TcpLabels) {
        labels.source_workload = self.workload.clone();
        labels.source_canonical_service = self.app.clone();
        labels.source_workload_namespace = self.namespace.clone();
        labels.source_app = self.app.clone();
        labels.source_version = self.version.clone();
        labels.source_cluster = self.cluster.clone();
    }

    /// Labels for an outbound connection to a registry service (reporter="source").
    pub fn outbound(
        &self,
        service: &Service,
        cluster: &Cluster,
        endpoint: Option<&Endpoint>,
        flag: ResponseFlag,
    ) -> TcpLabels {
        let mut l = self.base("source");
        self.as_source(&mut l);
        l.destination_service = service.hosts[0].clone();
        l.destination_service_name = cluster.service_name.clone();
        l.destination_service_namespace = cluster.service_namespace.clone();
        l.destination_workload = label_or_unknown(endpoint, "isthmus.io/workload");
        l.destination_workload_namespace = if endpoint.is_some() {
            cluster.service_namespace.clone()
        } else {
            unknown()
        };
        l.destination_app = label_or_unknown(endpoint, "app");
        l.destination_canonical_service = l.destination_app.clone();
        l.destination_version = label_or_unknown(endpoint, "version");
        l.destination_cluster = if endpoint.is_some() {
            self.cluster.clone()
        } else {
            unknown()
        };
        l.response_flags = v(flag.as_str());
        l
    }

    /// Labels for outbound traffic outside the registry: Istio's PassthroughCluster and
    /// BlackHoleCluster.
    pub fn outbound_unregistered(&self, name: &str, flag: ResponseFlag) -> TcpLabels {
        let mut l = self.base("source");
        self.as_source(&mut l);
        l.destination_service = v(name);
        l.destination_service_name = v(name);
        l.response_flags = v(flag.as_str());
        l
    }

    /// Fills the `source_*` labels of an inbound label set from the registry's endpoint at the
    /// peer's address (Istio learns them by metadata exchange; the registry already knows).
    pub fn with_source(labels: &mut TcpLabels, source: Option<(&Endpoint, &Value)>) {
        let Some((endpoint, namespace)) = source else {
            return;
        };
        let label = |key: &str| endpoint.labels.get_shared(key).cloned();
        if let Some(workload) = label("isthmus.io/workload") {
            labels.source_workload = workload;
        }
        if let Some(app) = label("app") {
            labels.source_app = app.clone();
            labels.source_canonical_service = app;
        }
        if let Some(version) = label("version") {
            labels.source_version = version;
        }
        labels.source_workload_namespace = namespace.clone();
        // `source_principal` stays unknown: it is the peer's authenticated identity (mTLS).
    }

    /// Labels for an inbound connection to this workload (reporter="destination").
    pub fn inbound(&self, flag: ResponseFlag) -> TcpLabels {
        let mut l = self.base("destination");
        l.destination_workload = self.workload.clone();
        l.destination_workload_namespace = self.namespace.clone();
        l.destination_app = self.app.clone();
        l.destination_canonical_service = self.app.clone();
        l.destination_version = self.version.clone();
        l.destination_cluster = self.cluster.clone();
        l.destination_service_namespace = self.namespace.clone();
        l.response_flags = v(flag.as_str());
        l.connection_security_policy = v("none");
        l
    }
}
