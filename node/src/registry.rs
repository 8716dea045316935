//! The node's implementation of the HTTP layer's `Registry` trait: reads from the local state
//! machine, writes through Raft, blob bytes in the local blob store.
//!
//! Owns: upload sessions in flight (one writer per session, serialised by a lock), the order
//! "bytes durable → command committed → client answered", the repair worker (copies back to
//! R on current members; this node's own recorded copies present), and the verified read of
//! local blob copies (a copy that does not match its digest is quarantined, counted, and
//! replaced from another holder).
//! Never: answers success for a write before its command is applied; serves or ships to a
//! peer blob bytes it has not verified against their digest (replicas pushed by `replicate`
//! are verified by their receiver before they count).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use engine::blob_store::{BlobBackend, BlobError, BlobStore, StoredBlob, UploadMeta, UploadWrite};
use engine::keys::ReferrerRecord;
use engine::kv::{KvStore, RocksKv};
use engine::state::{Command, Outcome, State, StateError};
use engine::{manifest, AccountId, Digest, Limits, Reference, RepoName};
use futures_util::StreamExt;
use registry_api::{
    ApiError, BlobContent, BodyStream, ListPage, Manifest, ManifestPutResult, Registry,
    RegistryResult, UploadStatus,
};
use tokio::sync::{Mutex, Semaphore};

use crate::clock::Clock;
use crate::cluster::placement;
use crate::raft::log_store::{durable_leadership, DurableLeadership};
use crate::raft::{NodeInfo, Raft, Request, Response};
use crate::transport::quic::QuicTransport;
use crate::transport::{BlobReader, PeerRequest, PeerResponse, Transport};

/// A request body that sends nothing for this long is cut off (the session keeps what
/// arrived before, up to its last checkpoint), so a stalled client cannot hold an upload's
/// lock or a connection forever.
const BODY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Bytes gathered from a request body before they are handed to the disk in one write.
const WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// The environment a node runs in: its peer transport, metadata store and blob store.
/// `Production` binds QUIC, RocksDB and the file system; the simulator binds its own twins.
pub trait Platform: Send + Sync + 'static {
    type Transport: Transport;
    type Kv: KvStore;
    type Blobs: BlobBackend;
}

/// QUIC between nodes, RocksDB for metadata, files for blobs.
pub struct Production;

impl Platform for Production {
    type Transport = QuicTransport;
    type Kv = RocksKv;
    type Blobs = BlobStore;
}

type Writer<P> = <<P as Platform>::Blobs as BlobBackend>::Writer;
type Session<P> = Arc<Mutex<Option<Writer<P>>>>;

/// Promise-breaking switches for the simulator's self-test: with one on, the node breaks a
/// promise of DESIGN.md on purpose, and a seed sweep must catch it. All off in production.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Bugs {
    /// Linearizable reads skip the leader's read-index check (a deposed leader answers
    /// from its stale state).
    pub stale_leader_reads: bool,
    /// A push replicated from another region is stored without its tag move.
    pub lost_replica_tag_moves: bool,
    /// A tag move replicated from another region wins whatever its stamp.
    pub replica_tags_always_win: bool,
    /// A push is acknowledged once quorum − 1 copies are durable (one short of the write
    /// quorum).
    pub ack_quorum_minus_one: bool,
}

/// Bounds the blob bytes a node has in flight to its peers (`replication_inflight_bytes_max`)
/// and counts them for `/metrics`. Permits are KiB so the bound fits a semaphore.
#[derive(Clone)]
pub struct ReplicationGate {
    permits: Arc<Semaphore>,
    permits_total: u32,
    pub copies_inflight: Arc<std::sync::atomic::AtomicU64>,
    pub bytes_inflight: Arc<std::sync::atomic::AtomicU64>,
}

impl ReplicationGate {
    fn new(bytes_max: u64) -> ReplicationGate {
        let permits_total = u32::try_from(bytes_max.div_ceil(1024).max(1)).unwrap_or(u32::MAX >> 4);
        ReplicationGate {
            permits: Arc::new(Semaphore::new(permits_total as usize)),
            permits_total,
            copies_inflight: Arc::default(),
            bytes_inflight: Arc::default(),
        }
    }

    /// Sends one replica once its bytes fit in the in-flight bound.
    async fn send<T: Transport>(
        &self,
        peers: &T,
        target: u64,
        info: &NodeInfo,
        digest: &Digest,
        bytes: Bytes,
    ) -> Result<(), crate::transport::TransportError> {
        use std::sync::atomic::Ordering;
        let want = u32::try_from((bytes.len() as u64).div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.permits_total);
        let _permit = self
            .permits
            .acquire_many(want)
            .await
            .expect("replication semaphore is never closed");
        self.copies_inflight.fetch_add(1, Ordering::Relaxed);
        self.bytes_inflight
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let len = bytes.len() as u64;
        let r = peers.put_blob(target, info, digest, bytes).await;
        self.copies_inflight.fetch_sub(1, Ordering::Relaxed);
        self.bytes_inflight.fetch_sub(len, Ordering::Relaxed);
        r
    }
}

pub struct NodeRegistry<P: Platform = Production> {
    pub node_id: u64,
    raft: Raft,
    kv: Arc<P::Kv>,
    blobs: P::Blobs,
    clock: Arc<dyn Clock>,
    pub bugs: Bugs,
    limits: Limits,
    /// Open sessions by id; bounded by `limits.uploads_open_max`.
    sessions: std::sync::Mutex<HashMap<String, Session<P>>>,
    proposals: Semaphore,
    /// Peer transport; `None` for a single node without peers.
    peers: Option<Arc<P::Transport>>,
    /// `raft.write_timeout_ms`.
    write_timeout: std::time::Duration,
    pub replication: ReplicationGate,
    /// Local blob copies found not to match their digest (quarantined), for `/metrics`.
    pub corrupt_copies: std::sync::atomic::AtomicU64,
    /// Other regions to read through from (cross-region replication configured).
    read_through: std::sync::OnceLock<Arc<dyn ReadThrough>>,
    /// The read-index floor of a node that started as the leader of its old term.
    read_floor: ReadFloor,
}

/// What a node holds of a committed blob.
pub enum LocalCopy {
    Intact(Bytes),
    Absent,
    /// It held a copy that did not match the digest (now quarantined).
    Corrupt,
}

/// A floor under the read index of linearizable reads, for a node that restarted holding a
/// committed vote for itself (see `log_store::durable_leadership`): while it leads in that
/// term, a read waits until everything in its log at start-up is applied, since its
/// committed index came back from an unsynced write and may be behind what it acknowledged.
enum ReadFloor {
    /// Not needed: the node did not start as a leader (a leader elected later proposes a
    /// blank entry of its new term, and the read index is at least that).
    None,
    Leader {
        leadership: DurableLeadership,
        /// Applied past the floor once: openraft's own read index suffices from then on.
        reached: std::sync::atomic::AtomicBool,
    },
    /// The Raft store could not be read at start-up: linearizable reads are refused by this
    /// process rather than risk a stale answer.
    Unknown(String),
}

/// Content this region lacks but another region may send (read-through).
pub trait ReadThrough: Send + Sync + 'static {
    /// A manifest, verified, served without being stored.
    fn manifest<'a>(
        &'a self,
        account: AccountId,
        repo: &'a RepoName,
        reference: &'a Reference,
    ) -> futures_util::future::BoxFuture<'a, Option<registry_api::registry::Manifest>>;
    /// Another region's URL for the blob, when `client` belongs to that region's network and
    /// that region holds it.
    fn redirect<'a>(
        &'a self,
        account: AccountId,
        repo: &'a RepoName,
        digest: &'a Digest,
        client: std::net::IpAddr,
    ) -> futures_util::future::BoxFuture<'a, Option<String>>;
    /// Fetches, verifies, stores and commits a blob into `repo`; whether it was found.
    fn blob<'a>(
        &'a self,
        account: AccountId,
        repo: &'a RepoName,
        digest: &'a Digest,
    ) -> futures_util::future::BoxFuture<'a, Result<bool, ApiError>>;
}

fn internal<E: std::fmt::Display>(e: E) -> ApiError {
    ApiError::Internal(e.to_string())
}

fn state_err(e: StateError) -> ApiError {
    ApiError::Internal(e.to_string())
}

fn blob_err(e: BlobError) -> ApiError {
    match e {
        BlobError::UploadUnknown(id) => ApiError::BlobUploadUnknown(id),
        BlobError::BadUploadId => ApiError::BlobUploadUnknown("(malformed id)".into()),
        BlobError::DigestMismatch { expected, actual } => {
            ApiError::DigestInvalid(format!("content is {actual}, the client said {expected}"))
        }
        BlobError::BlobUnknown(d) => ApiError::BlobUnknown(d),
        e @ (BlobError::Io { .. }
        | BlobError::Corrupt { .. }
        | BlobError::CorruptState { .. }
        | BlobError::ChunkMissing(_)
        | BlobError::ChunkInvalid(_)) => internal(e),
    }
}

impl<P: Platform> NodeRegistry<P> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: u64,
        raft: Raft,
        kv: Arc<P::Kv>,
        blobs: P::Blobs,
        clock: Arc<dyn Clock>,
        limits: Limits,
        peers: Option<Arc<P::Transport>>,
        write_timeout: std::time::Duration,
    ) -> Self {
        let proposals = Semaphore::new(limits.raft_proposals_max as usize);
        let replication = ReplicationGate::new(limits.replication_inflight_bytes_max);
        let read_floor = match durable_leadership(kv.as_ref(), node_id) {
            Ok(None) => ReadFloor::None,
            Ok(Some(leadership)) => ReadFloor::Leader {
                leadership,
                reached: std::sync::atomic::AtomicBool::new(false),
            },
            Err(e) => {
                tracing::error!(error = %e, "read the Raft vote and log at start-up; linearizable reads refused");
                ReadFloor::Unknown(e.to_string())
            }
        };
        NodeRegistry {
            node_id,
            raft,
            kv,
            blobs,
            clock,
            bugs: Bugs::default(),
            limits,
            peers,
            write_timeout,
            replication,
            corrupt_copies: std::sync::atomic::AtomicU64::new(0),
            sessions: std::sync::Mutex::new(HashMap::new()),
            proposals,
            read_through: std::sync::OnceLock::new(),
            read_floor,
        }
    }

    /// Runs a blob-store call: on a blocking thread when the store does disk I/O, inline when
    /// it does not (the simulator's store, whose calls must stay on its one thread), after
    /// the store's reported latency (a slow simulated disk).
    async fn disk<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let slow = self.blobs.latency();
        if !slow.is_zero() {
            tokio::time::sleep(slow).await;
        }
        if !<P::Blobs as BlobBackend>::BLOCKING {
            return f();
        }
        match tokio::task::spawn_blocking(f).await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        self.disk(f).await
    }

    fn state(&self) -> State<'_, P::Kv> {
        State::new(self.kv.as_ref())
    }

    pub fn blob_store(&self) -> &P::Blobs {
        &self.blobs
    }

    pub fn kv(&self) -> &Arc<P::Kv> {
        &self.kv
    }

    /// This node's Raft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Wall-clock milliseconds on this node's clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Proposes a command through the region's leader and waits until it is applied here.
    pub async fn propose_command(&self, cmd: Command) -> Result<Outcome, ApiError> {
        self.propose(cmd).await
    }

    /// Proposes a command and waits until it is applied; returns its outcome.
    async fn propose(&self, cmd: Command) -> Result<Outcome, ApiError> {
        let _permit = self
            .proposals
            .try_acquire()
            .map_err(|_| ApiError::TooManyRequests("too many metadata writes queued".into()))?;
        let name = cmd.name();
        let resp = match self.write(Request::V1(cmd)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(command = name, error = %e, "metadata write failed");
                return Err(e);
            }
        };
        match resp {
            Response::Outcome(o) => Ok(o),
            Response::None => Err(ApiError::Internal(
                "normal entry applied without an outcome".into(),
            )),
        }
    }

    /// Commits `req` through the leader: locally when this node leads, else forwarded. Only
    /// an applied entry's response is returned; every failure is an error (never success).
    pub async fn write(&self, req: Request) -> Result<Response, ApiError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            ApiError::Unavailable(format!("metadata write not committed: {e}"))
        };
        // A node outside its region's membership (removed, or not yet joined) receives no
        // log: a write it forwarded would commit but never become visible here.
        let member = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&self.node_id)
            .is_some();
        if !member {
            return Err(ApiError::Unavailable(format!(
                "node {} is not a member of its region; send writes to a member",
                self.node_id
            )));
        }
        let committed =
            tokio::time::timeout(self.write_timeout, self.raft.client_write(req.clone()))
                .await
                .map_err(|_| {
                    ApiError::Unavailable(format!(
                    "metadata write not committed within {} ms: is a majority of the region up?",
                    self.write_timeout.as_millis()
                ))
                })?;
        match committed {
            Ok(r) => Ok(r.data),
            Err(openraft::error::RaftError::APIError(
                openraft::error::ClientWriteError::ForwardToLeader(f),
            )) => {
                let (Some(leader), Some(node), Some(peers)) =
                    (f.leader_id, f.leader_node, self.peers.as_ref())
                else {
                    return Err(ApiError::Unavailable(
                        "no leader in this region right now".into(),
                    ));
                };
                // Give up as soon as this node sees another leader (or none): a forward in
                // flight to a leader that died would otherwise hold the client until the
                // transport times out. The write's fate is then unknown, and the client was
                // not told it succeeded.
                let waiter = self.raft.wait(Some(self.write_timeout));
                let leader_changed =
                    waiter.metrics(|m| m.current_leader != Some(leader), "leader changed");
                let forwarded = tokio::select! {
                    r = tokio::time::timeout(
                        self.write_timeout,
                        peers.call(leader, &node, PeerRequest::ClientWrite(req)),
                    ) => r.map_err(|_| {
                        ApiError::Unavailable(format!("leader {leader} did not answer in time"))
                    })?,
                    _ = leader_changed => {
                        return Err(ApiError::Unavailable(format!(
                            "leader {leader} was replaced while the write was in flight; retry"
                        )));
                    }
                };
                match forwarded {
                    Ok(PeerResponse::ClientWrite { index, response }) => {
                        // Read-your-writes on this node: answer once it has applied the entry.
                        self.raft
                            .wait(Some(self.write_timeout))
                            .applied_index_at_least(Some(index), "forwarded write applied here")
                            .await
                            .map_err(|e| {
                                ApiError::Unavailable(format!(
                                    "write committed but not yet applied on this node: {e}"
                                ))
                            })?;
                        Ok(response)
                    }
                    Ok(PeerResponse::Refused(why)) => Err(ApiError::Unavailable(format!(
                        "leader {leader} refused the write: {why}"
                    ))),
                    Ok(other) => Err(unavailable(&format!("unexpected answer {other:?}"))),
                    Err(e) => Err(unavailable(&e)),
                }
            }
            Err(e) => Err(unavailable(&e)),
        }
    }

    /// Resolves a tag linearizably: only the leader answers, after confirming with a quorum
    /// that it still leads and applying everything committed before the read (the read
    /// index). Answers `Unavailable` on any other node, or when leadership cannot be confirmed
    /// within `raft.write_timeout_ms`.
    pub async fn tag_linearizable(
        &self,
        account: AccountId,
        repo: &RepoName,
        tag: &engine::Tag,
    ) -> Result<Option<Digest>, ApiError> {
        if !self.is_leader() {
            return Err(ApiError::Unavailable(
                "linearizable reads are answered by the region's leader".into(),
            ));
        }
        if !self.bugs.stale_leader_reads {
            self.await_read_index().await?;
        }
        Ok(self
            .state()
            .tag(account, repo, tag)
            .map_err(state_err)?
            .map(|t| t.digest))
    }

    /// Confirms leadership with a quorum and waits until this node has applied the read
    /// index: openraft's (the larger of the commit index and the blank entry of the
    /// leader's term) and, on a node that restarted as leader of its old term, the floor.
    async fn await_read_index(&self) -> Result<(), ApiError> {
        use std::sync::atomic::Ordering;
        let floor = match &self.read_floor {
            ReadFloor::None => None,
            ReadFloor::Unknown(why) => {
                return Err(ApiError::Unavailable(format!(
                    "linearizable reads are off on this node: {why}"
                )))
            }
            ReadFloor::Leader { reached, .. } if reached.load(Ordering::Relaxed) => None,
            ReadFloor::Leader {
                leadership,
                reached,
            } => Some((leadership, reached)),
        };
        // The vote before and after the leadership check: the floor applies when the check
        // confirmed the start-up term; a vote that changed in between leaves that unknown.
        let vote_before = self.raft.metrics().borrow().vote;
        let timeout = |_| ApiError::Unavailable("leadership not confirmed in time".into());
        let (read_log_id, _) =
            tokio::time::timeout(self.write_timeout, self.raft.get_read_log_id())
                .await
                .map_err(timeout)?
                .map_err(|e| ApiError::Unavailable(format!("not confirmed as leader: {e}")))?;
        let mut index = read_log_id.map(|l| l.index);
        if let Some((leadership, reached)) = floor {
            let vote_after = self.raft.metrics().borrow().vote;
            if vote_before != vote_after {
                return Err(ApiError::Unavailable(
                    "leadership changed during the read; retry".into(),
                ));
            }
            if vote_after == leadership.vote {
                index = index.max(Some(leadership.last_log_index));
            } else {
                // Another term: its leader's blank entry bounds the read index.
                reached.store(true, Ordering::Relaxed);
            }
        }
        if let Some(i) = index {
            self.raft
                .wait(Some(self.write_timeout))
                .applied_index_at_least(Some(i), "read index applied")
                .await
                .map_err(|e| {
                    ApiError::Unavailable(format!("read index {i} not applied in time: {e}"))
                })?;
        }
        if let Some((leadership, reached)) = floor {
            if index >= Some(leadership.last_log_index) {
                reached.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Voters and learners of the region, from the latest membership this node knows.
    pub fn members(&self) -> Vec<(u64, NodeInfo)> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership()
            .nodes()
            .map(|(id, n)| (*id, n.clone()))
            .collect()
    }

    /// Sends the blob to the other replicas rendezvous hashing picks and waits for a write
    /// quorum of durable copies (this node's included); returns the holders.
    async fn replicate(&self, digest: &Digest) -> Result<Vec<u64>, ApiError> {
        let Some(peers) = self.peers.as_ref() else {
            return Ok(vec![self.node_id]);
        };
        let members = self.members();
        let ids: Vec<u64> = members.iter().map(|(id, _)| *id).collect();
        let targets = placement::holders(&ids, digest);
        let mut quorum = placement::write_quorum(targets.len());
        if self.bugs.ack_quorum_minus_one {
            quorum = quorum.saturating_sub(1).max(1);
        }
        // Unverified: the bytes were verified as they were written a moment ago, and each
        // receiver verifies its replica before it counts (`store_replica`).
        let store = self.blobs.clone();
        let d = digest.clone();
        let bytes = self
            .blocking(move || store.read_blob(&d).map_err(blob_err))
            .await
            .map_err(|e| {
                ApiError::Internal(format!("blob {digest} unreadable before replication: {e}"))
            })?;
        // Each copy is sent by its own task; the push is answered as soon as a quorum is
        // durable, and slower copies finish in the background (an unreachable peer costs the
        // client nothing while a quorum is up).
        let mut sends = futures_util::stream::FuturesUnordered::new();
        for (id, info) in targets
            .iter()
            .filter(|t| **t != self.node_id)
            .filter_map(|t| members.iter().find(|(id, _)| id == t))
        {
            let (peers, gate) = (peers.clone(), self.replication.clone());
            let (id, info, digest, bytes) = (*id, info.clone(), digest.clone(), bytes.clone());
            sends.push(crate::rt::spawn(async move {
                let r = gate.send(peers.as_ref(), id, &info, &digest, bytes).await;
                if let Err(e) = &r {
                    tracing::warn!(peer = id, %digest, error = %e, "replica write failed");
                }
                (id, r.is_ok())
            }));
        }
        let mut holders = vec![self.node_id];
        while holders.len() < quorum {
            match sends.next().await {
                Some(Ok((id, true))) => holders.push(id),
                Some(_) => {}
                None => {
                    return Err(ApiError::Unavailable(format!(
                        "blob {digest} is durable on {} node(s), the write quorum is {quorum}",
                        holders.len()
                    )))
                }
            }
        }
        holders.sort_unstable();
        Ok(holders)
    }

    /// A committed blob's bytes from this node's store (a memory map), verified against the
    /// digest, if it holds a good copy. A copy that does not match is quarantined by the
    /// store, logged and counted here, and reported as absent: callers fetch a good copy
    /// from another holder (`ensure_local`) or answer that they have none (a peer asking).
    pub async fn local_blob_bytes(&self, digest: &Digest) -> Result<Option<Bytes>, ApiError> {
        Ok(match self.local_copy(digest).await? {
            LocalCopy::Intact(bytes) => Some(bytes),
            LocalCopy::Absent | LocalCopy::Corrupt => None,
        })
    }

    /// This node's copy of a committed blob, verified against the digest (a copy that does
    /// not match is quarantined, logged and counted).
    pub async fn local_copy(&self, digest: &Digest) -> Result<LocalCopy, ApiError> {
        let store = self.blobs.clone();
        let d = digest.clone();
        let read = self.disk(move || store.read_verified(&d)).await;
        match read {
            Ok(bytes) => Ok(LocalCopy::Intact(bytes)),
            Err(BlobError::BlobUnknown(_)) => Ok(LocalCopy::Absent),
            Err(BlobError::Corrupt { actual, .. }) => {
                self.corrupt_copies
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    %digest,
                    %actual,
                    "local blob copy does not match its digest; quarantined, to be fetched again"
                );
                Ok(LocalCopy::Corrupt)
            }
            Err(e) => Err(blob_err(e)),
        }
    }

    /// Stores a replica sent by a peer: streamed to disk, verified, fsynced.
    pub async fn store_replica(
        &self,
        digest: Digest,
        size_bytes: u64,
        body: BlobReader,
    ) -> Result<(), ApiError> {
        if size_bytes > self.limits.blob_bytes_max {
            return Err(ApiError::TooLarge {
                what: "blob",
                size_bytes,
                limit_bytes: self.limits.blob_bytes_max,
            });
        }
        // A copy already here counts only if it is intact (else it is quarantined and this
        // replica takes its place).
        if self.blobs.blob_len(&digest) == Some(size_bytes)
            && self.local_blob_bytes(&digest).await?.is_some()
        {
            return Ok(());
        }
        let id = crate::rt::new_id();
        let store = self.blobs.clone();
        let meta = UploadMeta {
            account: AccountId::DEFAULT,
            repo: RepoName::parse("replica").expect("constant name is valid"),
            created_ms: self.clock.now_ms(),
            owner: String::new(),
        };
        let now = meta.created_ms;
        let id2 = id.clone();
        let w = self
            .blocking(move || store.create_upload(&id2, meta, now).map_err(blob_err))
            .await?;
        let stream: BodyStream = Box::pin(tokio_util::io::ReaderStream::with_capacity(
            body,
            WRITE_BUFFER_BYTES,
        ));
        let (w, r) = self.append(w, stream).await;
        if let Err(e) = r {
            let store = self.blobs.clone();
            let _ = self
                .blocking(move || store.delete_upload(&id).map_err(blob_err))
                .await;
            return Err(e);
        }
        if w.offset() != size_bytes {
            let store = self.blobs.clone();
            let _ = self
                .blocking(move || store.delete_upload(&id).map_err(blob_err))
                .await;
            return Err(ApiError::BlobUploadInvalid(format!(
                "replica of {digest} ended at {} of {size_bytes} bytes",
                w.offset()
            )));
        }
        let store = self.blobs.clone();
        self.blocking(move || store.finish_upload(w, &digest).map_err(blob_err))
            .await?;
        Ok(())
    }

    /// A committed blob's bytes, verified, fetched from a holder in the region first if this
    /// node lacks them or its copy is corrupt. Never bytes that do not match the digest: with
    /// no good copy reachable, an error.
    pub async fn ensure_local(&self, digest: &Digest) -> Result<Bytes, ApiError> {
        if let Some(b) = self.local_blob_bytes(digest).await? {
            return Ok(b);
        }
        self.fetch_from_holders(digest).await?;
        self.local_blob_bytes(digest).await?.ok_or_else(|| {
            ApiError::Internal(format!("blob {digest} vanished after it was fetched"))
        })
    }

    /// Commits a blob received from another region (durable in the local store): copies to
    /// the region's write quorum, then `BlobCommitted` into `repo`.
    pub async fn commit_received(
        &self,
        account: AccountId,
        repo: &RepoName,
        stored: StoredBlob,
    ) -> Result<(), ApiError> {
        self.commit_blob(account, repo, stored).await
    }

    /// Waits (at most `bound`) until this node applies an entry past the one it has applied
    /// now: workers waiting for new outbox events wake as soon as one commits. `false` when
    /// the Raft core has stopped (a storage error ends it): nothing will apply any more, and
    /// a caller looping on this must stop rather than spin.
    pub async fn wait_for_next_apply(&self, bound: std::time::Duration) -> bool {
        let mut rx = self.raft.metrics();
        let now = rx.borrow().last_applied.map_or(0, |l| l.index);
        let waited = tokio::time::timeout(bound, async {
            loop {
                if rx.changed().await.is_err() {
                    return false;
                }
                if rx.borrow().last_applied.is_some_and(|l| l.index > now) {
                    return true;
                }
            }
        })
        .await;
        !matches!(waited, Ok(false))
    }

    /// Whether this node's Raft core has stopped (after a storage error, or at shutdown):
    /// its metrics then keep the last state they had, leadership included.
    pub fn raft_stopped(&self) -> bool {
        let rx = self.raft.metrics();
        let stopped = rx.has_changed().is_err() || rx.borrow().running_state.is_err();
        stopped
    }

    /// Where a blob or manifest this region lacks is looked for (another region), if set.
    pub fn set_read_through(&self, r: Arc<dyn ReadThrough>) {
        let _ = self.read_through.set(r);
    }

    /// Fetches a blob this node lacks from one of its holders into the local store.
    async fn fetch_from_holders(&self, digest: &Digest) -> Result<(), ApiError> {
        let Some(peers) = self.peers.as_ref() else {
            return Err(ApiError::Internal(format!(
                "blob {digest} is committed but not on this node's disk"
            )));
        };
        let rec = self
            .state()
            .blob(digest)
            .map_err(state_err)?
            .ok_or_else(|| ApiError::BlobUnknown(digest.clone()))?;
        let members = self.members();
        let mut last_err = String::from("no holder is a member");
        for h in rec.holders.iter().filter(|h| **h != self.node_id) {
            let Some((_, info)) = members.iter().find(|(id, _)| id == h) else {
                continue;
            };
            match peers.get_blob(*h, info, digest).await {
                Ok(Some((size, reader))) => {
                    match self.store_replica(digest.clone(), size, reader).await {
                        Ok(()) => return Ok(()),
                        Err(e) => last_err = e.to_string(),
                    }
                }
                Ok(None) => last_err = format!("holder {h} does not have it"),
                Err(e) => last_err = e.to_string(),
            }
        }
        Err(ApiError::Unavailable(format!(
            "blob {digest} is not on this node and no holder could send it: {last_err}"
        )))
    }

    fn session(&self, id: &str) -> Result<Session<P>, ApiError> {
        if !engine::blob_store::valid_upload_id(id) {
            return Err(ApiError::BlobUploadUnknown("(malformed id)".into()));
        }
        let mut map = self.sessions.lock().expect("sessions lock");
        if let Some(s) = map.get(id) {
            return Ok(s.clone());
        }
        // Not in memory: it may be on disk from before a restart; `writer` resumes it.
        if map.len() as u64 >= self.limits.uploads_open_max {
            return Err(ApiError::TooManyRequests("too many open uploads".into()));
        }
        let s: Session<P> = Arc::new(Mutex::new(None));
        map.insert(id.to_string(), s.clone());
        Ok(s)
    }

    fn forget(&self, id: &str) {
        self.sessions.lock().expect("sessions lock").remove(id);
    }

    /// Takes the session's writer out of its slot (resuming from disk if needed) and checks it
    /// belongs to `account`/`repo`; a session found nowhere is also dropped from the map.
    async fn take_writer(
        &self,
        slot: &mut Option<Writer<P>>,
        account: AccountId,
        repo: &RepoName,
        owner: &str,
        id: &str,
    ) -> Result<Writer<P>, ApiError> {
        let r = self.take_writer_inner(slot, account, repo, owner, id).await;
        if r.is_err() && slot.is_none() {
            self.forget(id);
        }
        r
    }

    async fn take_writer_inner(
        &self,
        slot: &mut Option<Writer<P>>,
        account: AccountId,
        repo: &RepoName,
        owner: &str,
        id: &str,
    ) -> Result<Writer<P>, ApiError> {
        let w = match slot.take() {
            Some(w) => w,
            None => {
                let store = self.blobs.clone();
                let id = id.to_string();
                self.blocking(move || store.resume_upload(&id).map_err(blob_err))
                    .await?
            }
        };
        if w.meta().account != account || &w.meta().repo != repo || w.meta().owner != owner {
            let e = ApiError::BlobUploadUnknown(id.to_string());
            *slot = Some(w);
            return Err(e);
        }
        Ok(w)
    }

    /// Streams `body` into the writer, returning it with everything appended (checkpointed
    /// either way, so a request cut short leaves a resumable session).
    async fn append(
        &self,
        mut w: Writer<P>,
        mut body: BodyStream,
    ) -> (Writer<P>, Result<(), ApiError>) {
        let max = self.limits.blob_bytes_max;
        let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BUFFER_BYTES);
        let mut result = Ok(());
        loop {
            let next = match tokio::time::timeout(BODY_IDLE_TIMEOUT, body.next()).await {
                Ok(n) => n,
                Err(_) => Some(Err(std::io::Error::other(format!(
                    "no body bytes for {} s",
                    BODY_IDLE_TIMEOUT.as_secs()
                )))),
            };
            let done = next.is_none();
            match next {
                Some(Ok(chunk)) => {
                    if w.offset() + buf.len() as u64 + chunk.len() as u64 > max {
                        result = Err(ApiError::TooLarge {
                            what: "blob",
                            size_bytes: w.offset() + buf.len() as u64 + chunk.len() as u64,
                            limit_bytes: max,
                        });
                        break;
                    }
                    buf.extend_from_slice(&chunk);
                }
                Some(Err(e)) => {
                    result = Err(ApiError::BlobUploadInvalid(format!(
                        "request body ended early: {e}"
                    )));
                    break;
                }
                None => {}
            }
            if buf.len() >= WRITE_BUFFER_BYTES || (done && !buf.is_empty()) {
                let data = std::mem::replace(&mut buf, Vec::with_capacity(WRITE_BUFFER_BYTES));
                let (back, r) = self
                    .disk(move || {
                        let r = w.write(&data);
                        (w, r)
                    })
                    .await;
                w = back;
                if let Err(e) = r {
                    return (w, Err(blob_err(e)));
                }
            }
            if done {
                break;
            }
        }
        (w, result)
    }

    async fn checkpoint(&self, w: Writer<P>) -> (Writer<P>, Result<(), ApiError>) {
        let now = self.clock.now_ms();
        self.disk(move || {
            let mut w = w;
            let r = w.checkpoint(now).map_err(blob_err);
            (w, r)
        })
        .await
    }

    /// Commits a blob whose bytes are durable in the local store.
    async fn commit_blob(
        &self,
        account: AccountId,
        repo: &RepoName,
        stored: StoredBlob,
    ) -> Result<(), ApiError> {
        let holders = self.replicate(&stored.digest).await?;
        match self
            .propose(Command::BlobCommitted {
                account,
                repo: repo.clone(),
                digest: stored.digest,
                size_bytes: stored.size_bytes,
                holders,
                now_ms: self.clock.now_ms(),
            })
            .await?
        {
            Outcome::Done => Ok(()),
            o => Err(outcome_err(o)),
        }
    }

    /// Reads a blob through from another region; its size once committed here.
    async fn read_blob_through(
        &self,
        account: AccountId,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, ApiError> {
        let Some(rt) = self.read_through.get() else {
            return Ok(None);
        };
        if !rt.blob(account, repo, digest).await? {
            return Ok(None);
        }
        self.blob_linked(account, repo, digest)
    }

    fn blob_linked(
        &self,
        account: AccountId,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, ApiError> {
        Ok(self
            .state()
            .blob_link(account, repo, digest)
            .map_err(state_err)?
            .map(|l| l.size_bytes))
    }

    fn resolve(
        &self,
        account: AccountId,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Digest, ApiError> {
        match reference {
            Reference::Digest(d) => Ok(d.clone()),
            Reference::Tag(t) => self
                .state()
                .tag(account, repo, t)
                .map_err(state_err)?
                .map(|t| t.digest)
                .ok_or_else(|| ApiError::ManifestUnknown(format!("{repo}:{t}"))),
        }
    }
}

fn outcome_err(o: Outcome) -> ApiError {
    match o {
        Outcome::Done => ApiError::Internal("success treated as an error".into()),
        Outcome::BlobUnknown(d) => ApiError::BlobUnknown(d),
        Outcome::ManifestUnknown(d) => ApiError::ManifestUnknown(d.to_string()),
        Outcome::ManifestBlobUnknown(d) => ApiError::ManifestBlobUnknown(d),
        Outcome::ManifestInvalid(m) => ApiError::ManifestInvalid(m),
        Outcome::TagUnknown(t) => ApiError::ManifestUnknown(t.to_string()),
        Outcome::Refused(r) => refusal_err(r),
    }
}

/// An IAM or repository-settings refusal as an API error.
pub fn refusal_err(r: engine::iam::Refusal) -> ApiError {
    use engine::iam::Refusal::*;
    match r {
        AccountExists => ApiError::AlreadyExists("the account".into()),
        AccountUnknown => ApiError::Denied("no such account".into()),
        UserExists => ApiError::AlreadyExists("the user".into()),
        UserUnknown => ApiError::Denied("no such user".into()),
        KeyExists => ApiError::AlreadyExists("the access key".into()),
        KeyUnknown => ApiError::Denied("no such access key".into()),
        RepositoryExists => ApiError::AlreadyExists("the repository".into()),
        RepositoryUnknown => ApiError::Denied("no such repository".into()),
        RepositoryNotEmpty => ApiError::BadParameter(
            "the repository still holds images; delete them or force the deletion".into(),
        ),
        TagImmutable(t) => ApiError::TagImmutable(t.to_string()),
        TagExists(t) => ApiError::TagExists(t.to_string()),
    }
}

impl<P: Platform> Registry for NodeRegistry<P> {
    fn limits(&self) -> &Limits {
        &self.limits
    }

    async fn blob_size(
        &self,
        account: AccountId,
        repo: &RepoName,
        digest: &Digest,
    ) -> RegistryResult<Option<u64>> {
        // This region only: clients HEAD every layer before pushing it, and a push must not
        // wait on (or fail with) another region. GET reads through.
        self.blob_linked(account, repo, digest)
    }

    async fn blob_redirect(
        &self,
        account: AccountId,
        repo: &RepoName,
        digest: &Digest,
        client: std::net::IpAddr,
    ) -> Option<String> {
        self.read_through
            .get()?
            .redirect(account, repo, digest, client)
            .await
    }

    async fn blob_content(
        &self,
        account: AccountId,
        repo: &RepoName,
        digest: &Digest,
    ) -> RegistryResult<BlobContent> {
        let size = match self.blob_linked(account, repo, digest)? {
            Some(size) => size,
            None => self
                .read_blob_through(account, repo, digest)
                .await?
                .ok_or_else(|| ApiError::BlobUnknown(digest.clone()))?,
        };
        let bytes = self.ensure_local(digest).await?;
        let len = bytes.len() as u64;
        if len != size {
            return Err(ApiError::Internal(format!(
                "blob {digest} is {len} bytes on disk, {size} in metadata"
            )));
        }
        Ok(BlobContent {
            size_bytes: size,
            bytes,
        })
    }

    async fn blob_delete(
        &self,
        account: AccountId,
        repo: &RepoName,
        digest: &Digest,
    ) -> RegistryResult<()> {
        match self
            .propose(Command::BlobUnlinked {
                account,
                repo: repo.clone(),
                digest: digest.clone(),
            })
            .await?
        {
            Outcome::Done => Ok(()),
            o => Err(outcome_err(o)),
        }
    }

    async fn blob_mount(
        &self,
        account: AccountId,
        repo: &RepoName,
        from: &RepoName,
        digest: &Digest,
    ) -> RegistryResult<bool> {
        if self.blob_linked(account, from, digest)?.is_none() {
            return Ok(false);
        }
        if self.blob_linked(account, repo, digest)?.is_some() {
            return Ok(true);
        }
        match self
            .propose(Command::BlobMounted {
                account,
                repo: repo.clone(),
                from: from.clone(),
                digest: digest.clone(),
                now_ms: self.clock.now_ms(),
            })
            .await?
        {
            Outcome::Done => Ok(true),
            Outcome::BlobUnknown(_) => Ok(false),
            o => Err(outcome_err(o)),
        }
    }

    async fn blob_put(
        &self,
        account: AccountId,
        repo: &RepoName,
        owner: &str,
        digest: &Digest,
        mut body: BodyStream,
    ) -> RegistryResult<()> {
        // Small bodies (config blobs, most small layers) are stored in one blocking step; a
        // body that outgrows the buffer continues as an upload session.
        let mut buf: Vec<u8> = Vec::new();
        let mut rest_of_body = None;
        while let Some(chunk) = tokio::time::timeout(BODY_IDLE_TIMEOUT, body.next())
            .await
            .map_err(|_| {
                ApiError::BlobUploadInvalid(format!(
                    "no body bytes for {} s",
                    BODY_IDLE_TIMEOUT.as_secs()
                ))
            })?
        {
            let chunk = chunk.map_err(|e| {
                ApiError::BlobUploadInvalid(format!("request body ended early: {e}"))
            })?;
            buf.extend_from_slice(&chunk);
            if buf.len() >= WRITE_BUFFER_BYTES {
                rest_of_body = Some(body);
                break;
            }
        }
        if let Some(rest) = rest_of_body {
            let head: BodyStream = Box::pin(
                futures_util::stream::once(async move { Ok(Bytes::from(buf)) }).chain(rest),
            );
            let s = self.upload_start(account, repo, owner).await?;
            return self
                .upload_finish(account, repo, owner, &s.id, digest, head)
                .await;
        }
        let store = self.blobs.clone();
        let expected = digest.clone();
        let tmp_id = crate::rt::new_id();
        let stored = self
            .blocking(move || store.put_blob(&expected, &buf, &tmp_id).map_err(blob_err))
            .await?;
        self.commit_blob(account, repo, stored).await
    }

    async fn upload_start(
        &self,
        account: AccountId,
        repo: &RepoName,
        owner: &str,
    ) -> RegistryResult<UploadStatus> {
        let id = crate::rt::new_id();
        let slot = self.session(&id)?;
        let store = self.blobs.clone();
        let meta = UploadMeta {
            account,
            repo: repo.clone(),
            created_ms: self.clock.now_ms(),
            owner: owner.to_string(),
        };
        let now = meta.created_ms;
        let id2 = id.clone();
        let w = match self
            .blocking(move || store.create_upload(&id2, meta, now).map_err(blob_err))
            .await
        {
            Ok(w) => w,
            Err(e) => {
                self.forget(&id);
                return Err(e);
            }
        };
        *slot.lock().await = Some(w);
        Ok(UploadStatus { id, offset: 0 })
    }

    async fn upload_status(
        &self,
        account: AccountId,
        repo: &RepoName,
        owner: &str,
        id: &str,
    ) -> RegistryResult<UploadStatus> {
        let slot = self.session(id)?;
        let mut guard = slot.lock().await;
        let w = self
            .take_writer(&mut guard, account, repo, owner, id)
            .await?;
        let offset = w.offset();
        *guard = Some(w);
        Ok(UploadStatus {
            id: id.to_string(),
            offset,
        })
    }

    async fn upload_append(
        &self,
        account: AccountId,
        repo: &RepoName,
        owner: &str,
        id: &str,
        start: Option<u64>,
        body: BodyStream,
    ) -> RegistryResult<UploadStatus> {
        let slot = self.session(id)?;
        let mut guard = slot.lock().await;
        let w = self
            .take_writer(&mut guard, account, repo, owner, id)
            .await?;
        if let Some(start) = start {
            if start != w.offset() {
                let offset = w.offset();
                *guard = Some(w);
                return Err(ApiError::ChunkOutOfOrder { start, offset });
            }
        }
        let (w, appended) = self.append(w, body).await;
        let (w, saved) = self.checkpoint(w).await;
        let offset = w.offset();
        *guard = Some(w);
        appended?;
        saved?;
        Ok(UploadStatus {
            id: id.to_string(),
            offset,
        })
    }

    async fn upload_finish(
        &self,
        account: AccountId,
        repo: &RepoName,
        owner: &str,
        id: &str,
        digest: &Digest,
        body: BodyStream,
    ) -> RegistryResult<()> {
        let slot = self.session(id)?;
        let mut guard = slot.lock().await;
        let w = self
            .take_writer(&mut guard, account, repo, owner, id)
            .await?;
        let (w, appended) = self.append(w, body).await;
        if let Err(e) = appended {
            let (w, _) = self.checkpoint(w).await;
            *guard = Some(w);
            return Err(e);
        }
        let store = self.blobs.clone();
        let expected = digest.clone();
        // The session ends here whatever happens: committed, or gone on a digest mismatch.
        let finished = self
            .blocking(move || store.finish_upload(w, &expected).map_err(blob_err))
            .await;
        drop(guard);
        self.forget(id);
        self.commit_blob(account, repo, finished?).await
    }

    async fn upload_cancel(
        &self,
        account: AccountId,
        repo: &RepoName,
        owner: &str,
        id: &str,
    ) -> RegistryResult<()> {
        let slot = self.session(id)?;
        let mut guard = slot.lock().await;
        let w = self.take_writer(&mut guard, account, repo, owner, id).await;
        drop(guard);
        self.forget(id);
        w?;
        let store = self.blobs.clone();
        let id = id.to_string();
        self.blocking(move || store.delete_upload(&id).map_err(blob_err))
            .await
    }

    async fn manifest_get(
        &self,
        account: AccountId,
        repo: &RepoName,
        reference: &Reference,
    ) -> RegistryResult<Manifest> {
        let found = match self.resolve(account, repo, reference) {
            Ok(digest) => self
                .state()
                .manifest(account, repo, &digest)
                .map_err(state_err)?
                .map(|m| (digest, m)),
            Err(ApiError::ManifestUnknown(_)) => None,
            Err(e) => return Err(e),
        };
        let Some((digest, m)) = found else {
            if let Some(rt) = self.read_through.get() {
                if let Some(m) = rt.manifest(account, repo, reference).await {
                    return Ok(m);
                }
            }
            return Err(ApiError::ManifestUnknown(format!("{repo}:{reference}")));
        };
        Ok(Manifest {
            digest,
            media_type: m.media_type,
            bytes: Bytes::from(m.bytes),
        })
    }

    async fn manifest_put(
        &self,
        account: AccountId,
        repo: &RepoName,
        reference: &Reference,
        content_type: &str,
        bytes: Bytes,
        tag_move: bool,
    ) -> RegistryResult<ManifestPutResult> {
        let parsed = manifest::parse(&bytes, content_type, self.limits.manifest_bytes_max)
            .map_err(|e| match e {
                manifest::ManifestError::TooLarge {
                    size_bytes,
                    limit_bytes,
                } => ApiError::TooLarge {
                    what: "manifest",
                    size_bytes,
                    limit_bytes,
                },
                e => ApiError::ManifestInvalid(e.to_string()),
            })?;
        let (digest, tag) = match reference {
            Reference::Digest(d) => {
                let actual = Digest::of(d.algorithm(), &bytes);
                if &actual != d {
                    return Err(ApiError::DigestInvalid(format!(
                        "manifest content is {actual}, the URL says {d}"
                    )));
                }
                (actual, None)
            }
            Reference::Tag(t) => (Digest::sha256_of(&bytes), Some(t.clone())),
        };
        // Fail fast on missing references; apply checks again against committed state.
        for d in parsed.required_blobs() {
            if self.blob_linked(account, repo, d)?.is_none() {
                return Err(ApiError::ManifestBlobUnknown(d.clone()));
            }
        }
        for d in parsed.required_manifests() {
            if self
                .state()
                .manifest(account, repo, d)
                .map_err(state_err)?
                .is_none()
            {
                return Err(ApiError::ManifestBlobUnknown(d.clone()));
            }
        }
        let subject = parsed.subject.as_ref().map(|s| s.digest.clone());
        let cmd = match tag {
            Some(tag) if !tag_move => Command::ManifestPutNoTagMove {
                account,
                repo: repo.clone(),
                digest: digest.clone(),
                media_type: parsed.media_type().to_string(),
                bytes: bytes.to_vec(),
                tag,
                now_ms: self.clock.now_ms(),
            },
            tag => Command::ManifestPut {
                account,
                repo: repo.clone(),
                digest: digest.clone(),
                media_type: parsed.media_type().to_string(),
                bytes: bytes.to_vec(),
                tag,
                now_ms: self.clock.now_ms(),
            },
        };
        match self.propose(cmd).await? {
            Outcome::Done => Ok(ManifestPutResult { digest, subject }),
            o => Err(outcome_err(o)),
        }
    }

    async fn manifest_delete(
        &self,
        account: AccountId,
        repo: &RepoName,
        reference: &Reference,
    ) -> RegistryResult<()> {
        let cmd = match reference {
            Reference::Digest(d) => Command::ManifestDeleted {
                account,
                repo: repo.clone(),
                digest: d.clone(),
            },
            Reference::Tag(t) => Command::TagDeleted {
                account,
                repo: repo.clone(),
                tag: t.clone(),
                now_ms: self.clock.now_ms(),
            },
        };
        match self.propose(cmd).await? {
            Outcome::Done => Ok(()),
            o => Err(outcome_err(o)),
        }
    }

    async fn tags(
        &self,
        account: AccountId,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> RegistryResult<ListPage> {
        let st = self.state();
        if !st.repo_exists(account, repo).map_err(state_err)? {
            return Err(ApiError::NameUnknown(repo.clone()));
        }
        let p = st.tags(account, repo, last, n).map_err(state_err)?;
        Ok(ListPage {
            names: p.names,
            more: p.more,
        })
    }

    async fn catalog(
        &self,
        account: AccountId,
        last: Option<&str>,
        n: usize,
    ) -> RegistryResult<ListPage> {
        let p = self.state().catalog(account, last, n).map_err(state_err)?;
        Ok(ListPage {
            names: p.names,
            more: p.more,
        })
    }

    async fn referrers(
        &self,
        account: AccountId,
        repo: &RepoName,
        subject: &Digest,
    ) -> RegistryResult<Vec<(Digest, ReferrerRecord)>> {
        self.state()
            .referrers(account, repo, subject, self.limits.referrers_max as usize)
            .map_err(state_err)
    }
}

/// Removes sessions idle longer than `upload_idle_ms_max`; returns how many.
pub fn expire_uploads<B: BlobBackend>(
    store: &B,
    limits: &Limits,
    now_ms: u64,
    scan_max: usize,
) -> usize {
    let Ok(list) = store.list_uploads(scan_max) else {
        return 0;
    };
    let mut n = 0;
    for (id, updated) in list {
        if now_ms.saturating_sub(updated) > limits.upload_idle_ms_max
            && store.delete_upload(&id).is_ok()
        {
            n += 1;
        }
    }
    n
}

impl<P: Platform> NodeRegistry<P> {
    /// Number of sessions currently held in memory.
    pub fn open_sessions(&self) -> usize {
        self.sessions.lock().expect("sessions lock").len()
    }

    pub fn kv_store(&self) -> &dyn KvStore {
        self.kv.as_ref()
    }
}

/// Bound on repair steps per pass (each examines `REPAIR_BATCH_BLOBS` blobs).
const REPAIR_STEPS_PER_PASS_MAX: usize = 100_000;

/// Blobs examined per repair step, so one step is bounded whatever the region holds.
const REPAIR_BATCH_BLOBS: usize = 256;

/// What one repair step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RepairStep {
    pub examined: usize,
    pub repaired: usize,
    /// The scan wrapped around: every blob was examined since the last `done`.
    pub done: bool,
}

impl<P: Platform> NodeRegistry<P> {
    /// Whether this node leads its region right now.
    pub fn is_leader(&self) -> bool {
        !self.raft_stopped() && self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    /// The repair worker: two passes, each every `every`, one bounded step at a time, side
    /// by side (a slow leader pass — copies to an unreachable peer wait out their timeout —
    /// must not hold up the other): this node's own recorded copies (every node:
    /// `holdings_step`), and, on the leader only, every blob back to R copies on members
    /// (`repair_step`). Runs until its task is stopped.
    pub async fn repair_loop(self: Arc<Self>, every: std::time::Duration) {
        tokio::join!(
            self.repair_passes(every, false),
            self.repair_passes(every, true)
        );
    }

    async fn repair_passes(&self, every: std::time::Duration, leader_pass: bool) {
        let name = if leader_pass { "repair" } else { "holdings" };
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut cursor = None;
            let mut repaired = 0;
            for _ in 0..REPAIR_STEPS_PER_PASS_MAX {
                let step = if leader_pass {
                    self.repair_step(&mut cursor).await
                } else {
                    self.holdings_step(&mut cursor).await
                };
                match step {
                    Ok(s) => {
                        repaired += s.repaired;
                        if s.done {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, pass = name, "repair step failed");
                        break;
                    }
                }
            }
            if repaired > 0 {
                tracing::info!(repaired, pass = name, "repair restored blob copies");
            }
        }
    }

    /// One step of the holdings check (run on every node): examines a batch of blobs after
    /// `cursor` and, for each the region records this node as holding but whose copy is not
    /// here whole (a volume lost or replaced, a copy quarantined), fetches it again from
    /// another holder. Without it, the leader's repair — which counts holders, not copies —
    /// would never notice a holder that lost its copy. Checks presence and size only (a stat
    /// per blob); a copy damaged in place is found when it is next read (`read_verified`).
    pub async fn holdings_step(&self, cursor: &mut Option<Digest>) -> Result<RepairStep, ApiError> {
        let mut step = RepairStep::default();
        if self.peers.is_none() {
            step.done = true;
            return Ok(step);
        }
        let batch = self.next_repair_batch(cursor, &mut step)?;
        for (digest, rec) in batch {
            step.examined += 1;
            if !rec.holders.contains(&self.node_id)
                || self.blobs.blob_len(&digest) == Some(rec.size_bytes)
            {
                continue;
            }
            // A copy of the wrong size is damaged: out of the way before a good one comes.
            if self.blobs.blob_len(&digest).is_some() {
                let store = self.blobs.clone();
                let d = digest.clone();
                self.blocking(move || store.quarantine_blob(&d).map_err(blob_err))
                    .await?;
                self.corrupt_copies
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(%digest, "local blob copy has the wrong size; quarantined");
            }
            match self.fetch_from_holders(&digest).await {
                Ok(()) => step.repaired += 1,
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "holdings: recorded copy missing here, not fetched")
                }
            }
        }
        Ok(step)
    }

    /// The next batch of blobs after `cursor` for a repair pass; moves the cursor, and marks
    /// the step done (cursor back to the start) when the scan wrapped around.
    fn next_repair_batch(
        &self,
        cursor: &mut Option<Digest>,
        step: &mut RepairStep,
    ) -> Result<Vec<(Digest, engine::keys::BlobRecord)>, ApiError> {
        let batch = self
            .state()
            .blobs_after(cursor.as_ref(), REPAIR_BATCH_BLOBS)
            .map_err(state_err)?;
        step.done = batch.len() < REPAIR_BATCH_BLOBS;
        *cursor = if step.done {
            None
        } else {
            batch.last().map(|(d, _)| d.clone())
        };
        Ok(batch)
    }

    /// Finishes a membership change left half done: a committed joint configuration (old and
    /// new voter sets both needed for a quorum) stays joint when the leader that proposed it
    /// is replaced before it proposes the new set alone, and then losing one node of the old
    /// set can stop the region for good. The leader proposes the new set; a change another
    /// caller still has in flight makes this a no-op (openraft serialises them).
    async fn finish_joint_membership(&self) {
        let m = self.raft.metrics().borrow().clone();
        let configs = m.membership_config.membership().get_joint_config().clone();
        if configs.len() < 2 {
            return;
        }
        let Some(new) = configs.last().cloned() else {
            return;
        };
        tracing::warn!(?configs, "finishing a membership change left joint");
        match tokio::time::timeout(
            self.write_timeout,
            self.raft.change_membership(new.clone(), false),
        )
        .await
        {
            Ok(Ok(_)) => tracing::info!(voters = ?new, "membership change finished"),
            Ok(Err(e)) => tracing::warn!(error = %e, "finishing the membership change failed"),
            Err(_) => tracing::warn!("finishing the membership change timed out"),
        }
    }

    /// One step of the repair worker (run on the leader): examines a batch of blobs after
    /// `cursor` and brings each back to R = min(3, members) durable copies on current members
    /// — after a node was lost or removed — recording the new holders through Raft.
    pub async fn repair_step(&self, cursor: &mut Option<Digest>) -> Result<RepairStep, ApiError> {
        let mut step = RepairStep::default();
        let Some(peers) = self.peers.clone() else {
            step.done = true;
            return Ok(step);
        };
        if !self.is_leader() {
            step.done = true;
            return Ok(step);
        }
        if cursor.is_none() {
            self.finish_joint_membership().await;
        }
        let batch = self.next_repair_batch(cursor, &mut step)?;
        let members = self.members();
        let ids: Vec<u64> = members.iter().map(|(id, _)| *id).collect();
        let r = placement::replica_count(ids.len());
        for (digest, rec) in batch {
            step.examined += 1;
            let mut live: Vec<u64> = rec
                .holders
                .iter()
                .copied()
                .filter(|h| ids.contains(h))
                .collect();
            if live.len() >= r && live.len() == rec.holders.len() {
                continue;
            }
            if live.len() < r {
                if self.blobs.blob_len(&digest).is_none() {
                    if let Err(e) = self.fetch_from_holders(&digest).await {
                        tracing::warn!(%digest, error = %e, "repair: no live holder could send the blob");
                        continue;
                    }
                }
                if !live.contains(&self.node_id) {
                    live.push(self.node_id);
                }
                let bytes = match self.local_blob_bytes(&digest).await? {
                    Some(b) => b,
                    None => continue,
                };
                for target in placement::holders(&ids, &digest)
                    .into_iter()
                    .chain(ids.iter().copied())
                {
                    if live.len() >= r {
                        break;
                    }
                    if live.contains(&target) {
                        continue;
                    }
                    let Some((_, info)) = members.iter().find(|(id, _)| *id == target) else {
                        continue;
                    };
                    match self
                        .replication
                        .send(peers.as_ref(), target, info, &digest, bytes.clone())
                        .await
                    {
                        Ok(()) => live.push(target),
                        Err(e) => {
                            tracing::warn!(peer = target, %digest, error = %e, "repair copy failed")
                        }
                    }
                }
            }
            // Never record fewer holders than a write quorum while the old record names more:
            // a holder outside the membership now (removed for a while) still has its copy,
            // and may be the only one left if the copies made here are lost.
            if live.len() < placement::write_quorum(r) {
                for h in &rec.holders {
                    if !live.contains(h) {
                        live.push(*h);
                    }
                }
            }
            live.sort_unstable();
            if live == rec.holders {
                continue;
            }
            match self
                .propose(Command::BlobHoldersSet {
                    digest: digest.clone(),
                    holders: live,
                })
                .await?
            {
                Outcome::Done => step.repaired += 1,
                o => tracing::warn!(%digest, outcome = ?o, "repair: holders not recorded"),
            }
        }
        Ok(step)
    }
}
