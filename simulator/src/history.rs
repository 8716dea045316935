//! What the clients saw, and the checks on it.
//!
//! Tags are registers: each tag move or delete is a write, each linearizable read a read,
//! each with the simulated times it was invoked and answered. `check_registers` verifies a
//! necessary condition of linearizability that catches stale reads: a read must return a
//! value written before it ended and not certainly overwritten before it began. Writes whose
//! outcome the client could not learn (timeouts, crashes) may have happened at any time after
//! they were invoked, so they never convict a read.

use std::collections::{BTreeMap, BTreeSet};

use engine::Digest;

/// A tag: region, repository, tag name.
pub type TagKey = (usize, String, String);

#[derive(Debug, Clone)]
pub enum Event {
    /// `None` deletes the tag.
    Write(Option<Digest>),
    Read(Option<Digest>),
    /// A write that certainly did not happen (refused before it was proposed).
    Refused,
}

#[derive(Debug, Clone)]
pub struct Op {
    pub key: TagKey,
    pub event: Event,
    /// Simulated time, microseconds since the start.
    pub invoked_us: u64,
    /// `None`: the outcome is unknown (the write may or may not have happened).
    pub answered_us: Option<u64>,
    pub client: usize,
}

/// An acknowledged manifest: its bytes and the blobs it needs.
pub type AckedManifest = (bytes::Bytes, Vec<Digest>);

/// A manifest that a delete by digest may have removed.
#[derive(Debug, Clone)]
pub struct Deleted {
    pub manifest: AckedManifest,
    /// Deletes of it in flight.
    pub pending: u32,
    /// A delete of it ended with its outcome unknown: it may be applied at any time, so no
    /// later push makes the manifest required again.
    pub unknown: bool,
    /// When the last delete of it was answered (microseconds): a push invoked after this
    /// (with no delete pending or unknown) makes the manifest required again.
    pub answered_us: u64,
}

/// Everything the model knows was acknowledged, and the tag history.
#[derive(Default)]
pub struct Model {
    /// Acknowledged manifests per (region, repository): digest → the blobs it needs. Every
    /// node of the region must serve each (a delete by digest moves it to `deleted`).
    pub manifests: BTreeMap<(usize, String), BTreeMap<Digest, AckedManifest>>,
    /// Manifests deleted by digest (or being deleted) per (region, repository): no longer
    /// required to be served, until pushed again after the delete.
    pub deleted: BTreeMap<(usize, String), BTreeMap<Digest, Deleted>>,
    /// Acknowledged blob links: (region, repository, digest).
    pub blobs: BTreeSet<(usize, String, Digest)>,
    pub ops: Vec<Op>,
}

impl Model {
    pub fn record(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Records a write as it is sent (its outcome unknown until `settle`), so a check that
    /// runs while it is in flight counts it as possibly done. Returns its place.
    pub fn begin_write(
        &mut self,
        key: TagKey,
        value: Option<Digest>,
        at_us: u64,
        client: usize,
    ) -> usize {
        self.ops.push(Op {
            key,
            event: Event::Write(value),
            invoked_us: at_us,
            answered_us: None,
            client,
        });
        self.ops.len() - 1
    }

    /// Settles a write begun with `begin_write`: `Some(event, answered)` when the outcome is
    /// known (acknowledged, or applied as a read), `None` when it certainly did not happen.
    /// A write never settled stays "outcome unknown".
    pub fn settle(&mut self, at: usize, outcome: Option<(Event, u64)>) {
        match outcome {
            Some((event, answered)) => {
                self.ops[at].event = event;
                self.ops[at].answered_us = Some(answered);
            }
            None => self.ops[at].event = Event::Refused,
        }
    }

    /// A push of `digest` invoked at `invoked_us` was acknowledged: the manifest is required
    /// from now on, unless a delete of it may have been applied after the push.
    pub fn manifest_acked(
        &mut self,
        region: usize,
        repo: &str,
        digest: &Digest,
        manifest: AckedManifest,
        invoked_us: u64,
    ) {
        let key = (region, repo.to_string());
        if let Some(d) = self.deleted.get_mut(&key).and_then(|m| m.get_mut(digest)) {
            if d.pending > 0 || d.unknown || invoked_us <= d.answered_us {
                return;
            }
            self.deleted.get_mut(&key).map(|m| m.remove(digest));
        }
        self.manifests
            .entry(key)
            .or_default()
            .insert(digest.clone(), manifest);
    }

    /// A delete of `digest` is sent: the manifest is no longer required. False when the
    /// model knows no such manifest.
    pub fn begin_manifest_delete(&mut self, region: usize, repo: &str, digest: &Digest) -> bool {
        let key = (region, repo.to_string());
        if let Some(m) = self.manifests.get_mut(&key).and_then(|m| m.remove(digest)) {
            self.deleted.entry(key.clone()).or_default().insert(
                digest.clone(),
                Deleted {
                    manifest: m,
                    pending: 0,
                    unknown: false,
                    answered_us: 0,
                },
            );
        }
        match self.deleted.get_mut(&key).and_then(|m| m.get_mut(digest)) {
            Some(d) => {
                d.pending += 1;
                true
            }
            None => false,
        }
    }

    /// A delete of `digest` got its answer at `answered_us`; `known`: whether its outcome is
    /// known (applied, or certainly not).
    pub fn settle_manifest_delete(
        &mut self,
        region: usize,
        repo: &str,
        digest: &Digest,
        known: bool,
        answered_us: u64,
    ) {
        let key = (region, repo.to_string());
        if let Some(d) = self.deleted.get_mut(&key).and_then(|m| m.get_mut(digest)) {
            d.pending = d.pending.saturating_sub(1);
            d.unknown |= !known;
            d.answered_us = d.answered_us.max(answered_us);
        }
    }

    /// Every tag key the history mentions.
    pub fn keys(&self) -> BTreeSet<TagKey> {
        self.ops.iter().map(|o| o.key.clone()).collect()
    }
}

/// A violation found in the history, readable.
#[derive(Debug, Clone)]
pub struct Violation(pub String);

/// Checks every read of every register; returns the violations and how many reads passed.
pub fn check_registers(ops: &[Op]) -> (Vec<Violation>, usize) {
    let mut by_key: BTreeMap<&TagKey, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(&op.key).or_default().push(op);
    }
    let mut out = Vec::new();
    let mut passed = 0;
    for (key, ops) in by_key {
        let writes: Vec<(Option<&Digest>, u64, Option<u64>)> = std::iter::once((None, 0, Some(0)))
            .chain(ops.iter().filter_map(|o| match &o.event {
                Event::Write(v) => Some((v.as_ref(), o.invoked_us, o.answered_us)),
                Event::Read(_) | Event::Refused => None,
            }))
            .collect();
        for r in ops.iter().filter(|o| matches!(o.event, Event::Read(_))) {
            let Event::Read(v) = &r.event else {
                continue;
            };
            let Some(r_end) = r.answered_us else {
                continue;
            };
            let v = v.as_ref();
            let candidates: Vec<_> = writes
                .iter()
                .filter(|(wv, inv, _)| *wv == v && *inv < r_end)
                .collect();
            if candidates.is_empty() {
                out.push(Violation(format!(
                    "tag {key:?}: client {} read {} at {}..{} us, a value never written before then",
                    r.client,
                    show(v),
                    r.invoked_us,
                    r_end
                )));
                continue;
            }
            let overwritten = |w_end: Option<u64>| {
                let Some(w_end) = w_end else {
                    return false;
                };
                writes.iter().any(|(wv, inv, end)| {
                    *wv != v && *inv > w_end && end.is_some_and(|e| e < r.invoked_us)
                })
            };
            if candidates.iter().all(|(_, _, end)| overwritten(*end)) {
                out.push(Violation(format!(
                    "tag {key:?}: client {} read {} at {}..{} us, but a later write was acknowledged before the read began (stale read)",
                    r.client,
                    show(v),
                    r.invoked_us,
                    r_end
                )));
            } else {
                passed += 1;
            }
        }
    }
    (out, passed)
}

fn show(v: Option<&Digest>) -> String {
    v.map_or_else(|| "no tag".to_string(), |d| d.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(event: Event, inv: u64, ans: Option<u64>) -> Op {
        Op {
            key: (0, "r".into(), "t".into()),
            event,
            invoked_us: inv,
            answered_us: ans,
            client: 0,
        }
    }

    #[test]
    fn stale_read_is_caught_and_concurrent_read_is_not() {
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        let ops = vec![
            op(Event::Write(Some(a.clone())), 10, Some(20)),
            op(Event::Write(Some(b.clone())), 30, Some(40)),
            // Concurrent with the second write: either value is fine.
            op(Event::Read(Some(a.clone())), 35, Some(45)),
            // After the second write was acknowledged: `a` is stale.
            op(Event::Read(Some(a.clone())), 50, Some(60)),
            op(Event::Read(Some(b.clone())), 50, Some(60)),
        ];
        let (v, passed) = check_registers(&ops);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].0.contains("stale"));
        assert_eq!(passed, 2);
    }

    #[test]
    fn unknown_outcome_writes_may_land_late_and_values_must_exist() {
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        let c = Digest::sha256_of(b"c");
        let ops = vec![
            op(Event::Write(Some(a.clone())), 10, None),
            op(Event::Write(Some(b.clone())), 30, Some(40)),
            // The unknown write may have landed after `b`.
            op(Event::Read(Some(a.clone())), 100, Some(110)),
            op(Event::Read(Some(c.clone())), 100, Some(110)),
            // No tag at all once `b` was acknowledged: stale.
            op(Event::Read(None), 100, Some(110)),
        ];
        let (v, passed) = check_registers(&ops);
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(passed, 1);
    }
}
