//! The Raft state machine: applies committed entries to the engine's state machine on the
//! `KvStore` seam, and builds and installs snapshots.
//!
//! Each entry's effects and the applied log id are one atomic batch, so a crash between
//! entries leaves the state at an entry boundary, and the applied id says which. Batches are
//! not synced: every applied entry is durable in the Raft log before it is applied, and
//! whatever a crash takes from the state machine is re-applied from the log on restart.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use engine::keys::{self, Cf};
use engine::kv::{Batch, KvStore};
use engine::state::State;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::NodeInfo;

use super::{
    from_bytes, to_bytes, LogId, NodeId, Request, Response, StorageError, StorageIOError,
    TypeConfig,
};

/// Rows per scan while dumping the state into a snapshot.
const SNAPSHOT_SCAN_ROWS: usize = 4096;

/// A snapshot's contents: every row of every state column family.
#[derive(Serialize, Deserialize)]
enum SnapshotData {
    V1 {
        rows: Vec<(String, Vec<u8>, Vec<u8>)>,
    },
}

struct CurrentSnapshot {
    meta: SnapshotMeta<NodeId, NodeInfo>,
    data: Vec<u8>,
}

pub struct StateMachine<S: KvStore> {
    kv: Arc<S>,
    current: Arc<Mutex<Option<CurrentSnapshot>>>,
    /// The region this group is: it stamps the tag changes made here.
    region: String,
    /// Counts the snapshots installed, when asked to (the simulator reports them).
    installs: Option<Arc<AtomicU64>>,
}

impl<S: KvStore> StateMachine<S> {
    pub fn new(kv: Arc<S>, region: &str) -> Self {
        StateMachine {
            kv,
            current: Arc::new(Mutex::new(None)),
            region: region.to_string(),
            installs: None,
        }
    }

    /// Adds one to `counter` for every snapshot this state machine installs.
    pub fn counting_installs(mut self, counter: Arc<AtomicU64>) -> Self {
        self.installs = Some(counter);
        self
    }

    fn applied(&self) -> Result<(Option<LogId>, StoredMembership<NodeId, NodeInfo>), StorageError> {
        let read = |k: &[u8]| {
            self.kv
                .get(Cf::SmMeta, k)
                .map_err(|e| StorageError::from(StorageIOError::read_state_machine(&e)))
        };
        let last: Option<LogId> = match read(keys::SM_LAST_APPLIED)? {
            Some(b) => from_bytes(&b).map_err(|e| StorageIOError::read_state_machine(&e))?,
            None => None,
        };
        let membership = match read(keys::SM_MEMBERSHIP)? {
            Some(b) => from_bytes(&b).map_err(|e| StorageIOError::read_state_machine(&e))?,
            None => StoredMembership::default(),
        };
        Ok((last, membership))
    }
}

/// Builds a snapshot from a point-in-time copy of the state. openraft runs
/// `build_snapshot` in a task of its own while later entries are applied, so the copy is
/// taken in `get_snapshot_builder`, which runs in order with `apply`: a snapshot never holds
/// effects of entries after its `last_log_id` (a follower installing it would apply them
/// twice).
pub struct SnapshotBuilder {
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, NodeInfo>,
    rows: Vec<(String, Vec<u8>, Vec<u8>)>,
    current: Arc<Mutex<Option<CurrentSnapshot>>>,
    /// Why the state could not be read, if it could not.
    failed: Option<String>,
}

impl<S: KvStore> StateMachine<S> {
    /// Every state row and the applied position, read together.
    fn copy_state(&self) -> Result<SnapshotBuilder, StorageError> {
        let (last_applied, membership) = self.applied()?;
        let mut rows = Vec::new();
        for cf in Cf::STATE {
            let mut start: Vec<u8> = Vec::new();
            loop {
                let batch = self
                    .kv
                    .scan(cf, b"", &start, SNAPSHOT_SCAN_ROWS)
                    .map_err(|e| StorageIOError::read_state_machine(&e))?;
                let n = batch.len();
                if let Some((k, _)) = batch.last() {
                    start = k.clone();
                    start.push(0);
                }
                for (k, v) in batch {
                    rows.push((cf.name().to_string(), k, v));
                }
                if n < SNAPSHOT_SCAN_ROWS {
                    break;
                }
            }
        }
        Ok(SnapshotBuilder {
            last_applied,
            membership,
            rows,
            current: self.current.clone(),
            failed: None,
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        if let Some(why) = &self.failed {
            return Err(
                StorageIOError::read_state_machine(&std::io::Error::other(why.clone())).into(),
            );
        }
        let rows = std::mem::take(&mut self.rows);
        let data = to_bytes(&SnapshotData::V1 { rows });
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, data.len()),
            None => format!("none-{}", data.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        *self.current.lock().await = Some(CurrentSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        });
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl<S: KvStore> RaftStateMachine<TypeConfig> for StateMachine<S> {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, NodeInfo>), StorageError> {
        self.applied()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let (mut last_applied, _) = self.applied()?;
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            // Re-applying an entry would apply a command twice; openraft hands entries over
            // in order (gaps are legal only after a snapshot install, and in its test suite).
            if let Some(prev) = last_applied {
                assert!(
                    entry.log_id.index > prev.index,
                    "apply out of order: {} after {}",
                    entry.log_id.index,
                    prev.index
                );
            }
            let mut batch = Batch::default();
            let resp = match &entry.payload {
                EntryPayload::Blank => Response::None,
                EntryPayload::Normal(Request::V1(cmd)) => {
                    let outcome = State::new(self.kv.as_ref())
                        .in_region(&self.region)
                        .apply(cmd, &mut batch)
                        .map_err(|e| StorageIOError::apply(entry.log_id, &e))?;
                    tracing::trace!(index = entry.log_id.index, ?cmd, ?outcome, "applied");
                    Response::Outcome(outcome)
                }
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                    batch.put(Cf::SmMeta, keys::SM_MEMBERSHIP.to_vec(), to_bytes(&stored));
                    Response::None
                }
            };
            batch.put(
                Cf::SmMeta,
                keys::SM_LAST_APPLIED.to_vec(),
                to_bytes(&Some(entry.log_id)),
            );
            // Not synced: the entry is already durable in the Raft log (same WAL, written
            // first), and an apply lost to a crash is replayed from it with the same result,
            // since the applied id is lost with it.
            self.kv
                .write(batch, false)
                .map_err(|e| StorageIOError::apply(entry.log_id, &e))?;
            last_applied = Some(entry.log_id);
            out.push(resp);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // openraft's signature leaves no room for an error here: a failed read is carried
        // in the builder, and `build_snapshot` reports it.
        match self.copy_state() {
            Ok(b) => b,
            Err(e) => SnapshotBuilder {
                last_applied: None,
                membership: StoredMembership::default(),
                rows: Vec::new(),
                current: self.current.clone(),
                failed: Some(e.to_string()),
            },
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let SnapshotData::V1 { rows } = from_bytes(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let mut batch = Batch::default();
        for cf in Cf::STATE {
            // Every key layout starts below 0xff (account ids, digest text, fixed names).
            batch.delete_range(cf, Vec::new(), vec![0xff; 16]);
        }
        for (cf, k, v) in rows {
            let cf = Cf::from_name(&cf).ok_or_else(|| {
                StorageIOError::read_snapshot(
                    Some(meta.signature()),
                    &std::io::Error::other(format!("unknown column family {cf}")),
                )
            })?;
            batch.put(cf, k, v);
        }
        batch.put(
            Cf::SmMeta,
            keys::SM_LAST_APPLIED.to_vec(),
            to_bytes(&meta.last_log_id),
        );
        batch.put(
            Cf::SmMeta,
            keys::SM_MEMBERSHIP.to_vec(),
            to_bytes(&meta.last_membership),
        );
        self.kv
            .write(batch, true)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        tracing::info!(snapshot = %meta.snapshot_id, last = ?meta.last_log_id, "installed snapshot");
        if let Some(c) = &self.installs {
            c.fetch_add(1, Ordering::Relaxed);
        }
        *self.current.lock().await = Some(CurrentSnapshot {
            meta: meta.clone(),
            data,
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.current.lock().await.as_ref().map(|c| Snapshot {
            meta: c.meta.clone(),
            snapshot: Box::new(Cursor::new(c.data.clone())),
        }))
    }
}
