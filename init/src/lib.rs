//! isthmus-init: installs the nat-table REDIRECT rules that send a pod's TCP
//! through the isthmus sidecar (inbound to 15006, outbound to 15001), in the
//! manner of Istio's istio-iptables.
//!
//! The library is split so that everything that decides *what* to install is
//! pure and unit-tested ([`plan`], [`rules`], [`backend`]), and the only code
//! that touches the kernel is the small [`apply`] step.

pub mod apply;
pub mod backend;
pub mod plan;
pub mod rules;

pub use apply::{cleanup, dry_run, install, ApplyError, Exec, Options, Report, SystemExec};
pub use backend::{Backend, BackendChoice};
pub use plan::{Family, IpNet, IpRanges, Plan, PlanError, PortSet};
pub use rules::{cleanup_rules, install_rules, parse_existing, Existing};
