//! The metadata state machine: commands in, deterministic state out.
//!
//! Owns: the `Command` set, applying a command to the stored state (as one `Batch`), and the
//! read queries over that state (tags, manifests, blob links, catalog, referrers).
//! Never: reads the clock (times arrive inside commands, stamped by the proposer), performs
//! I/O other than through `KvStore`, or decides placement.
//! Invariants: applying the same command sequence to the same state gives the same state;
//! a tag only ever names a manifest stored in its repository; a stored manifest's blobs
//! and child manifests are linked in its repository when it is applied.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::keys::{
    self, BlobLink, BlobRecord, Cf, ManifestRecord, ReferrerRecord, RepoRecord, TagRecord,
};
use crate::kv::{Batch, KvError, KvStore};
use crate::manifest;
use crate::name::{AccountId, RepoName, Tag};

/// A change to the region's metadata, replicated through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A blob is durable on `holders` and linked into `repo`.
    BlobCommitted {
        account: AccountId,
        repo: RepoName,
        digest: Digest,
        size_bytes: u64,
        holders: Vec<u64>,
        now_ms: u64,
    },
    /// Cross-repository mount: link a blob that `from` has into `repo`.
    BlobMounted {
        account: AccountId,
        repo: RepoName,
        from: RepoName,
        digest: Digest,
        now_ms: u64,
    },
    BlobUnlinked {
        account: AccountId,
        repo: RepoName,
        digest: Digest,
    },
    /// Store a manifest (already validated by the proposer) and optionally move a tag to it.
    ManifestPut {
        account: AccountId,
        repo: RepoName,
        digest: Digest,
        media_type: String,
        bytes: Vec<u8>,
        tag: Option<Tag>,
        now_ms: u64,
    },
    ManifestDeleted {
        account: AccountId,
        repo: RepoName,
        digest: Digest,
    },
    TagDeleted {
        account: AccountId,
        repo: RepoName,
        tag: Tag,
        /// The proposer's wall clock (stamps the delete for other regions).
        now_ms: u64,
    },
    /// The repair task moved a blob's copies: `holders` now hold it durably.
    BlobHoldersSet { digest: Digest, holders: Vec<u64> },
    /// Accounts, users, keys, policies and repository settings.
    Iam(crate::iam::IamCommand),
    /// A destination region has applied the outbox up to `seq` (moves forward only).
    ReplicationCursorAdvanced {
        destination: crate::outbox::Destination,
        seq: u64,
    },
    /// A manifest push made in another region, applied with its tag change's origin stamp:
    /// the tag moves only if the stamp is later than the tag's current one (else the change
    /// goes to the tag's history). Idempotent; never appended to this region's outbox.
    ReplicaManifestPut {
        account: AccountId,
        repo: RepoName,
        digest: Digest,
        media_type: String,
        bytes: Vec<u8>,
        tag: Option<Tag>,
        stamp: crate::origin::Stamp,
        now_ms: u64,
    },
    /// A tag delete made in another region (last-writer-wins on the stamp, like a move).
    ReplicaTagDeleted {
        account: AccountId,
        repo: RepoName,
        tag: Tag,
        stamp: crate::origin::Stamp,
    },
    /// A manifest delete made in another region (idempotent: an absent manifest is done).
    ReplicaManifestDeleted {
        account: AccountId,
        repo: RepoName,
        digest: Digest,
    },
    /// Shipping to a destination started failing (`reason`) or works again (`None`).
    ReplicationFailureSet {
        destination: crate::outbox::Destination,
        reason: Option<String>,
    },
    /// As `ManifestPut` with a tag, for a principal not allowed to move existing tags: refused
    /// (`TagExists`) if the tag names another manifest when applied.
    ManifestPutNoTagMove {
        account: AccountId,
        repo: RepoName,
        digest: Digest,
        media_type: String,
        bytes: Vec<u8>,
        tag: Tag,
        now_ms: u64,
    },
    /// A manifest delete made in another region at `stamp`: each tag pointing at it goes
    /// unless its current state is newer (then it and the manifest stay: the later move
    /// wins); replayed, it changes nothing. Idempotent: an absent manifest is done.
    ReplicaManifestDeletedAt {
        account: AccountId,
        repo: RepoName,
        digest: Digest,
        stamp: crate::origin::Stamp,
    },
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::BlobCommitted { .. } => "blob_committed",
            Command::BlobMounted { .. } => "blob_mounted",
            Command::BlobUnlinked { .. } => "blob_unlinked",
            Command::ManifestPut { .. } => "manifest_put",
            Command::ManifestDeleted { .. } => "manifest_deleted",
            Command::TagDeleted { .. } => "tag_deleted",
            Command::BlobHoldersSet { .. } => "blob_holders_set",
            Command::Iam(_) => "iam",
            Command::ManifestPutNoTagMove { .. } => "manifest_put_no_tag_move",
            Command::ReplicationCursorAdvanced { .. } => "replication_cursor_advanced",
            Command::ReplicaManifestPut { .. } => "replica_manifest_put",
            Command::ReplicaTagDeleted { .. } => "replica_tag_deleted",
            Command::ReplicaManifestDeleted { .. } => "replica_manifest_deleted",
            Command::ReplicationFailureSet { .. } => "replication_failure_set",
            Command::ReplicaManifestDeletedAt { .. } => "replica_manifest_deleted_at",
        }
    }
}

/// The outcome of applying a command. Rejections are outcomes, not errors: they are part of
/// the replicated history and every replica reaches the same one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    BlobUnknown(Digest),
    ManifestUnknown(Digest),
    ManifestBlobUnknown(Digest),
    ManifestInvalid(String),
    TagUnknown(Tag),
    /// An IAM command or a repository-settings rule refused the change.
    Refused(crate::iam::Refusal),
}

/// Failures to read or write the store — not rejections of a command.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("stored {what} is corrupt: {source}")]
    Decode {
        what: &'static str,
        source: bincode::Error,
    },
}

/// Decodes a stored value, naming what it is in the error.
pub(crate) fn dec<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StateError> {
    keys::decode(bytes).map_err(|source| StateError::Decode { what, source })
}

/// A page of names and whether more follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub names: Vec<String>,
    pub more: bool,
}

/// Reads and applies over any `KvStore`.
pub struct State<'a, S: KvStore + ?Sized> {
    kv: &'a S,
    /// The region applying commands: it stamps the tag changes made here.
    region: &'a str,
}

impl<'a, S: KvStore + ?Sized> State<'a, S> {
    pub fn new(kv: &'a S) -> Self {
        State { kv, region: "" }
    }

    /// The state as the region named `region` applies it (its stamps carry the name).
    pub fn in_region(mut self, region: &'a str) -> Self {
        self.region = region;
        self
    }

    // ---- reads ----

    /// Blob count and bytes of the region.
    pub fn stats(&self) -> Result<keys::Stats, StateError> {
        Ok(self
            .kv
            .get(Cf::SmMeta, keys::SM_STATS)?
            .map(|v| dec("stats", &v))
            .transpose()?
            .unwrap_or_default())
    }

    pub fn repo_exists(&self, acct: AccountId, repo: &RepoName) -> Result<bool, StateError> {
        Ok(self
            .kv
            .get(Cf::Repos, &keys::repo_key(acct, repo))?
            .is_some())
    }

    pub fn blob(&self, digest: &Digest) -> Result<Option<BlobRecord>, StateError> {
        self.kv
            .get(Cf::Blobs, digest.to_string().as_bytes())?
            .map(|v| dec("blob record", &v))
            .transpose()
    }

    pub fn blob_link(
        &self,
        acct: AccountId,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<BlobLink>, StateError> {
        self.kv
            .get(
                Cf::RepoBlobs,
                &keys::repo_item_key(acct, repo, &digest.to_string()),
            )?
            .map(|v| dec("blob link", &v))
            .transpose()
    }

    pub fn manifest(
        &self,
        acct: AccountId,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<ManifestRecord>, StateError> {
        self.kv
            .get(
                Cf::Manifests,
                &keys::repo_item_key(acct, repo, &digest.to_string()),
            )?
            .map(|v| dec("manifest", &v))
            .transpose()
    }

    pub fn tag(
        &self,
        acct: AccountId,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<TagRecord>, StateError> {
        self.kv
            .get(Cf::Tags, &keys::repo_item_key(acct, repo, tag.as_str()))?
            .map(|v| dec("tag", &v))
            .transpose()
    }

    /// Tags of a repository in lexical order, after `last`, at most `n`.
    pub fn tags(
        &self,
        acct: AccountId,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> Result<Page, StateError> {
        let prefix = keys::repo_prefix(acct, repo);
        self.page(Cf::Tags, &prefix, last, n)
    }

    /// Manifests of a repository (digest text and record), after `after`, at most `n`.
    pub fn manifests_page(
        &self,
        acct: AccountId,
        repo: &RepoName,
        after: Option<&str>,
        n: usize,
    ) -> Result<Vec<(String, ManifestRecord)>, StateError> {
        self.records(Cf::Manifests, acct, repo, after, n, "manifest")
    }

    /// Tags of a repository with what they point at, after `after`, at most `n`.
    pub fn tag_records(
        &self,
        acct: AccountId,
        repo: &RepoName,
        after: Option<&str>,
        n: usize,
    ) -> Result<Vec<(String, TagRecord)>, StateError> {
        self.records(Cf::Tags, acct, repo, after, n, "tag")
    }

    fn records<T: for<'de> Deserialize<'de>>(
        &self,
        cf: Cf,
        acct: AccountId,
        repo: &RepoName,
        after: Option<&str>,
        n: usize,
        what: &'static str,
    ) -> Result<Vec<(String, T)>, StateError> {
        let prefix = keys::repo_prefix(acct, repo);
        let mut start = prefix.clone();
        if let Some(a) = after {
            start.extend_from_slice(a.as_bytes());
            start.push(0);
        }
        self.kv
            .scan(cf, &prefix, &start, n)?
            .into_iter()
            .map(|(k, v)| {
                let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                Ok((name, dec(what, &v)?))
            })
            .collect()
    }

    /// Repositories of an account in lexical order, after `last`, at most `n`.
    pub fn catalog(
        &self,
        acct: AccountId,
        last: Option<&str>,
        n: usize,
    ) -> Result<Page, StateError> {
        let prefix = keys::account_prefix(acct);
        self.page(Cf::Repos, &prefix, last, n)
    }

    /// Repositories of every account after `after` (exclusive), at most `n`, in key order.
    pub fn repos_after(
        &self,
        after: Option<(AccountId, &RepoName)>,
        n: usize,
    ) -> Result<Vec<(AccountId, RepoName)>, StateError> {
        let mut start = match after {
            Some((a, r)) => keys::repo_key(a, r),
            None => Vec::new(),
        };
        if after.is_some() {
            start.push(0);
        }
        let mut out = Vec::new();
        for (k, _) in self.kv.scan(Cf::Repos, b"", &start, n)? {
            let Some((acct, name)) = k.split_first_chunk::<8>() else {
                continue;
            };
            let Some(acct) = AccountId::from_u64(u64::from_be_bytes(*acct)) else {
                continue;
            };
            if let Ok(repo) = RepoName::parse(&String::from_utf8_lossy(name)) {
                out.push((acct, repo));
            }
        }
        Ok(out)
    }

    fn page(
        &self,
        cf: Cf,
        prefix: &[u8],
        last: Option<&str>,
        n: usize,
    ) -> Result<Page, StateError> {
        let mut start = prefix.to_vec();
        if let Some(last) = last {
            start.extend_from_slice(last.as_bytes());
            // The smallest key strictly after `last`.
            start.push(0);
        }
        let rows = self.kv.scan(cf, prefix, &start, n.saturating_add(1))?;
        let more = rows.len() > n;
        let names = rows
            .into_iter()
            .take(n)
            .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .collect();
        Ok(Page { names, more })
    }

    /// Up to `limit` blob records with digests after `after` (a scan cursor), in digest order.
    pub fn blobs_after(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<(Digest, BlobRecord)>, StateError> {
        let mut start = after
            .map(|d| d.to_string().into_bytes())
            .unwrap_or_default();
        if !start.is_empty() {
            start.push(0);
        }
        let rows = self.kv.scan(Cf::Blobs, b"", &start, limit)?;
        let mut out = Vec::with_capacity(rows.len());
        for (k, v) in rows {
            let text = String::from_utf8_lossy(&k).into_owned();
            let digest = Digest::parse(&text).map_err(|e| StateError::Decode {
                what: "blob key",
                source: Box::new(bincode::ErrorKind::Custom(e.to_string())),
            })?;
            out.push((digest, dec("blob record", &v)?));
        }
        Ok(out)
    }

    /// Manifests whose subject is `subject`, in digest order, at most `limit`.
    pub fn referrers(
        &self,
        acct: AccountId,
        repo: &RepoName,
        subject: &Digest,
        limit: usize,
    ) -> Result<Vec<(Digest, ReferrerRecord)>, StateError> {
        let prefix = keys::referrers_prefix(acct, repo, subject);
        let rows = self.kv.scan(Cf::Referrers, &prefix, &prefix, limit)?;
        let mut out = Vec::with_capacity(rows.len());
        for (k, v) in rows {
            let text = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let digest = Digest::parse(&text).map_err(|e| StateError::Decode {
                what: "referrer key",
                source: Box::new(bincode::ErrorKind::Custom(e.to_string())),
            })?;
            out.push((digest, dec("referrer", &v)?));
        }
        Ok(out)
    }

    // ---- apply ----

    /// Applies `cmd`, adding its writes to `batch`. The caller writes the batch (with its own
    /// bookkeeping, such as the applied log id) atomically before applying the next command,
    /// so reads here see every earlier command.
    pub fn apply(&self, cmd: &Command, batch: &mut Batch) -> Result<Outcome, StateError> {
        match cmd {
            Command::BlobCommitted {
                account,
                repo,
                digest,
                size_bytes,
                holders,
                now_ms,
            } => {
                let existing = self.blob(digest)?;
                if existing.is_none() {
                    let mut stats = self.stats()?;
                    stats.blobs += 1;
                    stats.blob_bytes += size_bytes;
                    batch.put(Cf::SmMeta, keys::SM_STATS.to_vec(), keys::encode(&stats));
                }
                let mut rec = existing.unwrap_or(BlobRecord {
                    size_bytes: *size_bytes,
                    holders: Vec::new(),
                    committed_ms: *now_ms,
                    links: 0,
                });
                assert!(
                    rec.size_bytes == *size_bytes,
                    "blob {digest} committed with size {size_bytes}, stored size {}",
                    rec.size_bytes
                );
                for h in holders {
                    if !rec.holders.contains(h) {
                        rec.holders.push(*h);
                    }
                }
                rec.holders.sort_unstable();
                self.link(*account, repo, digest, &mut rec, *now_ms, batch)?;
                batch.put(
                    Cf::Blobs,
                    digest.to_string().into_bytes(),
                    keys::encode(&rec),
                );
                Ok(Outcome::Done)
            }
            Command::BlobMounted {
                account,
                repo,
                from,
                digest,
                now_ms,
            } => {
                if self.blob_link(*account, from, digest)?.is_none() {
                    return Ok(Outcome::BlobUnknown(digest.clone()));
                }
                let Some(mut rec) = self.blob(digest)? else {
                    return Ok(Outcome::BlobUnknown(digest.clone()));
                };
                self.link(*account, repo, digest, &mut rec, *now_ms, batch)?;
                batch.put(
                    Cf::Blobs,
                    digest.to_string().into_bytes(),
                    keys::encode(&rec),
                );
                Ok(Outcome::Done)
            }
            Command::BlobUnlinked {
                account,
                repo,
                digest,
            } => {
                if self.blob_link(*account, repo, digest)?.is_none() {
                    return Ok(Outcome::BlobUnknown(digest.clone()));
                }
                batch.delete(
                    Cf::RepoBlobs,
                    keys::repo_item_key(*account, repo, &digest.to_string()),
                );
                if let Some(mut rec) = self.blob(digest)? {
                    rec.links = rec.links.saturating_sub(1);
                    batch.put(
                        Cf::Blobs,
                        digest.to_string().into_bytes(),
                        keys::encode(&rec),
                    );
                }
                Ok(Outcome::Done)
            }
            Command::ManifestPut {
                account,
                repo,
                digest,
                media_type,
                bytes,
                tag,
                now_ms,
            } => self.apply_manifest_put(
                *account,
                repo,
                digest,
                media_type,
                bytes,
                tag.as_ref(),
                *now_ms,
                None,
                batch,
            ),
            Command::ReplicaManifestPut {
                account,
                repo,
                digest,
                media_type,
                bytes,
                tag,
                stamp,
                now_ms,
            } => self.apply_manifest_put(
                *account,
                repo,
                digest,
                media_type,
                bytes,
                tag.as_ref(),
                *now_ms,
                Some(stamp),
                batch,
            ),
            Command::ReplicaTagDeleted {
                account,
                repo,
                tag,
                stamp,
            } => {
                crate::origin::observe(self.kv, stamp.hlc, batch)?;
                if self.replica_tag_wins(*account, repo, tag, None, stamp, batch)? {
                    batch.delete(Cf::Tags, keys::repo_item_key(*account, repo, tag.as_str()));
                }
                Ok(Outcome::Done)
            }
            Command::ReplicaManifestDeleted {
                account,
                repo,
                digest,
            } => match self.delete_manifest(*account, repo, digest, false, batch)? {
                Outcome::ManifestUnknown(_) => Ok(Outcome::Done),
                o => Ok(o),
            },
            Command::ReplicaManifestDeletedAt {
                account,
                repo,
                digest,
                stamp,
            } => self.delete_manifest_replica(*account, repo, digest, stamp, batch),
            Command::ReplicationFailureSet {
                destination,
                reason,
            } => {
                crate::outbox::set_failure(destination, reason.as_deref(), batch);
                Ok(Outcome::Done)
            }
            Command::ReplicationCursorAdvanced { destination, seq } => {
                crate::outbox::advance(self.kv, destination, *seq, batch)?;
                Ok(Outcome::Done)
            }
            Command::ManifestPutNoTagMove {
                account,
                repo,
                digest,
                media_type,
                bytes,
                tag,
                now_ms,
            } => {
                if let Some(t) = self.tag(*account, repo, tag)? {
                    if &t.digest != digest {
                        return Ok(Outcome::Refused(crate::iam::Refusal::TagExists(
                            tag.clone(),
                        )));
                    }
                }
                self.apply_manifest_put(
                    *account,
                    repo,
                    digest,
                    media_type,
                    bytes,
                    Some(tag),
                    *now_ms,
                    None,
                    batch,
                )
            }
            Command::ManifestDeleted {
                account,
                repo,
                digest,
            } => self.delete_manifest(*account, repo, digest, true, batch),
            Command::Iam(c) => Ok(match crate::iam::Iam::new(self.kv).apply(c, batch)? {
                Ok(()) => Outcome::Done,
                Err(r) => Outcome::Refused(r),
            }),
            Command::BlobHoldersSet { digest, holders } => {
                let Some(mut rec) = self.blob(digest)? else {
                    return Ok(Outcome::BlobUnknown(digest.clone()));
                };
                let mut h = holders.clone();
                h.sort_unstable();
                h.dedup();
                rec.holders = h;
                batch.put(
                    Cf::Blobs,
                    digest.to_string().into_bytes(),
                    keys::encode(&rec),
                );
                Ok(Outcome::Done)
            }
            Command::TagDeleted {
                account,
                repo,
                tag,
                now_ms,
            } => {
                if self.tag(*account, repo, tag)?.is_none() {
                    return Ok(Outcome::TagUnknown(tag.clone()));
                }
                batch.delete(Cf::Tags, keys::repo_item_key(*account, repo, tag.as_str()));
                let stamp = self.stamp_local_change(*account, repo, tag, None, *now_ms, batch)?;
                crate::outbox::record(
                    self.kv,
                    *account,
                    repo,
                    crate::outbox::Change::TagDeleted {
                        tag: tag.clone(),
                        stamp,
                    },
                    *now_ms,
                    batch,
                )?;
                Ok(Outcome::Done)
            }
        }
    }

    /// Removes a manifest, its referrer entry and the tags pointing at it; a local delete
    /// (`to_outbox`) is appended to the outbox for the regions the rules name.
    fn delete_manifest(
        &self,
        acct: AccountId,
        repo: &RepoName,
        digest: &Digest,
        to_outbox: bool,
        batch: &mut Batch,
    ) -> Result<Outcome, StateError> {
        let Some(m) = self.manifest(acct, repo, digest)? else {
            return Ok(Outcome::ManifestUnknown(digest.clone()));
        };
        batch.delete(
            Cf::Manifests,
            keys::repo_item_key(acct, repo, &digest.to_string()),
        );
        if let Some(subject) = &m.subject {
            batch.delete(
                Cf::Referrers,
                keys::referrer_key(acct, repo, subject, digest),
            );
        }
        // Tags pointing at it go with it, each a tombstone at the delete's stamp.
        let stamp = if to_outbox {
            Some(crate::origin::Stamp {
                hlc: crate::origin::tick(self.kv, 0, batch)?,
                region: self.region.to_string(),
            })
        } else {
            None
        };
        for (tag, key) in self.tags_naming(acct, repo, digest)? {
            batch.delete(Cf::Tags, key);
            if let Some(stamp) = &stamp {
                crate::origin::set(
                    self.kv,
                    acct,
                    repo,
                    &tag,
                    &crate::origin::TagOrigin {
                        digest: None,
                        stamp: stamp.clone(),
                    },
                    batch,
                )?;
            }
        }
        if let Some(stamp) = stamp {
            crate::outbox::record(
                self.kv,
                acct,
                repo,
                crate::outbox::Change::ManifestDeletedAt {
                    digest: digest.clone(),
                    stamp,
                },
                0,
                batch,
            )?;
        }
        Ok(Outcome::Done)
    }

    /// The tags of `repo` pointing at `digest`, with their keys (bounded by the repository's
    /// tag count, walked in pages).
    fn tags_naming(
        &self,
        acct: AccountId,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Vec<(Tag, Vec<u8>)>, StateError> {
        let prefix = keys::repo_prefix(acct, repo);
        let mut start = prefix.clone();
        let mut out = Vec::new();
        loop {
            let rows = self.kv.scan(Cf::Tags, &prefix, &start, 1024)?;
            let Some((last_key, _)) = rows.last() else {
                break;
            };
            let mut next = last_key.clone();
            next.push(0);
            for (k, v) in &rows {
                let t: TagRecord = dec("tag", v)?;
                if &t.digest == digest {
                    let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                    let tag = Tag::parse(&name).map_err(|e| StateError::Decode {
                        what: "tag name",
                        source: Box::new(bincode::ErrorKind::Custom(e.to_string())),
                    })?;
                    out.push((tag, k.clone()));
                }
            }
            if rows.len() < 1024 {
                break;
            }
            start = next;
        }
        Ok(out)
    }

    /// A manifest delete from another region, stamped: tags whose current state is older go
    /// (tombstones at `stamp`); a newer one keeps its tag, and the manifest it names.
    fn delete_manifest_replica(
        &self,
        acct: AccountId,
        repo: &RepoName,
        digest: &Digest,
        stamp: &crate::origin::Stamp,
        batch: &mut Batch,
    ) -> Result<Outcome, StateError> {
        crate::origin::observe(self.kv, stamp.hlc, batch)?;
        if self.manifest(acct, repo, digest)?.is_none() {
            return Ok(Outcome::Done);
        }
        let mut kept = false;
        for (tag, key) in self.tags_naming(acct, repo, digest)? {
            if self.replica_tag_wins(acct, repo, &tag, None, stamp, batch)? {
                batch.delete(Cf::Tags, key);
            } else {
                kept = true;
            }
        }
        if kept {
            return Ok(Outcome::Done);
        }
        match self.delete_manifest(acct, repo, digest, false, batch)? {
            Outcome::ManifestUnknown(_) => Ok(Outcome::Done),
            o => Ok(o),
        }
    }

    /// Stamps a tag change made in this region (a move to `digest`, or a delete) and records
    /// it as the tag's current origin; returns the stamp.
    fn stamp_local_change(
        &self,
        acct: AccountId,
        repo: &RepoName,
        tag: &Tag,
        digest: Option<&Digest>,
        now_ms: u64,
        batch: &mut Batch,
    ) -> Result<crate::origin::Stamp, StateError> {
        let stamp = crate::origin::Stamp {
            hlc: crate::origin::tick(self.kv, now_ms, batch)?,
            region: self.region.to_string(),
        };
        crate::origin::set(
            self.kv,
            acct,
            repo,
            tag,
            &crate::origin::TagOrigin {
                digest: digest.cloned(),
                stamp: stamp.clone(),
            },
            batch,
        )?;
        Ok(stamp)
    }

    /// Whether a change stamped `stamp` from another region beats the tag's current state;
    /// the loser (the replaced state, or this change) goes to the tag's history.
    fn replica_tag_wins(
        &self,
        acct: AccountId,
        repo: &RepoName,
        tag: &Tag,
        digest: Option<&Digest>,
        stamp: &crate::origin::Stamp,
        batch: &mut Batch,
    ) -> Result<bool, StateError> {
        use crate::origin::{self, HistoryEntry, Stamp, TagOrigin};
        let current = match origin::current(self.kv, acct, repo, tag)? {
            Some(o) => Some(o),
            // A tag from before stamps existed: stamped by its last local update.
            None => self.tag(acct, repo, tag)?.map(|t| TagOrigin {
                digest: Some(t.digest),
                stamp: Stamp {
                    hlc: origin::hlc_of_ms(t.updated_ms),
                    region: self.region.to_string(),
                },
            }),
        };
        let incoming = TagOrigin {
            digest: digest.cloned(),
            stamp: stamp.clone(),
        };
        match current {
            Some(c) if c.stamp == *stamp => Ok(false),
            Some(c) if c.stamp > *stamp => {
                origin::push_history(
                    self.kv,
                    acct,
                    repo,
                    tag,
                    &HistoryEntry {
                        digest: incoming.digest,
                        stamp: incoming.stamp,
                    },
                    batch,
                )?;
                Ok(false)
            }
            _ => {
                origin::set(self.kv, acct, repo, tag, &incoming, batch)?;
                Ok(true)
            }
        }
    }

    fn link(
        &self,
        acct: AccountId,
        repo: &RepoName,
        digest: &Digest,
        rec: &mut BlobRecord,
        now_ms: u64,
        batch: &mut Batch,
    ) -> Result<(), StateError> {
        self.ensure_repo(acct, repo, now_ms, batch)?;
        if self.blob_link(acct, repo, digest)?.is_none() {
            rec.links += 1;
            batch.put(
                Cf::RepoBlobs,
                keys::repo_item_key(acct, repo, &digest.to_string()),
                keys::encode(&BlobLink {
                    size_bytes: rec.size_bytes,
                    linked_ms: now_ms,
                }),
            );
        }
        Ok(())
    }

    fn ensure_repo(
        &self,
        acct: AccountId,
        repo: &RepoName,
        now_ms: u64,
        batch: &mut Batch,
    ) -> Result<(), StateError> {
        if !self.repo_exists(acct, repo)? {
            batch.put(
                Cf::Repos,
                keys::repo_key(acct, repo),
                keys::encode(&RepoRecord { created_ms: now_ms }),
            );
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_manifest_put(
        &self,
        acct: AccountId,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
        tag: Option<&Tag>,
        now_ms: u64,
        replica: Option<&crate::origin::Stamp>,
        batch: &mut Batch,
    ) -> Result<Outcome, StateError> {
        // Validated by the proposer; parsed again because apply must stand on its own input.
        let parsed = match manifest::parse(bytes, media_type, u64::MAX) {
            Ok(p) => p,
            Err(e) => return Ok(Outcome::ManifestInvalid(e.to_string())),
        };
        for d in parsed.required_blobs() {
            if self.blob_link(acct, repo, d)?.is_none() {
                return Ok(Outcome::ManifestBlobUnknown(d.clone()));
            }
        }
        for d in parsed.required_manifests() {
            if self.manifest(acct, repo, d)?.is_none() {
                return Ok(Outcome::ManifestBlobUnknown(d.clone()));
            }
        }
        // An immutable repository's tag never moves (checked before anything is written). A
        // change from another region is not refused: it loses, and stays in the history.
        if let (Some(tag), None) = (tag, replica) {
            let immutable = crate::iam::Iam::new(self.kv)
                .repo_settings(acct, repo)?
                .is_some_and(|s| s.tag_immutable);
            if immutable {
                if let Some(t) = self.tag(acct, repo, tag)? {
                    if &t.digest != digest {
                        return Ok(Outcome::Refused(crate::iam::Refusal::TagImmutable(
                            tag.clone(),
                        )));
                    }
                }
            }
        }
        self.ensure_repo(acct, repo, now_ms, batch)?;
        let subject = parsed.subject.as_ref().map(|s| s.digest.clone());
        if let Some(subject) = &subject {
            batch.put(
                Cf::Referrers,
                keys::referrer_key(acct, repo, subject, digest),
                keys::encode(&ReferrerRecord {
                    media_type: parsed.media_type().to_string(),
                    size_bytes: bytes.len() as u64,
                    artifact_type: parsed.effective_artifact_type().map(str::to_string),
                    annotations: parsed.annotations.clone(),
                }),
            );
        }
        let existing = self.manifest(acct, repo, digest)?;
        let pushed_ms = existing.as_ref().map_or(now_ms, |m| m.pushed_ms);
        batch.put(
            Cf::Manifests,
            keys::repo_item_key(acct, repo, &digest.to_string()),
            keys::encode(&ManifestRecord {
                media_type: parsed.media_type().to_string(),
                bytes: bytes.to_vec(),
                subject,
                pushed_ms,
            }),
        );
        let put_tag = |batch: &mut Batch, tag: &Tag| {
            batch.put(
                Cf::Tags,
                keys::repo_item_key(acct, repo, tag.as_str()),
                keys::encode(&TagRecord {
                    digest: digest.clone(),
                    updated_ms: now_ms,
                }),
            );
        };
        if let Some(stamp) = replica {
            crate::origin::observe(self.kv, stamp.hlc, batch)?;
            if let Some(tag) = tag {
                let immutable = crate::iam::Iam::new(self.kv)
                    .repo_settings(acct, repo)?
                    .is_some_and(|s| s.tag_immutable)
                    && self
                        .tag(acct, repo, tag)?
                        .is_some_and(|t| &t.digest != digest);
                if immutable {
                    crate::origin::push_history(
                        self.kv,
                        acct,
                        repo,
                        tag,
                        &crate::origin::HistoryEntry {
                            digest: Some(digest.clone()),
                            stamp: stamp.clone(),
                        },
                        batch,
                    )?;
                } else if self.replica_tag_wins(acct, repo, tag, Some(digest), stamp, batch)? {
                    put_tag(batch, tag);
                }
            }
            return Ok(Outcome::Done);
        }
        let stamp = match tag {
            Some(tag) => {
                put_tag(batch, tag);
                Some(self.stamp_local_change(acct, repo, tag, Some(digest), now_ms, batch)?)
            }
            None => None,
        };
        crate::outbox::record(
            self.kv,
            acct,
            repo,
            crate::outbox::Change::ManifestPut {
                digest: digest.clone(),
                tag: tag.cloned(),
                stamp,
            },
            now_ms,
            batch,
        )?;
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{MemKv, RocksKv};
    use crate::media;

    fn apply(kv: &dyn KvStore, cmd: Command) -> Outcome {
        let mut b = Batch::default();
        let out = State::new(kv).apply(&cmd, &mut b).unwrap();
        kv.write(b, true).unwrap();
        out
    }

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    fn commit_blob(kv: &dyn KvStore, r: &str, bytes: &[u8]) -> Digest {
        let digest = Digest::sha256_of(bytes);
        let out = apply(
            kv,
            Command::BlobCommitted {
                account: AccountId::DEFAULT,
                repo: repo(r),
                digest: digest.clone(),
                size_bytes: bytes.len() as u64,
                holders: vec![1],
                now_ms: 1,
            },
        );
        assert_eq!(out, Outcome::Done);
        digest
    }

    fn image_manifest(config: &Digest, layer: &Digest, subject: Option<&Digest>) -> Vec<u8> {
        let subject = subject
            .map(|s| {
                format!(
                    r#","subject":{{"mediaType":"{}","digest":"{s}","size":1}}"#,
                    media::OCI_MANIFEST
                )
            })
            .unwrap_or_default();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":3}}]{subject}}}"#,
            media::OCI_MANIFEST
        )
        .into_bytes()
    }

    fn put(kv: &dyn KvStore, r: &str, bytes: &[u8], tag: Option<&str>) -> (Digest, Outcome) {
        let digest = Digest::sha256_of(bytes);
        let out = apply(
            kv,
            Command::ManifestPut {
                account: AccountId::DEFAULT,
                repo: repo(r),
                digest: digest.clone(),
                media_type: media::OCI_MANIFEST.into(),
                bytes: bytes.to_vec(),
                tag: tag.map(|t| Tag::parse(t).unwrap()),
                now_ms: 2,
            },
        );
        (digest, out)
    }

    /// The outbox records pushes, tag deletes and manifest deletes of replicated repositories
    /// (by prefix filter), in order, and nothing for other repositories.
    #[test]
    fn replicated_repositories_fill_the_outbox() {
        use crate::outbox::{events_after, Change, Destination};
        let kv = MemKv::new();
        let config = r#"{"rules":[{"destinations":[{"region":"eu-west-1","registryId":"111122223333"}],"repositoryFilters":[{"filter":"team/","filterType":"PREFIX_MATCH"}]}]}"#;
        let out = apply(
            &kv,
            Command::Iam(crate::iam::IamCommand::ReplicationConfigSet {
                account: AccountId::DEFAULT,
                config: config.into(),
            }),
        );
        assert_eq!(out, Outcome::Done);
        for r in ["team/app", "other/app"] {
            let c = commit_blob(&kv, r, b"{}");
            let l = commit_blob(&kv, r, b"abc");
            let (d, out) = put(&kv, r, &image_manifest(&c, &l, None), Some("v1"));
            assert_eq!(out, Outcome::Done);
            let tag = Tag::parse("v1").unwrap();
            let out = apply(
                &kv,
                Command::TagDeleted {
                    account: AccountId::DEFAULT,
                    repo: repo(r),
                    tag,
                    now_ms: 5,
                },
            );
            assert_eq!(out, Outcome::Done);
            let out = apply(
                &kv,
                Command::ManifestDeleted {
                    account: AccountId::DEFAULT,
                    repo: repo(r),
                    digest: d,
                },
            );
            assert_eq!(out, Outcome::Done);
        }
        let events = events_after(&kv, 0, 100).unwrap();
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(events.iter().all(|e| e.repo == repo("team/app")));
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(matches!(
            &events[0].change,
            Change::ManifestPut { tag: Some(t), .. } if t.as_str() == "v1"
        ));
        assert!(matches!(&events[1].change, Change::TagDeleted { .. }));
        assert!(matches!(
            &events[2].change,
            Change::ManifestDeletedAt { .. }
        ));
        assert_eq!(
            events[0].destinations,
            vec![Destination {
                region: "eu-west-1".into(),
                account: AccountId::parse("111122223333").unwrap(),
            }]
        );
        assert_eq!(events_after(&kv, 2, 100).unwrap().len(), 1);
        // The destination's cursor moves forward only, and never past the last event.
        let dest = events[0].destinations[0].clone();
        let advance = |seq| {
            apply(
                &kv,
                Command::ReplicationCursorAdvanced {
                    destination: dest.clone(),
                    seq,
                },
            )
        };
        assert_eq!(crate::outbox::cursor(&kv, &dest).unwrap(), 0);
        assert_eq!(advance(2), Outcome::Done);
        assert_eq!(advance(1), Outcome::Done);
        assert_eq!(crate::outbox::cursor(&kv, &dest).unwrap(), 2);
        assert_eq!(advance(99), Outcome::Done);
        assert_eq!(crate::outbox::cursor(&kv, &dest).unwrap(), 3);
    }

    fn suite(kv: &dyn KvStore) {
        let st = State::new(kv);
        let a = AccountId::DEFAULT;
        let c = commit_blob(kv, "app", b"{}");
        let l = commit_blob(kv, "app", b"abc");
        assert!(st.blob_link(a, &repo("app"), &c).unwrap().is_some());
        assert!(st.blob_link(a, &repo("other"), &c).unwrap().is_none());
        assert_eq!(
            st.stats().unwrap(),
            keys::Stats {
                blobs: 2,
                blob_bytes: 5
            }
        );

        // A manifest whose blobs are missing is rejected and leaves no trace.
        let missing = Digest::sha256_of(b"missing");
        let (d, out) = put(kv, "app", &image_manifest(&c, &missing, None), Some("v0"));
        assert_eq!(out, Outcome::ManifestBlobUnknown(missing));
        assert!(st.manifest(a, &repo("app"), &d).unwrap().is_none());
        assert!(st
            .tag(a, &repo("app"), &Tag::parse("v0").unwrap())
            .unwrap()
            .is_none());

        let body = image_manifest(&c, &l, None);
        let (d, out) = put(kv, "app", &body, Some("v1"));
        assert_eq!(out, Outcome::Done);
        assert_eq!(
            st.manifest(a, &repo("app"), &d).unwrap().unwrap().bytes,
            body
        );
        let t = st
            .tag(a, &repo("app"), &Tag::parse("v1").unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(t.digest, d);

        // Tags page in lexical order.
        for t in ["v2", "v3", "a"] {
            assert_eq!(put(kv, "app", &body, Some(t)).1, Outcome::Done);
        }
        let p = st.tags(a, &repo("app"), None, 2).unwrap();
        assert_eq!(p.names, vec!["a", "v1"]);
        assert!(p.more);
        let p = st.tags(a, &repo("app"), Some("v1"), 10).unwrap();
        assert_eq!(p.names, vec!["v2", "v3"]);
        assert!(!p.more);
        assert_eq!(st.tags(a, &repo("app"), None, 0).unwrap().names.len(), 0);

        // Repositories `app` and `app/x` do not bleed into each other.
        commit_blob(kv, "app/x", b"abc");
        let p = st.catalog(a, None, 10).unwrap();
        assert_eq!(p.names, vec!["app", "app/x"]);
        assert!(st
            .tags(a, &repo("app/x"), None, 10)
            .unwrap()
            .names
            .is_empty());

        // Referrers.
        let (r, out) = put(kv, "app", &image_manifest(&c, &l, Some(&d)), None);
        assert_eq!(out, Outcome::Done);
        let refs = st.referrers(a, &repo("app"), &d, 10).unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].0, r);

        // Mount.
        let mount = |from: &str, to: &str, digest: &Digest| {
            apply(
                kv,
                Command::BlobMounted {
                    account: a,
                    repo: repo(to),
                    from: repo(from),
                    digest: digest.clone(),
                    now_ms: 3,
                },
            )
        };
        assert_eq!(mount("app", "copy", &l), Outcome::Done);
        assert!(st.blob_link(a, &repo("copy"), &l).unwrap().is_some());
        assert_eq!(
            mount("nowhere", "copy", &c),
            Outcome::BlobUnknown(c.clone())
        );
        assert_eq!(st.blob(&l).unwrap().unwrap().links, 3);

        // Deleting the manifest removes its tags and referrer entries.
        let out = apply(
            kv,
            Command::ManifestDeleted {
                account: a,
                repo: repo("app"),
                digest: r.clone(),
            },
        );
        assert_eq!(out, Outcome::Done);
        assert!(st.referrers(a, &repo("app"), &d, 10).unwrap().is_empty());
        let out = apply(
            kv,
            Command::ManifestDeleted {
                account: a,
                repo: repo("app"),
                digest: d.clone(),
            },
        );
        assert_eq!(out, Outcome::Done);
        assert!(st.tags(a, &repo("app"), None, 10).unwrap().names.is_empty());
        let out = apply(
            kv,
            Command::TagDeleted {
                account: a,
                repo: repo("app"),
                tag: Tag::parse("v1").unwrap(),
                now_ms: 9,
            },
        );
        assert!(matches!(out, Outcome::TagUnknown(_)));
    }

    #[test]
    fn a_replayed_manifest_delete_loses_to_a_later_move_of_its_tag() {
        use crate::origin::Stamp;
        // The destination applies: put M (tag t) at s1, delete M at s2, put M (tag t) again at
        // s3 — then, shipped again (at least once), the delete at s2. The tag stays on M.
        let kv = MemKv::new();
        let a = AccountId::DEFAULT;
        let t = Tag::parse("t").unwrap();
        let c = commit_blob(&kv, "app", b"{}");
        let l = commit_blob(&kv, "app", b"layer");
        let m = image_manifest(&c, &l, None);
        let d = Digest::sha256_of(&m);
        let stamp = |hlc: u64| Stamp {
            hlc,
            region: "west".into(),
        };
        let put = |s: u64| Command::ReplicaManifestPut {
            account: a,
            repo: repo("app"),
            digest: d.clone(),
            media_type: media::OCI_MANIFEST.into(),
            bytes: m.clone(),
            tag: Some(t.clone()),
            stamp: stamp(s),
            now_ms: 1_000,
        };
        let delete = |s: u64| Command::ReplicaManifestDeletedAt {
            account: a,
            repo: repo("app"),
            digest: d.clone(),
            stamp: stamp(s),
        };
        let apply = |cmd: &Command| {
            let mut b = Batch::default();
            let out = State::new(&kv)
                .in_region("east")
                .apply(cmd, &mut b)
                .unwrap();
            kv.write(b, true).unwrap();
            assert_eq!(out, Outcome::Done, "{cmd:?}");
        };
        let st = State::new(&kv);
        apply(&put(10));
        apply(&delete(20));
        assert!(st.tag(a, &repo("app"), &t).unwrap().is_none());
        assert!(st.manifest(a, &repo("app"), &d).unwrap().is_none());
        apply(&put(30));
        apply(&put(10));
        apply(&delete(20));
        assert_eq!(st.tag(a, &repo("app"), &t).unwrap().unwrap().digest, d);
        assert!(st.manifest(a, &repo("app"), &d).unwrap().is_some());
        // A delete later than the move takes the tag and the manifest.
        apply(&delete(40));
        assert!(st.tag(a, &repo("app"), &t).unwrap().is_none());
        assert!(st.manifest(a, &repo("app"), &d).unwrap().is_none());
        apply(&put(30));
        assert!(
            st.tag(a, &repo("app"), &t).unwrap().is_none(),
            "an older move does not bring the tag back"
        );
    }

    #[test]
    fn concurrent_tag_moves_resolve_last_writer_wins_in_any_order() {
        use crate::origin::{self, Stamp};
        // Two regions push different manifests to one tag; each then applies the other's
        // change. Both end on the later stamp; the loser is in the history of both.
        let (east, west) = (MemKv::new(), MemKv::new());
        let a = AccountId::DEFAULT;
        let t = Tag::parse("latest").unwrap();
        let mut pushed = Vec::new();
        for (kv, region, now, layer) in [
            (&east, "east", 1_000, b"east layer".as_slice()),
            (&west, "west", 2_000, b"west layer".as_slice()),
        ] {
            let c = commit_blob(kv, "app", b"{}");
            let l = commit_blob(kv, "app", layer);
            let m = image_manifest(&c, &l, None);
            let d = Digest::sha256_of(&m);
            let mut b = Batch::default();
            let out = State::new(kv)
                .in_region(region)
                .apply(
                    &Command::ManifestPut {
                        account: a,
                        repo: repo("app"),
                        digest: d.clone(),
                        media_type: media::OCI_MANIFEST.into(),
                        bytes: m.clone(),
                        tag: Some(t.clone()),
                        now_ms: now,
                    },
                    &mut b,
                )
                .unwrap();
            kv.write(b, true).unwrap();
            assert_eq!(out, Outcome::Done);
            let stamp = origin::current(kv, a, &repo("app"), &t)
                .unwrap()
                .unwrap()
                .stamp;
            assert_eq!(stamp.region, region);
            pushed.push((d, m, stamp, c, l, layer));
        }
        // Ship each to the other (blobs first, as the worker does), twice: idempotent.
        for (kv, region, from) in [(&east, "east", 1), (&west, "west", 0)] {
            let (d, m, stamp, _, _, layer) = &pushed[from];
            commit_blob(kv, "app", layer);
            for _ in 0..2 {
                let mut b = Batch::default();
                let out = State::new(kv)
                    .in_region(region)
                    .apply(
                        &Command::ReplicaManifestPut {
                            account: a,
                            repo: repo("app"),
                            digest: d.clone(),
                            media_type: media::OCI_MANIFEST.into(),
                            bytes: m.clone(),
                            tag: Some(t.clone()),
                            stamp: stamp.clone(),
                            now_ms: 3_000,
                        },
                        &mut b,
                    )
                    .unwrap();
                kv.write(b, true).unwrap();
                assert_eq!(out, Outcome::Done);
            }
        }
        let winner = &pushed[1].0; // west's stamp is later
        for kv in [&east, &west] {
            let st = State::new(kv);
            assert_eq!(
                &st.tag(a, &repo("app"), &t).unwrap().unwrap().digest,
                winner
            );
            let hist = origin::history(kv, a, &repo("app"), &t).unwrap();
            assert_eq!(hist.len(), 1, "{hist:?}");
            assert_eq!(hist[0].digest.as_ref(), Some(&pushed[0].0));
            assert_eq!(hist[0].stamp, pushed[0].2);
            // The clock moved past every reading seen.
            assert!(origin::hlc(kv).unwrap() >= pushed[1].2.hlc);
            // Both manifests are stored (the loser stays pullable by digest).
            assert!(st
                .manifest(a, &repo("app"), &pushed[0].0)
                .unwrap()
                .is_some());
        }
        // A later local move in east beats west's stamp even with a clock behind it.
        let mut b = Batch::default();
        State::new(&east)
            .in_region("east")
            .apply(
                &Command::TagDeleted {
                    account: a,
                    repo: repo("app"),
                    tag: t.clone(),
                    now_ms: 10,
                },
                &mut b,
            )
            .unwrap();
        east.write(b, true).unwrap();
        let del = origin::current(&east, a, &repo("app"), &t)
            .unwrap()
            .unwrap();
        assert!(del.digest.is_none() && del.stamp > pushed[1].2);
        // An older delete arriving from elsewhere loses to the current tag.
        let mut b = Batch::default();
        State::new(&west)
            .in_region("west")
            .apply(
                &Command::ReplicaTagDeleted {
                    account: a,
                    repo: repo("app"),
                    tag: t.clone(),
                    stamp: Stamp {
                        hlc: 1,
                        region: "east".into(),
                    },
                },
                &mut b,
            )
            .unwrap();
        west.write(b, true).unwrap();
        assert!(State::new(&west)
            .tag(a, &repo("app"), &t)
            .unwrap()
            .is_some());
        // The newer one wins.
        let mut b = Batch::default();
        State::new(&west)
            .in_region("west")
            .apply(
                &Command::ReplicaTagDeleted {
                    account: a,
                    repo: repo("app"),
                    tag: t.clone(),
                    stamp: del.stamp.clone(),
                },
                &mut b,
            )
            .unwrap();
        west.write(b, true).unwrap();
        assert!(State::new(&west)
            .tag(a, &repo("app"), &t)
            .unwrap()
            .is_none());
    }

    #[test]
    fn state_machine_on_memkv() {
        suite(&MemKv::new());
    }

    #[test]
    fn state_machine_on_rocksdb() {
        let dir = tempfile::tempdir().unwrap();
        suite(&RocksKv::open(dir.path()).unwrap());
    }

    #[test]
    fn deterministic_replay() {
        let a = MemKv::new();
        let b = MemKv::new();
        for kv in [&a, &b] {
            let c = commit_blob(kv, "r", b"{}");
            let l = commit_blob(kv, "r", b"abc");
            put(kv, "r", &image_manifest(&c, &l, None), Some("t"));
        }
        let dump = |kv: &MemKv| -> Vec<_> {
            Cf::STATE
                .iter()
                .flat_map(|cf| kv.scan(*cf, b"", b"", usize::MAX).unwrap())
                .collect()
        };
        assert_eq!(dump(&a), dump(&b));
    }
}
