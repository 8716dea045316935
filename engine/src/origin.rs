//! Origin stamps of tag changes, for last-writer-wins across regions.
//!
//! Every tag move or delete is stamped with a hybrid logical clock reading and the region
//! that made it. A region applying a change from another region compares stamps: the later
//! one wins, the other is kept in the tag's history. Stamps are totally ordered (clock, then
//! region name), so every region reaches the same winner whatever order changes arrive in.
//!
//! ```text
//! cf           key                                    value
//! -----------  -------------------------------------  ---------------------------------
//! tag_origins  acct repo 0x00 tag                     TagOrigin (the current stamp; a
//!                                                      deleted tag keeps a tombstone)
//! tag_origins  acct repo 0x00 tag 0x00 hlc(BE) region HistoryEntry (a replaced change)
//! sm_meta      "hlc"                                  u64: the highest clock reading seen
//! ```
//! Owns: the clock, stamp order, history bounds. Never: reads the wall clock (the proposer's
//! time comes in the command).

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::keys::{self, Cf};
use crate::kv::{Batch, KvStore};
use crate::name::{AccountId, RepoName, Tag};
use crate::state::{dec, StateError};

/// History entries kept per tag; the oldest go first.
pub const TAG_HISTORY_MAX: usize = 64;

/// The clock's logical counter takes the low bits; the high bits are milliseconds.
const LOGICAL_BITS: u32 = 16;

const HLC_KEY: &[u8] = b"hlc";

/// When and where a tag change was made. Ordered by clock reading, then region name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// Hybrid logical clock: milliseconds << 16 | logical counter.
    pub hlc: u64,
    pub region: String,
}

/// The first clock reading of millisecond `ms`.
pub fn hlc_of_ms(ms: u64) -> u64 {
    ms << LOGICAL_BITS
}

impl Stamp {
    /// The wall-clock milliseconds of the reading.
    pub fn ms(&self) -> u64 {
        self.hlc >> LOGICAL_BITS
    }
}

impl std::fmt::Display for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{}@{}",
            self.ms(),
            self.hlc & ((1 << LOGICAL_BITS) - 1),
            self.region
        )
    }
}

/// A tag's current state as last changed: where it points (`None`: deleted) and the stamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagOrigin {
    pub digest: Option<Digest>,
    pub stamp: Stamp,
}

/// A change that lost, or was replaced: where the tag pointed (`None`: a delete) and its stamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub digest: Option<Digest>,
    pub stamp: Stamp,
}

fn origin_key(acct: AccountId, repo: &RepoName, tag: &Tag) -> Vec<u8> {
    keys::repo_item_key(acct, repo, tag.as_str())
}

fn history_prefix(acct: AccountId, repo: &RepoName, tag: &Tag) -> Vec<u8> {
    let mut k = origin_key(acct, repo, tag);
    k.push(0);
    k
}

/// The highest clock reading this region has seen (0: none).
pub fn hlc<S: KvStore + ?Sized>(kv: &S) -> Result<u64, StateError> {
    kv.get(Cf::SmMeta, HLC_KEY)?
        .map_or(Ok(0), |b| dec("hybrid logical clock", &b))
}

/// A new local reading: after every reading seen, and not behind the proposer's wall clock.
pub fn tick<S: KvStore + ?Sized>(
    kv: &S,
    now_ms: u64,
    batch: &mut Batch,
) -> Result<u64, StateError> {
    let next = hlc_of_ms(now_ms).max(hlc(kv)?.saturating_add(1));
    batch.put(Cf::SmMeta, HLC_KEY.to_vec(), keys::encode(&next));
    Ok(next)
}

/// Advances the clock past a reading received from another region.
pub fn observe<S: KvStore + ?Sized>(
    kv: &S,
    seen: u64,
    batch: &mut Batch,
) -> Result<(), StateError> {
    if seen > hlc(kv)? {
        batch.put(Cf::SmMeta, HLC_KEY.to_vec(), keys::encode(&seen));
    }
    Ok(())
}

/// The tag's current origin, if it was ever stamped.
pub fn current<S: KvStore + ?Sized>(
    kv: &S,
    acct: AccountId,
    repo: &RepoName,
    tag: &Tag,
) -> Result<Option<TagOrigin>, StateError> {
    kv.get(Cf::TagOrigins, &origin_key(acct, repo, tag))?
        .map(|b| dec("tag origin", &b))
        .transpose()
}

/// Records `origin` as the tag's current state; the state it replaces goes to the history.
pub fn set<S: KvStore + ?Sized>(
    kv: &S,
    acct: AccountId,
    repo: &RepoName,
    tag: &Tag,
    origin: &TagOrigin,
    batch: &mut Batch,
) -> Result<(), StateError> {
    if let Some(prev) = current(kv, acct, repo, tag)? {
        push_history(
            kv,
            acct,
            repo,
            tag,
            &HistoryEntry {
                digest: prev.digest,
                stamp: prev.stamp,
            },
            batch,
        )?;
    }
    batch.put(
        Cf::TagOrigins,
        origin_key(acct, repo, tag),
        keys::encode(origin),
    );
    Ok(())
}

/// Adds an entry to the tag's history, dropping the oldest past `TAG_HISTORY_MAX`.
pub fn push_history<S: KvStore + ?Sized>(
    kv: &S,
    acct: AccountId,
    repo: &RepoName,
    tag: &Tag,
    entry: &HistoryEntry,
    batch: &mut Batch,
) -> Result<(), StateError> {
    let prefix = history_prefix(acct, repo, tag);
    let mut key = prefix.clone();
    key.extend_from_slice(&entry.stamp.hlc.to_be_bytes());
    key.extend_from_slice(entry.stamp.region.as_bytes());
    let kept = kv.scan(Cf::TagOrigins, &prefix, &prefix, TAG_HISTORY_MAX)?;
    if kept.len() >= TAG_HISTORY_MAX {
        if let Some((oldest, _)) = kept.first() {
            batch.delete(Cf::TagOrigins, oldest.clone());
        }
    }
    batch.put(Cf::TagOrigins, key, keys::encode(entry));
    Ok(())
}

/// The tag's history, oldest first (at most `TAG_HISTORY_MAX`).
pub fn history<S: KvStore + ?Sized>(
    kv: &S,
    acct: AccountId,
    repo: &RepoName,
    tag: &Tag,
) -> Result<Vec<HistoryEntry>, StateError> {
    let prefix = history_prefix(acct, repo, tag);
    kv.scan(Cf::TagOrigins, &prefix, &prefix, TAG_HISTORY_MAX)?
        .into_iter()
        .map(|(_, v)| dec("tag history entry", &v))
        .collect()
}
