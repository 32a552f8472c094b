//! spicegw's data plane, with no Python in it.
//!
//! A worker process runs [`worker::run`]: it receives certificate bundles
//! from the supervisor over a pipe ([`frame`]), checks them ([`bundle`],
//! [`pem`]) and serves them ([`tls`]) on its own SO_REUSEPORT listeners,
//! relaying each connection to its upstream ([`relay`], [`upstream`]) and
//! counting what happens ([`stats`]). The supervisor uses the same
//! [`bundle`] checks before it sends anything.

#![forbid(unsafe_code)]

pub mod bundle;
pub mod config;
pub mod frame;
pub mod key_kind;
pub mod pem;
pub mod proxy;
pub mod relay;
pub mod stats;
pub mod tickets;
pub mod tls;
pub mod tls_conn;
pub mod upstream;
pub mod worker;
