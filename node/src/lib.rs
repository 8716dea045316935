//! The `portolan` node: configuration, the region's Raft group on RocksDB, the registry behind
//! the HTTP API, metrics, and the server lifecycle.

pub mod clock;
pub mod config;
pub mod raft;
pub mod registry;
pub mod server;

pub use config::Config;
pub use server::Node;
