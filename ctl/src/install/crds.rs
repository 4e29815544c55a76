//! The CustomResourceDefinitions of the Istio kinds the controller reads, for clusters without
//! Istio. Names, groups, versions, plurals and short names are Istio's, so users' existing YAML
//! and `kubectl get vs` work unchanged and a later Istio install finds the same CRDs.
//!
//! The schema is structural but does not describe `spec`: `spec` is an object whose unknown
//! fields are preserved, and the controller validates it with isthmus-config's strict parser
//! (the same one each sidecar runs) and reports an invalid resource as an Event naming the
//! field. Why not a schema derived from the wire types: the API server *prunes* fields a
//! structural schema does not list, silently unless the client asks for strict field
//! validation — an Istio field isthmus does not implement would vanish instead of being
//! reported — and it would change with every field isthmus learns, while a CRD is cluster-wide
//! and outlives upgrades. docs/INSTALL.md says the same.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionNames, CustomResourceDefinitionSpec,
    CustomResourceDefinitionVersion, CustomResourceSubresourceStatus, CustomResourceSubresources,
    CustomResourceValidation, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// An Istio kind: group, kind, plural, short names and the versions Istio serves (the first is
/// the storage version).
pub struct IstioKind {
    pub group: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub short_names: &'static [&'static str],
    pub versions: &'static [&'static str],
}

pub const NETWORKING: &str = "networking.istio.io";
pub const SECURITY: &str = "security.istio.io";
const NETWORKING_VERSIONS: &[&str] = &["v1", "v1beta1", "v1alpha3"];
const SECURITY_VERSIONS: &[&str] = &["v1", "v1beta1"];

/// The kinds the controller reads (the security ones are parsed from issue 9 on).
pub const KINDS: &[IstioKind] = &[
    IstioKind {
        group: NETWORKING,
        kind: "VirtualService",
        plural: "virtualservices",
        short_names: &["vs"],
        versions: NETWORKING_VERSIONS,
    },
    IstioKind {
        group: NETWORKING,
        kind: "DestinationRule",
        plural: "destinationrules",
        short_names: &["dr"],
        versions: NETWORKING_VERSIONS,
    },
    IstioKind {
        group: NETWORKING,
        kind: "ServiceEntry",
        plural: "serviceentries",
        short_names: &["se"],
        versions: NETWORKING_VERSIONS,
    },
    IstioKind {
        group: NETWORKING,
        kind: "Sidecar",
        plural: "sidecars",
        short_names: &[],
        versions: NETWORKING_VERSIONS,
    },
    IstioKind {
        group: SECURITY,
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        short_names: &["pa"],
        versions: SECURITY_VERSIONS,
    },
    IstioKind {
        group: SECURITY,
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        short_names: &["ap"],
        versions: SECURITY_VERSIONS,
    },
];

impl IstioKind {
    /// `<plural>.<group>`, the CRD's name.
    pub fn crd_name(&self) -> String {
        format!("{}.{}", self.plural, self.group)
    }
}

/// One CRD per kind in [`KINDS`].
pub fn all() -> Vec<CustomResourceDefinition> {
    KINDS.iter().map(crd).collect()
}

fn crd(kind: &IstioKind) -> CustomResourceDefinition {
    let category = format!(
        "{}-istio-io",
        kind.group.split('.').next().unwrap_or_default()
    );
    CustomResourceDefinition {
        metadata: ObjectMeta {
            name: Some(kind.crd_name()),
            labels: Some(super::labels("crds")),
            ..ObjectMeta::default()
        },
        spec: CustomResourceDefinitionSpec {
            group: kind.group.into(),
            names: CustomResourceDefinitionNames {
                kind: kind.kind.into(),
                list_kind: Some(format!("{}List", kind.kind)),
                plural: kind.plural.into(),
                singular: Some(kind.kind.to_lowercase()),
                short_names: (!kind.short_names.is_empty())
                    .then(|| kind.short_names.iter().map(|s| s.to_string()).collect()),
                categories: Some(vec!["istio-io".into(), category]),
            },
            scope: "Namespaced".into(),
            // Every version has the same schema, so the API server converts between them by
            // changing apiVersion alone (conversion strategy None, its default).
            versions: kind
                .versions
                .iter()
                .enumerate()
                .map(|(i, version)| CustomResourceDefinitionVersion {
                    name: version.to_string(),
                    served: true,
                    storage: i == 0,
                    schema: Some(CustomResourceValidation {
                        open_api_v3_schema: Some(schema(kind)),
                    }),
                    subresources: Some(CustomResourceSubresources {
                        status: Some(CustomResourceSubresourceStatus(serde_json::json!({}))),
                        ..CustomResourceSubresources::default()
                    }),
                    ..CustomResourceDefinitionVersion::default()
                })
                .collect(),
            ..CustomResourceDefinitionSpec::default()
        },
        status: None,
    }
}

/// `{spec: object (any fields), status: object (any fields)}`: structural, honest about
/// validation happening in the controller.
fn schema(kind: &IstioKind) -> JSONSchemaProps {
    let open_object = |description: String| JSONSchemaProps {
        type_: Some("object".into()),
        x_kubernetes_preserve_unknown_fields: Some(true),
        description: Some(description),
        ..JSONSchemaProps::default()
    };
    JSONSchemaProps {
        type_: Some("object".into()),
        properties: Some(BTreeMap::from([
            (
                "spec".to_string(),
                open_object(format!(
                    "Istio's {} spec. Validated by the isthmus controller, which reports an \
                     invalid resource as an Event and leaves it out of the sidecars' config.",
                    kind.kind
                )),
            ),
            (
                "status".to_string(),
                open_object("Written by the controller.".into()),
            ),
        ])),
        ..JSONSchemaProps::default()
    }
}
