//! openraft wiring: the region's metadata Raft group.
//!
//! Owns: the type configuration (what an entry carries and what applying it answers), the log
//! store and the state machine on the `KvStore` seam, the peer network.
//! Never: interprets commands — `engine::state` does, deterministically.

// openraft fixes the storage error type (224 bytes); the storage traits return it everywhere.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod state_machine;

use std::io::Cursor;

use engine::state::{Command, Outcome};
use serde::{Deserialize, Serialize};

/// What a Raft entry carries: a versioned command envelope, so a node can read entries
/// written by an older version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    V1(Command),
}

/// What applying an entry answers to the proposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Blank and membership entries.
    None,
    Outcome(Outcome),
}

/// How to reach a member of the region: its HTTP (clients, admin) and QUIC (peers)
/// addresses. Stored in the Raft membership, so every node knows every other.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub http: String,
    /// Empty for a single node without peer transport.
    pub quic: String,
}

impl std::fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http={} quic={}", self.http, self.quic)
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = crate::rt::NodeRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StorageIOError = openraft::StorageIOError<NodeId>;

/// Serialisation of everything Raft persists (entries, vote, membership, snapshots).
pub(crate) fn to_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("raft types always serialize")
}

pub(crate) fn from_bytes<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(b)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use engine::kv::{MemKv, RocksKv};
    use openraft::testing::{StoreBuilder, Suite};

    use super::log_store::LogStore;
    use super::state_machine::StateMachine;
    use super::{StorageError, TypeConfig};

    struct RocksBuilder;

    impl StoreBuilder<TypeConfig, LogStore<RocksKv>, StateMachine<RocksKv>, tempfile::TempDir>
        for RocksBuilder
    {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore<RocksKv>, StateMachine<RocksKv>), StorageError>
        {
            let dir = tempfile::tempdir().expect("tempdir");
            let kv = Arc::new(RocksKv::open(dir.path()).expect("open rocksdb"));
            Ok((
                dir,
                LogStore::new(kv.clone()),
                StateMachine::new(kv, "test"),
            ))
        }
    }

    struct MemBuilder;

    impl StoreBuilder<TypeConfig, LogStore<MemKv>, StateMachine<MemKv>> for MemBuilder {
        async fn build(&self) -> Result<((), LogStore<MemKv>, StateMachine<MemKv>), StorageError> {
            let kv = Arc::new(MemKv::new());
            Ok(((), LogStore::new(kv.clone()), StateMachine::new(kv, "test")))
        }
    }

    /// openraft's own conformance suite for log storage and state machines.
    #[test]
    fn openraft_storage_suite_on_rocksdb() -> Result<(), StorageError> {
        Suite::test_all(RocksBuilder)
    }

    #[test]
    fn openraft_storage_suite_on_memkv() -> Result<(), StorageError> {
        Suite::test_all(MemBuilder)
    }
}
