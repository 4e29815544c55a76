//! isthmus-proxy: the sidecar.
//!
//! A connection's path through the modules: [`listen`] (accept, connection cap, original
//! destination) → [`detect`] (protocol, prefix read once) → [`policy`] (admit: fail closed,
//! later authorization) → [`route`] (service, route, cluster from the snapshot) → [`balance`]
//! (endpoint) → [`connect`] (dial within a deadline; TLS later) → [`relay`] (bytes both ways,
//! bounded) → outcome recorded once ([`telemetry`], [`metrics`]); [`serve`] strings them
//! together. Around them: [`state`] (snapshot store), [`watch`] (config watcher thread),
//! [`drain`] (the shutdown signal), [`admin`] (with [`app_probe`], the app's probes run for the
//! kubelet), [`identity`] (the workload certificate from the mesh CA), [`process`] and
//! [`runtime`] (io_uring or epoll, thread-per-core); [`wait`] is the `isthmus-proxy wait`
//! command.

pub mod admin;
pub mod app_probe;
pub mod balance;
pub mod breaker;
pub mod connect;
pub mod detect;
pub mod dns;
pub mod drain;
pub mod http;
pub mod identity;
pub mod listen;
pub mod metrics;
pub mod outlier;
pub mod policy;
pub mod process;
pub mod relay;
pub mod route;
pub mod runtime;
pub mod serve;
pub mod state;
pub mod telemetry;
pub mod wait;
pub mod watch;

#[cfg(test)]
mod test_support;

mod args;
mod run;

pub use args::{Args, Command, LogFormat};
pub use run::{run, RunError};
