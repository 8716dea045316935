//! The Raft log and vote on the `KvStore` seam (`raft_log` and `raft_meta` column families).
//!
//! To ensure correctness (openraft's `RaftLogStorage` contract): entries are written with
//! `sync` before `append` reports them flushed; the vote is synced before `save_vote` returns;
//! writes are serialised by `&mut self`; the log never has holes (truncate and purge remove
//! suffixes and prefixes only).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use engine::keys::{self, Cf};
use engine::kv::{Batch, KvStore};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, OptionalSend, RaftLogReader, Vote};

use super::{from_bytes, to_bytes, LogId, NodeId, StorageError, StorageIOError, TypeConfig};

/// Entries read per scan while serving a range, so one read never holds the whole log.
const READ_BATCH_ENTRIES: usize = 1024;

pub struct LogStore<S: KvStore> {
    kv: Arc<S>,
    /// The last committed index openraft reported, for `/metrics`.
    committed: Arc<AtomicU64>,
    /// Appends are fsynced before openraft is told they are durable. Only the simulator's
    /// self-test turns this off, to show that a seed sweep catches the lost writes.
    sync_appends: bool,
}

impl<S: KvStore> Clone for LogStore<S> {
    fn clone(&self) -> Self {
        LogStore {
            kv: self.kv.clone(),
            committed: self.committed.clone(),
            sync_appends: self.sync_appends,
        }
    }
}

impl<S: KvStore> LogStore<S> {
    pub fn new(kv: Arc<S>) -> Self {
        LogStore {
            kv,
            committed: Arc::default(),
            sync_appends: true,
        }
    }

    /// A log store that acknowledges appends before they are durable: a deliberate bug for
    /// the simulator's self-test (`--bug unsynced-log`). Never used by the node.
    pub fn acknowledging_unsynced_appends(kv: Arc<S>) -> Self {
        LogStore {
            sync_appends: false,
            ..LogStore::new(kv)
        }
    }

    /// A handle on the committed index, updated as openraft commits.
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    fn meta<T: for<'de> serde::Deserialize<'de>>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let raw = self
            .kv
            .get(Cf::RaftMeta, key)
            .map_err(|e| StorageIOError::read(&e))?;
        raw.map(|b| from_bytes(&b).map_err(|e| StorageIOError::read(&e).into()))
            .transpose()
    }

    fn put_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        v: &T,
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut b = Batch::default();
        b.put(Cf::RaftMeta, key.to_vec(), to_bytes(v));
        self.kv
            .write(b, sync)
            .map_err(|e| StorageIOError::write(&e).into())
    }
}

/// What a node's durable Raft state says about its leadership when it starts: the leader
/// vote it holds and the last index of its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableLeadership {
    pub vote: Vote<NodeId>,
    pub last_log_index: u64,
}

/// Reads the vote and the last log index of node `me` from its store, when the vote is a
/// committed vote for itself: openraft restores such a node as leader of that term at once,
/// with the committed index it saved — unsynced, so possibly older than entries it had
/// committed and acknowledged before a crash. Every such entry is in its log (appends are
/// synced before they count), so the last log index is a safe floor for its read index
/// while it leads in that term, and a live one: a leader never truncates its own log.
pub fn durable_leadership<S: KvStore>(
    kv: &S,
    me: NodeId,
) -> Result<Option<DurableLeadership>, StorageError> {
    let vote: Option<Vote<NodeId>> = match kv
        .get(Cf::RaftMeta, keys::RAFT_VOTE)
        .map_err(|e| StorageIOError::read_vote(&e))?
    {
        Some(b) => Some(from_bytes(&b).map_err(|e| StorageIOError::read_vote(&e))?),
        None => None,
    };
    let Some(vote) = vote.filter(|v| v.is_committed() && v.leader_id().voted_for() == Some(me))
    else {
        return Ok(None);
    };
    let last = kv
        .last(Cf::RaftLog, b"")
        .map_err(|e| StorageIOError::read_logs(&e))?;
    let last_log_index = match last {
        Some((k, _)) => keys::decode_log_index(&k)
            .ok_or_else(|| StorageIOError::read_logs(&std::io::Error::other("bad log key")))?,
        None => return Ok(None),
    };
    Ok(Some(DurableLeadership {
        vote,
        last_log_index,
    }))
}

impl<S: KvStore> RaftLogReader<TypeConfig> for LogStore<S> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        let mut next = start;
        loop {
            let rows = self
                .kv
                .scan(
                    Cf::RaftLog,
                    b"",
                    &keys::log_index_key(next),
                    READ_BATCH_ENTRIES,
                )
                .map_err(|e| StorageIOError::read_logs(&e))?;
            let n = rows.len();
            for (k, v) in rows {
                let idx = keys::decode_log_index(&k).ok_or_else(|| {
                    StorageIOError::read_logs(&std::io::Error::other("bad log key"))
                })?;
                if !range.contains(&idx) {
                    return Ok(out);
                }
                let entry: Entry<TypeConfig> =
                    from_bytes(&v).map_err(|e| StorageIOError::read_log_at_index(idx, &e))?;
                out.push(entry);
                next = idx + 1;
            }
            if n < READ_BATCH_ENTRIES {
                return Ok(out);
            }
        }
    }
}

impl<S: KvStore> RaftLogStorage<TypeConfig> for LogStore<S> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.meta(keys::RAFT_LAST_PURGED)?;
        let last = self
            .kv
            .last(Cf::RaftLog, b"")
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let last_log_id = match last {
            Some((_, v)) => {
                let e: Entry<TypeConfig> =
                    from_bytes(&v).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(keys::RAFT_VOTE, vote, true)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.meta(keys::RAFT_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        if let Some(c) = committed {
            self.committed.store(c.index, Ordering::Relaxed);
        }
        // Not synced: it only lets a restarted node apply what it knows to be committed
        // without waiting. So after a crash it may be older than what this node had
        // committed (and acknowledged). A node that restarts as the leader of its old term
        // takes it for its read index, so linearizable reads use `durable_leadership` too.
        self.put_meta(keys::RAFT_COMMITTED, &committed, false)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.meta::<Option<LogId>>(keys::RAFT_COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut b = Batch::default();
        for e in entries {
            b.put(
                Cf::RaftLog,
                keys::log_index_key(e.log_id.index),
                to_bytes(&e),
            );
        }
        let res = self.kv.write(b, self.sync_appends);
        let slow = self.kv.sync_latency();
        if !slow.is_zero() {
            tokio::time::sleep(slow).await;
        }
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                callback.log_io_completed(Err(std::io::Error::other(msg)));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut b = Batch::default();
        b.delete_range(
            Cf::RaftLog,
            keys::log_index_key(log_id.index),
            keys::log_index_key(u64::MAX),
        );
        b.delete(Cf::RaftLog, keys::log_index_key(u64::MAX));
        self.kv
            .write(b, true)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut b = Batch::default();
        b.put(
            Cf::RaftMeta,
            keys::RAFT_LAST_PURGED.to_vec(),
            to_bytes(&log_id),
        );
        b.delete_range(
            Cf::RaftLog,
            keys::log_index_key(0),
            keys::log_index_key(log_id.index + 1),
        );
        self.kv
            .write(b, true)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}
