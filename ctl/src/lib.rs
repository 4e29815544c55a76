//! isthmus-ctl: the controller side of isthmus. For now: the local mesh (pods as network
//! namespaces), the kubelet-style config writer it uses, the built-in test app, offline
//! validation, and sidecar injection ([`inject`]). The Kubernetes controller arrives as its own
//! milestone and will write the same ConfigMap documents the local mesh writes.

pub mod app;
pub mod configmap;
pub mod inject;
pub mod local;
pub mod netns;
pub mod seccomp;
