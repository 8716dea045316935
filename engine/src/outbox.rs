//! The replication outbox: applying a manifest push, a tag delete or a manifest delete in a
//! repository that the account's replication configuration names appends an event, in apply
//! order, for the cross-region workers to ship (at least once; the receiving side applies
//! idempotently).
//!
//! ```text
//! cf      key                 value
//! ------  ------------------  -----------
//! outbox  seq (u64 BE)        OutboxEvent
//! sm_meta "outbox_seq"        u64: the last sequence number given
//! sm_meta "repl_cursor/" region "/" acct   u64: events up to here are applied there
//! sm_meta "repl_dest/" region "/" acct     Destination: named by some event
//! sm_meta "repl_failure/" region "/" acct  String: why shipping there fails
//! ```
//! Owns: which changes become events (the rules at apply time, `PREFIX_MATCH` filters), their
//! order. Never: ships anything, reads the clock.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::iam::Iam;
use crate::keys::{self, Cf};
use crate::kv::{Batch, KvStore};
use crate::name::{AccountId, RepoName, Tag};
use crate::origin::Stamp;
use crate::state::{dec, StateError};

/// Events kept at most. Past it the oldest event is dropped as each new one arrives (a
/// destination that far behind needs a full resynchronisation, which its cursor shows: it
/// points before the first event kept). A constant, not a setting: every replica must apply
/// the same bound.
pub const OUTBOX_EVENTS_MAX: u64 = 1_000_000;

/// The last outbox sequence number given (in `sm_meta`).
pub const OUTBOX_SEQ: &[u8] = b"outbox_seq";

/// A replication destination: a region and an account (`registryId`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Destination {
    pub region: String,
    pub account: AccountId,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// A manifest stored, and `tag` moved to it if given.
    ManifestPut {
        digest: Digest,
        tag: Option<Tag>,
        /// The tag move's origin stamp (with `tag`).
        stamp: Option<Stamp>,
    },
    ManifestDeleted {
        digest: Digest,
    },
    TagDeleted {
        tag: Tag,
        stamp: Stamp,
    },
    /// A manifest deleted at `stamp`: the tags that pointed at it went with it unless another
    /// region moved them later (last writer wins, as for tag deletes). Recorded since deletes
    /// are stamped; `ManifestDeleted` stays readable for events recorded before.
    ManifestDeletedAt {
        digest: Digest,
        stamp: Stamp,
    },
}

/// One event of the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEvent {
    pub seq: u64,
    pub account: AccountId,
    pub repo: RepoName,
    pub change: Change,
    /// The proposer's wall clock when the change was made (0 where the command carries none).
    pub at_ms: u64,
    /// Where the rules in force when it was applied send it.
    pub destinations: Vec<Destination>,
}

#[derive(Deserialize)]
struct Config {
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    destinations: Vec<RuleDestination>,
    #[serde(default, rename = "repositoryFilters")]
    filters: Vec<Filter>,
}

#[derive(Deserialize)]
struct RuleDestination {
    region: String,
    #[serde(rename = "registryId")]
    registry_id: String,
}

#[derive(Deserialize)]
struct Filter {
    filter: String,
}

/// The destinations the account's rules give `repo` (a rule without filters covers every
/// repository; filters match by prefix), without duplicates, in order.
pub fn destinations<S: KvStore + ?Sized>(
    kv: &S,
    acct: AccountId,
    repo: &RepoName,
) -> Result<Vec<Destination>, StateError> {
    let Some(text) = Iam::new(kv).replication_config(acct)? else {
        return Ok(Vec::new());
    };
    // Validated before it was stored; a configuration that no longer parses sends nothing.
    let Ok(config) = serde_json::from_str::<Config>(&text) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<Destination> = Vec::new();
    for rule in config.rules {
        let covered = rule.filters.is_empty()
            || rule
                .filters
                .iter()
                .any(|f| repo.as_str().starts_with(f.filter.as_str()));
        if !covered {
            continue;
        }
        for d in rule.destinations {
            let Ok(account) = AccountId::parse(&d.registry_id) else {
                continue;
            };
            let d = Destination {
                region: d.region,
                account,
            };
            if !out.contains(&d) {
                out.push(d);
            }
        }
    }
    Ok(out)
}

/// Appends an event for `change` to the outbox if the account replicates `repo`.
pub fn record<S: KvStore + ?Sized>(
    kv: &S,
    acct: AccountId,
    repo: &RepoName,
    change: Change,
    at_ms: u64,
    batch: &mut Batch,
) -> Result<(), StateError> {
    let destinations = destinations(kv, acct, repo)?;
    if destinations.is_empty() {
        return Ok(());
    }
    let seq = last_seq(kv)? + 1;
    batch.put(Cf::SmMeta, OUTBOX_SEQ.to_vec(), keys::encode(&seq));
    for d in &destinations {
        batch.put(Cf::SmMeta, dest_key("repl_dest", d), keys::encode(d));
    }
    if seq > OUTBOX_EVENTS_MAX {
        batch.delete(Cf::Outbox, (seq - OUTBOX_EVENTS_MAX).to_be_bytes().to_vec());
    }
    batch.put(
        Cf::Outbox,
        seq.to_be_bytes().to_vec(),
        keys::encode(&OutboxEvent {
            seq,
            account: acct,
            repo: repo.clone(),
            change,
            at_ms,
            destinations,
        }),
    );
    Ok(())
}

/// A counter in `sm_meta` (0 when absent).
fn meta_u64<S: KvStore + ?Sized>(
    kv: &S,
    key: &[u8],
    what: &'static str,
) -> Result<u64, StateError> {
    kv.get(Cf::SmMeta, key)?.map_or(Ok(0), |b| dec(what, &b))
}

/// The `sm_meta` key of one destination's `kind` of record (`repl_dest`, `repl_cursor`, ...).
fn dest_key(kind: &str, dest: &Destination) -> Vec<u8> {
    format!("{kind}/{}/{}", dest.region, dest.account).into_bytes()
}

/// The last sequence number given (0: none yet).
pub fn last_seq<S: KvStore + ?Sized>(kv: &S) -> Result<u64, StateError> {
    meta_u64(kv, OUTBOX_SEQ, "outbox sequence")
}

/// Events after `after` (exclusive), at most `limit`, in order.
pub fn events_after<S: KvStore + ?Sized>(
    kv: &S,
    after: u64,
    limit: usize,
) -> Result<Vec<OutboxEvent>, StateError> {
    let start = after.saturating_add(1).to_be_bytes();
    kv.scan(Cf::Outbox, b"", &start, limit)?
        .into_iter()
        .map(|(_, v)| dec("outbox event", &v))
        .collect()
}

const DEST_PREFIX: &[u8] = b"repl_dest/";

/// Destinations that ever received an event (each gets a worker), at most
/// `DESTINATIONS_MAX`.
pub fn known_destinations<S: KvStore + ?Sized>(kv: &S) -> Result<Vec<Destination>, StateError> {
    kv.scan(Cf::SmMeta, DEST_PREFIX, DEST_PREFIX, DESTINATIONS_MAX)?
        .into_iter()
        .map(|(_, v)| dec("replication destination", &v))
        .collect()
}

/// Destinations a region ships to at most (each has a worker and a cursor).
pub const DESTINATIONS_MAX: usize = 256;

/// Records why shipping to `dest` fails (`None`: it works again).
pub fn set_failure(dest: &Destination, reason: Option<&str>, batch: &mut Batch) {
    match reason {
        Some(r) => batch.put(
            Cf::SmMeta,
            dest_key("repl_failure", dest),
            keys::encode(&r.to_string()),
        ),
        None => batch.delete(Cf::SmMeta, dest_key("repl_failure", dest)),
    }
}

/// Why shipping to `dest` fails, if it does.
pub fn failure<S: KvStore + ?Sized>(
    kv: &S,
    dest: &Destination,
) -> Result<Option<String>, StateError> {
    kv.get(Cf::SmMeta, &dest_key("repl_failure", dest))?
        .map(|b| dec("replication failure", &b))
        .transpose()
}

/// How far `dest` has applied the outbox (0: nothing yet).
pub fn cursor<S: KvStore + ?Sized>(kv: &S, dest: &Destination) -> Result<u64, StateError> {
    meta_u64(kv, &dest_key("repl_cursor", dest), "replication cursor")
}

/// Moves `dest`'s cursor to `seq`; never backwards (a late, repeated report of an older
/// position changes nothing), never past the last event.
pub fn advance<S: KvStore + ?Sized>(
    kv: &S,
    dest: &Destination,
    seq: u64,
    batch: &mut Batch,
) -> Result<(), StateError> {
    let seq = seq.min(last_seq(kv)?);
    if seq > cursor(kv, dest)? {
        batch.put(
            Cf::SmMeta,
            dest_key("repl_cursor", dest),
            keys::encode(&seq),
        );
    }
    Ok(())
}
