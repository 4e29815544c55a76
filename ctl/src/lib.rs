//! isthmus-ctl: the controller side of isthmus. For now: the local mesh (pods as network
//! namespaces), the kubelet-style config writer it uses, the built-in test app, offline
//! validation, sidecar injection ([`inject`]) and the Kubernetes controller ([`controller`]), which
//! writes the same ServiceEntry documents the local mesh writes.

pub mod app;
pub mod configmap;
pub mod controller;
pub mod inject;
pub mod install;
pub mod local;
pub mod netns;
pub mod proxy_status;
pub mod seccomp;
