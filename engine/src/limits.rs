//! Every bound the registry enforces, in one place (DESIGN.md "Limits"). The node's config
//! file carries this struct as its `[limits]` section; code reads limits from here, never
//! from literals of its own.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest manifest accepted. OCI suggests registries accept at least 4 MiB.
    pub manifest_bytes_max: u64,
    /// Largest single blob accepted (monolithic or chunked), so a client cannot fill the disk
    /// with one upload.
    pub blob_bytes_max: u64,
    /// Most upload sessions open at once on a node; past it POST answers 429.
    pub uploads_open_max: u64,
    /// An upload session untouched for this long is expired and its bytes removed.
    pub upload_idle_ms_max: u64,
    /// Most entries one page of `tags/list`, `_catalog` or referrers returns, whatever `n` says.
    pub list_page_entries_max: u64,
    /// Most referrers returned for one subject.
    pub referrers_max: u64,
    /// Largest request body read into memory (manifests; blob bodies are streamed to disk).
    pub request_body_bytes_max: u64,
    /// Most Raft proposals waiting to be committed; past it writes answer 429.
    pub raft_proposals_max: u64,
    /// Most concurrent HTTP requests a node serves; past it 429.
    pub http_requests_inflight_max: u64,
    /// Most open HTTP connections; further ones wait in the kernel's accept backlog.
    pub http_connections_max: u64,
    /// Most blob bytes a node has in flight to its peers at once (replica writes and repair);
    /// further copies wait.
    pub replication_inflight_bytes_max: u64,
    /// Most chunk bytes a region's worker has in flight to one other region (blobs shipped at
    /// once × one message of chunks); further blobs wait.
    pub geo_inflight_bytes_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            manifest_bytes_max: 4 * 1024 * 1024,
            blob_bytes_max: 64 * 1024 * 1024 * 1024,
            uploads_open_max: 1024,
            upload_idle_ms_max: 24 * 60 * 60 * 1000,
            list_page_entries_max: 10_000,
            referrers_max: 10_000,
            request_body_bytes_max: 4 * 1024 * 1024,
            raft_proposals_max: 4096,
            http_requests_inflight_max: 1024,
            http_connections_max: 4096,
            replication_inflight_bytes_max: 1024 * 1024 * 1024,
            geo_inflight_bytes_max: 64 * 1024 * 1024,
        }
    }
}
