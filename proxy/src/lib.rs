//! isthmus-proxy: the sidecar.
//!
//! A connection's path through the modules: [`listen`] (accept, original destination) →
//! [`route`] (service, route, cluster from the snapshot) → [`balance`] (endpoint) → connect →
//! [`relay`] (bytes both ways) → outcome recorded once ([`telemetry`], [`metrics`]); [`serve`]
//! strings them together. Around them: [`state`] (snapshot store and watcher), [`admin`], and
//! [`runtime`] (io_uring or epoll, thread-per-core).

pub mod admin;
pub mod balance;
pub mod listen;
pub mod metrics;
pub mod relay;
pub mod route;
pub mod runtime;
pub mod serve;
pub mod state;
pub mod telemetry;

mod args;
mod run;

pub use args::{Args, LogFormat};
pub use run::{run, RunError};
