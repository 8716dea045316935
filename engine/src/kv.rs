//! The key-value seam under the metadata state machine and the Raft log.
//!
//! Owns: the `KvStore` trait, its RocksDB implementation (`RocksKv`) and its in-memory twin
//! (`MemKv`), which the simulator uses and which models fsync and the write-ahead log's
//! record checksums: writes not synced are lost by `MemKv::crash`; a record torn by a crash is
//! found by its checksum when the store opens and dropped with everything after it; a synced
//! record found damaged makes `MemKv::open` fail.
//! Never: interprets keys or values — layouts live in `keys.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use crate::keys::Cf;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("disk: {0}")]
    Io(String),
    #[error("stored value under {cf:?} is corrupt: {reason}")]
    Corrupt { cf: Cf, reason: String },
}

/// A key and its value.
pub type Row = (Vec<u8>, Vec<u8>);

/// One write in a batch.
#[derive(Debug, Clone)]
pub enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
    /// Deletes keys in `[start, end)`.
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
}

/// An atomic group of writes.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub ops: Vec<Op>,
}

impl Batch {
    pub fn put(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::Put(cf, key, value));
    }
    pub fn delete(&mut self, cf: Cf, key: Vec<u8>) {
        self.ops.push(Op::Delete(cf, key));
    }
    pub fn delete_range(&mut self, cf: Cf, start: Vec<u8>, end: Vec<u8>) {
        self.ops.push(Op::DeleteRange(cf, start, end));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Ordered key-value storage in column families.
///
/// To ensure correctness an implementation must: apply a batch atomically (all or nothing,
/// also across a crash); when `sync` is true, return only after the batch and every batch
/// written before it are durable; return scans in ascending key order.
pub trait KvStore: Send + Sync + 'static {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Up to `limit` entries with keys `>= start` that begin with `prefix`, ascending.
    fn scan(&self, cf: Cf, prefix: &[u8], start: &[u8], limit: usize) -> Result<Vec<Row>, KvError>;
    /// The last entry whose key begins with `prefix`.
    fn last(&self, cf: Cf, prefix: &[u8]) -> Result<Option<Row>, KvError>;
    fn write(&self, batch: Batch, sync: bool) -> Result<(), KvError>;
    /// Extra time a synced write takes beyond the call itself: zero for real stores (their
    /// calls take the time); the simulator's twin reports a slow disk here, and async callers
    /// wait it out on their clock.
    fn sync_latency(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// `KvStore` on RocksDB, one column family per `Cf`.
pub struct RocksKv {
    db: rocksdb::DB,
}

impl RocksKv {
    pub fn open(path: &Path) -> Result<RocksKv, KvError> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_max_background_jobs(2);
        let cfs: Vec<rocksdb::ColumnFamilyDescriptor> = Cf::ALL
            .iter()
            .map(|cf| {
                let mut o = rocksdb::Options::default();
                o.set_compression_type(rocksdb::DBCompressionType::Lz4);
                rocksdb::ColumnFamilyDescriptor::new(cf.name(), o)
            })
            .collect();
        let db = rocksdb::DB::open_cf_descriptors(&opts, path, cfs)?;
        Ok(RocksKv { db })
    }

    fn handle(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(cf.name())
            .expect("every Cf is created at open")
    }
}

fn next_prefix(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut p = prefix.to_vec();
    while let Some(last) = p.pop() {
        if last < 0xff {
            p.push(last + 1);
            return Some(p);
        }
    }
    None
}

impl KvStore for RocksKv {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.db.get_cf(self.handle(cf), key)?)
    }

    fn scan(&self, cf: Cf, prefix: &[u8], start: &[u8], limit: usize) -> Result<Vec<Row>, KvError> {
        let from = if start > prefix { start } else { prefix };
        let mut ro = rocksdb::ReadOptions::default();
        if let Some(end) = next_prefix(prefix) {
            ro.set_iterate_upper_bound(end);
        }
        let iter = self.db.iterator_cf_opt(
            self.handle(cf),
            ro,
            rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn last(&self, cf: Cf, prefix: &[u8]) -> Result<Option<Row>, KvError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_lower_bound(prefix.to_vec());
        let mode = match next_prefix(prefix) {
            Some(end) => {
                ro.set_iterate_upper_bound(end);
                rocksdb::IteratorMode::End
            }
            None => rocksdb::IteratorMode::End,
        };
        let mut iter = self.db.iterator_cf_opt(self.handle(cf), ro, mode);
        match iter.next() {
            Some(item) => {
                let (k, v) = item?;
                Ok(k.starts_with(prefix).then(|| (k.to_vec(), v.to_vec())))
            }
            None => Ok(None),
        }
    }

    fn write(&self, batch: Batch, sync: bool) -> Result<(), KvError> {
        let mut wb = rocksdb::WriteBatch::default();
        for op in batch.ops {
            match op {
                Op::Put(cf, k, v) => wb.put_cf(self.handle(cf), k, v),
                Op::Delete(cf, k) => wb.delete_cf(self.handle(cf), k),
                Op::DeleteRange(cf, s, e) => wb.delete_range_cf(self.handle(cf), s, e),
            }
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(wb, &wo)?;
        Ok(())
    }
}

type MemMap = BTreeMap<(Cf, Vec<u8>), Vec<u8>>;

/// In-memory `KvStore`. Keeps the durable image (what survives a crash) apart from the live
/// one, and the batches written since the last sync in order: a synced write makes them all
/// durable; a crash keeps the durable image plus, at most, a prefix of those batches (each
/// batch whole, as a write-ahead log would).
///
/// Fault model (what RocksDB's write-ahead log does, with its per-record checksums and the
/// default point-in-time recovery):
/// - A crash may leave some unsynced batches on disk, in order; the first one not wholly
///   written is *torn*. At open the store replays records while their checksums match and
///   drops the first bad one and everything after it: a batch is visible whole or not at all,
///   and nothing synced is ever lost (`crash_keeping`, `crash_tearing`).
/// - Synced data can still rot on the medium. This model damages the record of the last
///   synced batch (`corrupt_synced_tail`); its checksum no longer matches, and `open` refuses
///   the store (`KvError::Corrupt`) rather than replay wrong state or silently drop synced
///   writes (a Raft node that forgot a vote or an acknowledged entry breaks Raft's safety).
///   The node then cannot start; it is replaced by a fresh one that recovers from its peers.
#[derive(Default)]
pub struct MemKv {
    inner: Mutex<MemInner>,
}

/// One write-ahead log record as it lies on disk: the operations and the checksum written
/// with them.
struct WalRecord {
    ops: Vec<Op>,
    sum: [u8; 32],
}

#[derive(Default)]
struct MemInner {
    live: MemMap,
    durable: MemMap,
    /// Batches applied to `live` but not yet to `durable`, oldest first.
    unsynced: Vec<Vec<Op>>,
    /// The last synced batch (its record stays in the write-ahead log until a flush).
    synced_tail: Option<Vec<Op>>,
    /// That record, damaged on disk (`corrupt_synced_tail`): what `open` finds.
    damaged: Option<WalRecord>,
    /// While set, every write fails (a full or failing disk).
    failing: Option<String>,
    /// A slow disk: what each synced write costs.
    sync_latency: std::time::Duration,
}

fn apply(map: &mut MemMap, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Put(cf, k, v) => {
                map.insert((*cf, k.clone()), v.clone());
            }
            Op::Delete(cf, k) => {
                map.remove(&(*cf, k.clone()));
            }
            Op::DeleteRange(cf, s, e) => {
                let keys: Vec<_> = map
                    .range((*cf, s.clone())..(*cf, e.clone()))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in keys {
                    map.remove(&k);
                }
            }
        }
    }
}

/// The checksum a write-ahead log record carries (RocksDB uses a CRC32C; any hash will do
/// for the model).
fn record_sum(ops: &[Op]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    let mut field = |b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    for op in ops {
        match op {
            Op::Put(cf, k, v) => {
                field(b"put");
                field(cf.name().as_bytes());
                field(k);
                field(v);
            }
            Op::Delete(cf, k) => {
                field(b"delete");
                field(cf.name().as_bytes());
                field(k);
            }
            Op::DeleteRange(cf, s, e) => {
                field(b"delete_range");
                field(cf.name().as_bytes());
                field(s);
                field(e);
            }
        }
    }
    *h.finalize().as_bytes()
}

/// What recovery does with the records a crash left after the durable image: replays them in
/// order while each checksum matches, and drops the first bad record and all after it.
/// Returns how many records were replayed.
fn replay(map: &mut MemMap, records: &[WalRecord]) -> usize {
    let mut replayed = 0;
    for r in records {
        if record_sum(&r.ops) != r.sum {
            break;
        }
        apply(map, &r.ops);
        replayed += 1;
    }
    replayed
}

/// The record of `ops` as it would be on disk had the crash cut it halfway: the first half of
/// its operations (a lone operation loses its value's second half) under the checksum of the
/// whole batch.
fn torn(ops: &[Op]) -> WalRecord {
    let sum = record_sum(ops);
    let mut part: Vec<Op> = ops[..ops.len() / 2].to_vec();
    if part.is_empty() {
        if let Some(Op::Put(cf, k, v)) = ops.first() {
            part.push(Op::Put(*cf, k.clone(), v[..v.len() / 2].to_vec()));
        }
    }
    WalRecord { ops: part, sum }
}

/// What a crash does to the log: the first `kept` unsynced batches reached the disk whole;
/// with `tear`, the next one reached it in part.
fn crash_records(unsynced: &[Vec<Op>], kept: usize, tear: bool) -> Vec<WalRecord> {
    let kept = kept.min(unsynced.len());
    let mut records: Vec<WalRecord> = unsynced[..kept]
        .iter()
        .map(|ops| WalRecord {
            sum: record_sum(ops),
            ops: ops.clone(),
        })
        .collect();
    if tear {
        if let Some(next) = unsynced.get(kept) {
            records.push(torn(next));
        }
    }
    records
}

/// What a simulated crash did to a `MemKv`'s unsynced batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashReport {
    /// Batches written since the last sync.
    pub unsynced: usize,
    /// Of those, batches recovery replayed (the rest are lost).
    pub replayed: usize,
    /// Whether a torn record was found (by its checksum) and dropped.
    pub torn: bool,
}

impl MemKv {
    pub fn new() -> MemKv {
        MemKv::default()
    }

    /// Simulated crash: every write not yet synced is lost.
    pub fn crash(&self) {
        self.crash_keeping(0);
    }

    /// Simulated crash that keeps the first `kept` unsynced batches (they reached the disk
    /// before the power went); returns how many unsynced batches there were.
    pub fn crash_keeping(&self, kept: usize) -> usize {
        self.crash_with(kept, false).unsynced
    }

    /// Simulated crash that keeps the first `kept` unsynced batches whole and tears the one
    /// after (if any): recovery finds the torn record by its checksum and drops it, so the
    /// store comes back exactly as `crash_keeping(kept)` leaves it.
    pub fn crash_tearing(&self, kept: usize) -> CrashReport {
        self.crash_with(kept, true)
    }

    fn crash_with(&self, kept: usize, tear: bool) -> CrashReport {
        let mut g = self.inner.lock().expect("memkv lock");
        let g = &mut *g;
        let unsynced = std::mem::take(&mut g.unsynced);
        let records = crash_records(&unsynced, kept, tear);
        let replayed = replay(&mut g.durable, &records);
        g.live = g.durable.clone();
        CrashReport {
            unsynced: unsynced.len(),
            replayed,
            torn: replayed < records.len(),
        }
    }

    /// Fault injection: the write-ahead log record of the last synced batch is damaged on
    /// disk (one byte of it changes); `open` finds it by its checksum. False when no synced
    /// batch is on record (nothing to damage). Call it while the store's process is down.
    pub fn corrupt_synced_tail(&self) -> bool {
        let mut g = self.inner.lock().expect("memkv lock");
        let Some(ops) = g.synced_tail.clone() else {
            return false;
        };
        // The checksum as written; computed here rather than on every write (same value).
        let sum = record_sum(&ops);
        let mut ops = ops;
        let byte = ops.iter_mut().find_map(|op| match op {
            Op::Put(_, _, v) if !v.is_empty() => v.last_mut(),
            Op::Put(_, k, _) | Op::Delete(_, k) | Op::DeleteRange(_, k, _) => k.last_mut(),
        });
        match byte {
            Some(b) => *b ^= 0x01,
            None => ops.push(Op::Delete(Cf::SmMeta, b"torn".to_vec())),
        }
        g.damaged = Some(WalRecord { ops, sum });
        true
    }

    /// What opening the store checks: every record it would replay matches its checksum.
    /// A damaged synced record is `KvError::Corrupt`: the store is not opened.
    pub fn open(&self) -> Result<(), KvError> {
        let g = self.inner.lock().expect("memkv lock");
        match &g.damaged {
            Some(r) if record_sum(&r.ops) != r.sum => Err(KvError::Corrupt {
                cf: Cf::RaftLog,
                reason: "a synced write-ahead log record fails its checksum".into(),
            }),
            _ => Ok(()),
        }
    }

    /// Whether `open` would refuse this store.
    pub fn is_corrupt(&self) -> bool {
        self.open().is_err()
    }

    /// The disk is replaced by an empty one (a node rebuilt from scratch).
    pub fn wipe(&self) {
        *self.inner.lock().expect("memkv lock") = MemInner::default();
    }

    /// Makes every write fail with `reason` until called with `None`.
    pub fn set_failing(&self, reason: Option<String>) {
        self.inner.lock().expect("memkv lock").failing = reason;
    }

    /// Makes every synced write cost `latency` (a slow disk).
    pub fn set_sync_latency(&self, latency: std::time::Duration) {
        self.inner.lock().expect("memkv lock").sync_latency = latency;
    }
}

impl KvStore for MemKv {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let g = self.inner.lock().expect("memkv lock");
        Ok(g.live.get(&(cf, key.to_vec())).cloned())
    }

    fn scan(&self, cf: Cf, prefix: &[u8], start: &[u8], limit: usize) -> Result<Vec<Row>, KvError> {
        let g = self.inner.lock().expect("memkv lock");
        let from = if start > prefix { start } else { prefix };
        Ok(g.live
            .range((cf, from.to_vec())..)
            .take_while(|((c, k), _)| *c == cf && k.starts_with(prefix))
            .take(limit)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last(&self, cf: Cf, prefix: &[u8]) -> Result<Option<Row>, KvError> {
        let g = self.inner.lock().expect("memkv lock");
        Ok(g.live
            .range((cf, prefix.to_vec())..)
            .take_while(|((c, k), _)| *c == cf && k.starts_with(prefix))
            .last()
            .map(|((_, k), v)| (k.clone(), v.clone())))
    }

    fn write(&self, batch: Batch, sync: bool) -> Result<(), KvError> {
        let mut g = self.inner.lock().expect("memkv lock");
        let g = &mut *g;
        if let Some(reason) = &g.failing {
            return Err(KvError::Io(reason.clone()));
        }
        apply(&mut g.live, &batch.ops);
        g.unsynced.push(batch.ops);
        if sync {
            for ops in g.unsynced.drain(..) {
                apply(&mut g.durable, &ops);
                g.synced_tail = Some(ops);
            }
        }
        Ok(())
    }

    fn sync_latency(&self) -> std::time::Duration {
        self.inner.lock().expect("memkv lock").sync_latency
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One conformance suite, run by every implementation.
    fn suite(kv: &dyn KvStore) {
        let mut b = Batch::default();
        for k in ["a/1", "a/2", "a/3", "b/1", "a0"] {
            b.put(Cf::Tags, k.as_bytes().to_vec(), k.as_bytes().to_vec());
        }
        b.put(Cf::Blobs, b"a/1".to_vec(), b"other-cf".to_vec());
        kv.write(b, true).unwrap();
        assert_eq!(kv.get(Cf::Tags, b"a/2").unwrap().unwrap(), b"a/2");
        assert_eq!(kv.get(Cf::Blobs, b"a/1").unwrap().unwrap(), b"other-cf");
        let s = kv.scan(Cf::Tags, b"a/", b"", 10).unwrap();
        let keys: Vec<_> = s.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, vec![&b"a/1"[..], b"a/2", b"a/3"]);
        let s = kv.scan(Cf::Tags, b"a/", b"a/2", 1).unwrap();
        assert_eq!(s[0].0, b"a/2");
        assert_eq!(s.len(), 1);
        assert_eq!(kv.last(Cf::Tags, b"a/").unwrap().unwrap().0, b"a/3");
        assert!(kv.last(Cf::Tags, b"c/").unwrap().is_none());
        let mut b = Batch::default();
        b.delete(Cf::Tags, b"a/1".to_vec());
        b.delete_range(Cf::Tags, b"a/2".to_vec(), b"a/3".to_vec());
        kv.write(b, false).unwrap();
        let s = kv.scan(Cf::Tags, b"a/", b"", 10).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, b"a/3");
    }

    #[test]
    fn rocks_conformance() {
        let dir = tempfile::tempdir().unwrap();
        suite(&RocksKv::open(dir.path()).unwrap());
    }

    #[test]
    fn mem_conformance() {
        suite(&MemKv::new());
    }

    #[test]
    fn mem_crash_loses_unsynced_writes() {
        let kv = MemKv::new();
        let mut b = Batch::default();
        b.put(Cf::Tags, b"synced".to_vec(), vec![1]);
        kv.write(b, true).unwrap();
        let mut b = Batch::default();
        b.put(Cf::Tags, b"lost".to_vec(), vec![2]);
        kv.write(b, false).unwrap();
        kv.crash();
        assert!(kv.get(Cf::Tags, b"synced").unwrap().is_some());
        assert!(kv.get(Cf::Tags, b"lost").unwrap().is_none());
    }

    #[test]
    fn mem_torn_record_is_dropped_whole_with_what_follows() {
        let kv = MemKv::new();
        let mut b = Batch::default();
        b.put(Cf::Tags, b"synced".to_vec(), vec![1]);
        kv.write(b, true).unwrap();
        for (i, key) in ["kept", "torn", "after"].iter().enumerate() {
            let mut b = Batch::default();
            b.put(Cf::Tags, key.as_bytes().to_vec(), vec![i as u8; 8]);
            b.put(Cf::Blobs, key.as_bytes().to_vec(), vec![i as u8; 8]);
            kv.write(b, false).unwrap();
        }
        let r = kv.crash_tearing(1);
        assert_eq!(
            r,
            CrashReport {
                unsynced: 3,
                replayed: 1,
                torn: true
            }
        );
        kv.open().unwrap();
        assert!(kv.get(Cf::Tags, b"synced").unwrap().is_some());
        assert!(kv.get(Cf::Tags, b"kept").unwrap().is_some());
        assert!(kv.get(Cf::Blobs, b"kept").unwrap().is_some());
        for key in ["torn", "after"] {
            assert!(kv.get(Cf::Tags, key.as_bytes()).unwrap().is_none());
            assert!(kv.get(Cf::Blobs, key.as_bytes()).unwrap().is_none());
        }
    }

    #[test]
    fn mem_damaged_synced_record_refuses_open() {
        let kv = MemKv::new();
        assert!(!kv.corrupt_synced_tail(), "nothing synced yet");
        let mut b = Batch::default();
        b.put(Cf::RaftMeta, b"vote".to_vec(), vec![7; 16]);
        kv.write(b, true).unwrap();
        kv.crash();
        kv.open().unwrap();
        assert!(kv.corrupt_synced_tail());
        assert!(matches!(kv.open(), Err(KvError::Corrupt { .. })));
        kv.wipe();
        kv.open().unwrap();
        assert!(kv.get(Cf::RaftMeta, b"vote").unwrap().is_none());
    }

    #[test]
    fn rocks_reopen_keeps_synced_data() {
        let dir = tempfile::tempdir().unwrap();
        {
            let kv = RocksKv::open(dir.path()).unwrap();
            let mut b = Batch::default();
            b.put(Cf::Blobs, b"k".to_vec(), b"v".to_vec());
            kv.write(b, true).unwrap();
        }
        let kv = RocksKv::open(dir.path()).unwrap();
        assert_eq!(kv.get(Cf::Blobs, b"k").unwrap().unwrap(), b"v");
    }
}
