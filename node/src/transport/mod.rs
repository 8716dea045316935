//! Peer traffic between the nodes of a region: Raft RPCs, forwarded writes, membership
//! changes and blob bytes.
//!
//! Owns: the wire messages (`PeerRequest`, `PeerResponse`), their framing and bounds, and the
//! `Transport` seam the rest of the node talks to (QUIC in production, simulated in the
//! simulator).
//! Never: decides anything — handlers (`PeerHandler`) do.

pub mod quic;

use std::future::Future;

use engine::chunker::ChunkRef;
use engine::origin::Stamp;
use engine::{AccountId, Digest, RepoName, Tag};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::raft::{NodeId, NodeInfo, Request, Response, TypeConfig};

/// Largest framed message. Raft batches are bounded by openraft's `max_payload_entries` and
/// snapshots travel in `snapshot_max_chunk_size` pieces, both well below this.
pub const FRAME_BYTES_MAX: u32 = 64 * 1024 * 1024;

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A metadata write a follower forwards to the leader.
    ClientWrite(Request),
    /// Add a node to the region (forwarded to the leader): learner, then voter.
    AddMember {
        node_id: NodeId,
        info: NodeInfo,
    },
    RemoveMember {
        node_id: NodeId,
    },
    /// Store a blob replica; exactly `size_bytes` raw bytes follow this frame on the stream.
    BlobPut {
        digest: Digest,
        size_bytes: u64,
    },
    /// Send a blob's bytes back, if this node holds it.
    BlobGet {
        digest: Digest,
    },
    /// From a node of another region (the only kind such nodes may send).
    Geo(GeoRequest),
}

/// Where a cross-region change lands: the destination account and repository, and the
/// account it comes from (a different one needs the destination's registry policy).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GeoTarget {
    pub source_account: AccountId,
    pub account: AccountId,
    pub repo: RepoName,
}

/// Requests between regions: shipping (offer blobs, query and send chunks, assemble, apply)
/// and read-through (fetch what a rule says the asking region receives). Every list is
/// bounded by `GEO_LIST_MAX` and every chunk batch by `GEO_BATCH_BYTES_MAX`.
#[derive(Debug, Serialize, Deserialize)]
pub enum GeoRequest {
    /// Round-trip time probe.
    Ping,
    /// Which of these blobs does the region lack? Those it has are linked into the target.
    Offer {
        target: GeoTarget,
        blobs: Vec<(Digest, u64)>,
    },
    /// Which of these chunks does the receiving node lack (answered with their indices)?
    ChunkQuery { chunks: Vec<ChunkRef> },
    /// Chunks to keep until a blob is assembled from them (each verified against its hash).
    Chunks { chunks: Vec<Vec<u8>> },
    /// Assemble a blob from chunks the node has, was sent, or finds in `data` (the last
    /// batch of missing chunks, carried along), verify, store on the region's write quorum and
    /// commit it into the target.
    Assemble {
        target: GeoTarget,
        digest: Digest,
        size_bytes: u64,
        chunks: Vec<ChunkRef>,
        data: Vec<Vec<u8>>,
    },
    /// Apply changes in order (their blobs are already there).
    Apply { items: Vec<(GeoTarget, GeoChange)> },
    /// Read-through: a manifest by tag or digest, if the holder's rules send the repository
    /// to the asking region and account.
    FetchManifest {
        target: GeoTarget,
        reference: String,
    },
    /// Nearest-region routing: does the region hold this blob in the target repository?
    HasBlob { target: GeoTarget, digest: Digest },
    /// Read-through: a blob's size and chunk list.
    FetchBlobIndex { target: GeoTarget, digest: Digest },
    /// Read-through: some chunks of a blob, by index in its chunk list.
    FetchChunks {
        target: GeoTarget,
        digest: Digest,
        indices: Vec<u32>,
    },
}

/// A change shipped to another region.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GeoChange {
    ManifestPut {
        digest: Digest,
        media_type: String,
        bytes: Vec<u8>,
        tag: Option<Tag>,
        stamp: Option<Stamp>,
    },
    TagDeleted {
        tag: Tag,
        stamp: Stamp,
    },
    ManifestDeleted {
        digest: Digest,
    },
    /// A manifest delete stamped by the region that made it (tags it took lose to later
    /// moves, last writer wins).
    ManifestDeletedAt {
        digest: Digest,
        stamp: engine::origin::Stamp,
    },
}

/// Answers to `GeoRequest`.
#[derive(Debug, Serialize, Deserialize)]
pub enum GeoResponse {
    Pong,
    Done,
    /// Digests of offered blobs the region lacks.
    MissingBlobs(Vec<Digest>),
    /// Indices of queried chunks the node lacks.
    MissingChunks(Vec<u32>),
    Manifest {
        digest: Digest,
        media_type: String,
        bytes: Vec<u8>,
    },
    BlobIndex {
        size_bytes: u64,
        chunks: Vec<ChunkRef>,
    },
    ChunkData(Vec<Vec<u8>>),
    NotFound(String),
    /// Not allowed (a policy, a rule); retrying does not help until configuration changes.
    Denied(String),
    /// Failed; retrying may help.
    Failed(String),
}

/// Items in one cross-region list (blobs offered, chunks queried or fetched).
pub const GEO_LIST_MAX: usize = 4096;
/// Chunk bytes in one cross-region message.
pub const GEO_BATCH_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// The answer to a `PeerRequest`.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// The applied write's response and its log index (the forwarding node waits until it
    /// has applied that index too, so its client reads its own write there).
    ClientWrite {
        index: u64,
        response: Response,
    },
    MembershipChanged,
    /// The blob is durable on the receiving node.
    BlobStored,
    /// The blob follows: exactly `size_bytes` raw bytes after this frame.
    BlobFound {
        size_bytes: u64,
    },
    BlobMissing,
    Geo(GeoResponse),
    /// The request was understood and refused or failed; the text says why.
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("node {0} is not reachable: {1}")]
    Unreachable(NodeId, String),
    #[error("peer {0} timed out")]
    Timeout(NodeId),
    #[error("peer {peer} broke the protocol: {reason}")]
    Protocol { peer: NodeId, reason: String },
    #[error("peer {peer} refused: {reason}")]
    Refused { peer: NodeId, reason: String },
    #[error("local i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Bytes of a blob being sent (a memory map of the committed file, or a buffer).
pub type BlobBytes = bytes::Bytes;

/// A stream of blob bytes arriving from a peer.
pub type BlobReader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// How a node reaches its peers. Implementations bound every request in time and size.
pub trait Transport: Send + Sync + 'static {
    /// One request, one response.
    fn call(
        &self,
        target: NodeId,
        addr: &NodeInfo,
        req: PeerRequest,
    ) -> impl Future<Output = Result<PeerResponse, TransportError>> + Send;

    /// Sends a blob's bytes; returns once the peer has stored them durably.
    fn put_blob(
        &self,
        target: NodeId,
        addr: &NodeInfo,
        digest: &Digest,
        bytes: BlobBytes,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Asks a peer for a blob: its size and a reader of exactly that many bytes, or `None`
    /// when the peer does not hold it.
    fn get_blob(
        &self,
        target: NodeId,
        addr: &NodeInfo,
        digest: &Digest,
    ) -> impl Future<Output = Result<Option<(u64, BlobReader)>, TransportError>> + Send;
}

/// What a node does with requests from peers.
pub trait PeerHandler: Send + Sync + 'static {
    fn handle(&self, req: PeerRequest) -> impl Future<Output = PeerResponse> + Send;

    /// Stores a replica of `size_bytes` bytes read from `body` (verified against `digest`).
    fn store_blob(
        &self,
        digest: Digest,
        size_bytes: u64,
        body: BlobReader,
    ) -> impl Future<Output = PeerResponse> + Send;

    /// The bytes of a blob this node holds.
    fn read_blob(&self, digest: &Digest) -> impl Future<Output = Option<BlobBytes>> + Send;

    /// A request from a node of the other region `from`.
    fn handle_geo(&self, from: &str, req: GeoRequest) -> impl Future<Output = GeoResponse> + Send;
}
