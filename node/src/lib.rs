//! The `portolan` node: configuration, the region's Raft group on RocksDB, the registry behind
//! the HTTP API, metrics, and the server lifecycle.

pub mod admin_client;
pub mod auth;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod dev_cluster;
pub mod drill;
pub mod ecr;
pub mod georep;
pub mod listener;
pub mod peer;
pub mod raft;
pub mod registry;
pub mod rt;
pub mod server;
pub mod transport;

pub use config::Config;
pub use registry::{NodeRegistry, Platform, Production};
pub use server::Node;
