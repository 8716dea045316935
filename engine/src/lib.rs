//! The registry's sans-IO core: digests and media types, manifest validation, the metadata
//! state machine on column families, and the local blob store.
//!
//! Never: opens sockets, reads the wall clock, spawns tasks or picks random numbers — time,
//! ids and randomness come in as arguments (enforced by `clippy.toml`).

pub mod blob_store;
pub mod chunker;
pub mod digest;
pub mod iam;
pub mod keys;
pub mod kv;
pub mod limits;
pub mod manifest;
pub mod media;
pub mod mem_blobs;
pub mod name;
pub mod origin;
pub mod outbox;
pub mod policy;
pub mod state;

pub use digest::{Algorithm, Digest, DigestError};
pub use limits::Limits;
pub use name::{AccountId, NameError, Reference, RepoName, Tag};
