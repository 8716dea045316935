//! Persistent layout: every column family, its key encoding and its value type.
//!
//! ```text
//! cf           key                                               value
//! ----------   -----------------------------------------------   ---------------------------
//! repos        acct(u64 BE) repo                                 RepoRecord
//! blobs        digest ("sha256:<hex>")                           BlobRecord
//! repo_blobs   acct repo 0x00 digest                             BlobLink
//! manifests    acct repo 0x00 digest                             ManifestRecord
//! tags         acct repo 0x00 tag                                TagRecord
//! referrers    acct repo 0x00 subject-digest 0x00 referrer-digest ReferrerRecord
//! sm_meta      "last_applied" | "membership"                      opaque (the node's Raft types)
//! sm_meta      "stats"                                            Stats
//! raft_log     log index (u64 BE)                                 opaque Raft entry
//! raft_meta    "vote" | "committed" | "last_purged"              opaque
//! iam          see `iam.rs`                                      accounts, users, keys, settings
//! outbox       see `outbox.rs`                                   replication events
//! ```
//! Repository names never contain 0x00 (OCI grammar), so `repo 0x00` ends a repository's key
//! range unambiguously: `a` and `a/b` do not share a prefix once the separator follows.
//! Values are bincode of a versioned enum (`…Versioned::V1`); a new layout adds `V2` and a
//! migration from `V1`, never changes `V1`.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::name::{AccountId, RepoName};

/// Column families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    Repos,
    Blobs,
    RepoBlobs,
    Manifests,
    Tags,
    Referrers,
    SmMeta,
    RaftLog,
    RaftMeta,
    /// Accounts, users, keys, policies, repository settings (`iam.rs` draws its layout).
    Iam,
    /// Replication events in apply order (`outbox.rs` draws its layout).
    Outbox,
    /// Origin stamps and history of tag changes (`origin.rs` draws its layout).
    TagOrigins,
}

impl Cf {
    pub const ALL: [Cf; 12] = [
        Cf::Repos,
        Cf::Blobs,
        Cf::RepoBlobs,
        Cf::Manifests,
        Cf::Tags,
        Cf::Referrers,
        Cf::SmMeta,
        Cf::RaftLog,
        Cf::RaftMeta,
        Cf::Iam,
        Cf::Outbox,
        Cf::TagOrigins,
    ];

    /// The families that make up the replicated state machine (what a snapshot carries).
    pub const STATE: [Cf; 10] = [
        Cf::Repos,
        Cf::Blobs,
        Cf::RepoBlobs,
        Cf::Manifests,
        Cf::Tags,
        Cf::Referrers,
        Cf::SmMeta,
        Cf::Iam,
        Cf::Outbox,
        Cf::TagOrigins,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Repos => "repos",
            Cf::Blobs => "blobs",
            Cf::RepoBlobs => "repo_blobs",
            Cf::Manifests => "manifests",
            Cf::Tags => "tags",
            Cf::Referrers => "referrers",
            Cf::SmMeta => "sm_meta",
            Cf::RaftLog => "raft_log",
            Cf::RaftMeta => "raft_meta",
            Cf::Iam => "iam",
            Cf::Outbox => "outbox",
            Cf::TagOrigins => "tag_origins",
        }
    }

    pub fn from_name(name: &str) -> Option<Cf> {
        Cf::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// `acct repo` — the key of a repository.
pub fn repo_key(acct: AccountId, repo: &RepoName) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + repo.as_str().len());
    k.extend_from_slice(&acct.as_u64().to_be_bytes());
    k.extend_from_slice(repo.as_str().as_bytes());
    k
}

/// `acct` — prefix of all repositories of an account.
pub fn account_prefix(acct: AccountId) -> Vec<u8> {
    acct.as_u64().to_be_bytes().to_vec()
}

/// `acct repo 0x00` — prefix of everything inside a repository.
pub fn repo_prefix(acct: AccountId, repo: &RepoName) -> Vec<u8> {
    let mut k = repo_key(acct, repo);
    k.push(0);
    k
}

/// `acct repo 0x00 item` — a tag, a manifest digest or a linked blob digest in a repository.
pub fn repo_item_key(acct: AccountId, repo: &RepoName, item: &str) -> Vec<u8> {
    let mut k = repo_prefix(acct, repo);
    k.extend_from_slice(item.as_bytes());
    k
}

/// `acct repo 0x00 subject 0x00` — prefix of a subject's referrers.
pub fn referrers_prefix(acct: AccountId, repo: &RepoName, subject: &Digest) -> Vec<u8> {
    let mut k = repo_item_key(acct, repo, &subject.to_string());
    k.push(0);
    k
}

pub fn referrer_key(
    acct: AccountId,
    repo: &RepoName,
    subject: &Digest,
    referrer: &Digest,
) -> Vec<u8> {
    let mut k = referrers_prefix(acct, repo, subject);
    k.extend_from_slice(referrer.to_string().as_bytes());
    k
}

pub fn log_index_key(index: u64) -> Vec<u8> {
    index.to_be_bytes().to_vec()
}

pub fn decode_log_index(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

pub const SM_LAST_APPLIED: &[u8] = b"last_applied";
pub const SM_MEMBERSHIP: &[u8] = b"membership";
pub const SM_STATS: &[u8] = b"stats";
pub const RAFT_VOTE: &[u8] = b"vote";
pub const RAFT_COMMITTED: &[u8] = b"committed";
pub const RAFT_LAST_PURGED: &[u8] = b"last_purged";

/// A repository exists once something was pushed to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoRecord {
    pub created_ms: u64,
}

/// A blob the region holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    pub size_bytes: u64,
    /// Node ids holding a durable copy.
    pub holders: Vec<u64>,
    pub committed_ms: u64,
    /// Number of repository links.
    pub links: u64,
}

/// Totals kept by the state machine, so status needs no scan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub blobs: u64,
    pub blob_bytes: u64,
}

/// A blob linked into a repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobLink {
    pub size_bytes: u64,
    pub linked_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub subject: Option<Digest>,
    pub pushed_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    pub updated_ms: u64,
}

/// What the referrers API lists for one referrer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferrerRecord {
    pub media_type: String,
    pub size_bytes: u64,
    pub artifact_type: Option<String>,
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

/// Versioned envelope for every stored value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Versioned<T> {
    V1(T),
}

/// Encodes a value in its current version.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serialize(&Versioned::V1(value)).expect("in-memory values always serialize")
}

/// Decodes a stored value, migrating older versions.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, bincode::Error> {
    let Versioned::V1(v) = bincode::deserialize::<Versioned<T>>(bytes)?;
    Ok(v)
}
