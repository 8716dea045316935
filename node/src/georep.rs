//! Cross-region and cross-account replication: the workers that ship the outbox to other
//! regions, the receiving side, read-through, and the link between regions.
//!
//! Shipping one event to a destination: offer the manifest's blob digests; for each blob the
//! destination region lacks, send its chunk list to one of its nodes, which answers with the
//! chunks it lacks from any blob it holds; send those; that node assembles the blob, verifies
//! its digest, stores it on its region's write quorum and commits it through its Raft; then
//! the manifest (children of an index first) and its tag apply there with their origin stamp.
//! The cursor advances through this region's Raft only after the destination acknowledged,
//! so delivery is at least once; every step on the receiving side is idempotent.
//!
//! Owns: per-destination workers (on the region leader only), retries with backoff, failure
//! status, shipping and read-through statistics, the link's emulated delay and partitions.
//! Never: decides a tag's winner (the state machine does, on stamps) or trusts a peer's
//! claim about who it is (the connection's certificate says which region it is).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use engine::blob_store::BlobBackend;
use engine::chunker::ChunkRef;
use engine::iam::Iam;
use engine::manifest;
use engine::origin::Stamp;
use engine::outbox::{self, Change, Destination, OutboxEvent};
use engine::policy::{PolicyDocument, Principal, RequestContext, Verdict};
use engine::state::{Command, Outcome, State};
use engine::{AccountId, Digest, Reference, RepoName};
use futures_util::StreamExt;
use registry_api::error::ApiError;
use registry_api::registry::{Manifest, Registry};

use crate::config::ReplicationSection;
use crate::raft::{NodeId, NodeInfo};
use crate::registry::{NodeRegistry, Platform};
use crate::transport::{
    GeoChange, GeoRequest, GeoResponse, GeoTarget, PeerRequest, PeerResponse, Transport,
    GEO_BATCH_BYTES_MAX, GEO_LIST_MAX,
};

/// Outbox events a worker takes per round.
const EVENTS_PER_ROUND: usize = 64;
/// First pause after a failure; doubled per failure up to `retry_max_ms`.
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Failures in a row before a destination's status says FAILED (a refusal: at once).
const FAILURES_BEFORE_STATUS: u32 = 3;
/// How often the other regions' round-trip times are measured.
const PING_INTERVAL: Duration = Duration::from_secs(2);
/// How far ahead of the receiving region's clock a change's stamp may be.
const STAMP_AHEAD_MS_MAX: u64 = 60 * 60 * 1000;
/// Index manifests nest one level (an index of images); deeper nesting is not shipped.
const MANIFEST_DEPTH_MAX: u32 = 2;

/// Parses `a.b.c.d/len` into an address and prefix length.
pub fn parse_cidr(s: &str) -> Option<(std::net::IpAddr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let addr: std::net::IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

fn in_cidr(ip: std::net::IpAddr, (net, len): (std::net::IpAddr, u8)) -> bool {
    match (ip, net) {
        (std::net::IpAddr::V4(a), std::net::IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (std::net::IpAddr::V6(a), std::net::IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// An error shipping to or fetching from another region.
#[derive(Debug, Clone)]
pub struct GeoError {
    /// Refused by configuration (policy, rules): retrying will not help until it changes.
    pub denied: bool,
    pub message: String,
}

impl GeoError {
    fn failed(m: impl Into<String>) -> GeoError {
        GeoError {
            denied: false,
            message: m.into(),
        }
    }
}

impl std::fmt::Display for GeoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// One other region as this node reaches it.
struct Remote {
    name: String,
    /// Node ids are per region; production addresses peers by QUIC address alone.
    nodes: Vec<(NodeId, NodeInfo)>,
    /// Smoothed round-trip time in microseconds (0: not measured yet).
    rtt_us: AtomicU64,
    /// The node that answered last (tried first).
    preferred: AtomicU64,
}

/// The link to the other regions: which nodes to call, an emulated WAN delay, and a switch
/// that cuts it (a partition, for drills and tests).
pub struct GeoLink<T: Transport> {
    transport: Arc<T>,
    remotes: Vec<Remote>,
    pub delay_ms: AtomicU64,
    pub blocked: AtomicBool,
}

impl<T: Transport> GeoLink<T> {
    /// The other regions of `[replication] regions`.
    pub fn from_config(transport: Arc<T>, config: &ReplicationSection) -> GeoLink<T> {
        let remotes = config
            .regions
            .iter()
            .map(|r| {
                let nodes = r
                    .quic
                    .iter()
                    .zip(r.http.iter().map(Some).chain(std::iter::repeat(None)))
                    .enumerate()
                    .map(|(i, (q, h))| {
                        let info = NodeInfo {
                            quic: q.clone(),
                            http: h.cloned().unwrap_or_default(),
                        };
                        (NodeId::MAX - i as NodeId, info)
                    })
                    .collect();
                (r.name.clone(), nodes)
            })
            .collect();
        GeoLink::new(transport, remotes, config.wan_delay_ms)
    }

    /// The named regions and their nodes.
    pub fn new(
        transport: Arc<T>,
        remotes: Vec<(String, Vec<(NodeId, NodeInfo)>)>,
        delay_ms: u64,
    ) -> GeoLink<T> {
        GeoLink {
            transport,
            remotes: remotes
                .into_iter()
                .map(|(name, nodes)| Remote {
                    name,
                    nodes,
                    rtt_us: AtomicU64::new(0),
                    preferred: AtomicU64::new(0),
                })
                .collect(),
            delay_ms: AtomicU64::new(delay_ms),
            blocked: AtomicBool::new(false),
        }
    }

    fn remote(&self, region: &str) -> Result<&Remote, GeoError> {
        self.remotes
            .iter()
            .find(|r| r.name == region)
            .ok_or_else(|| GeoError {
                denied: true,
                message: format!("region {region} is not configured in [replication] regions"),
            })
    }

    /// Other regions, nearest (by measured round trip) first; unmeasured ones last.
    pub fn nearest(&self) -> Vec<String> {
        let mut r: Vec<(u64, &str)> = self
            .remotes
            .iter()
            .map(|r| {
                let rtt = r.rtt_us.load(Ordering::Relaxed);
                (if rtt == 0 { u64::MAX } else { rtt }, r.name.as_str())
            })
            .collect();
        r.sort();
        r.into_iter().map(|(_, n)| n.to_string()).collect()
    }

    /// The HTTP endpoint of the region's node that answered last, if it has one.
    pub fn answering_http(&self, region: &str) -> Option<String> {
        let r = self.remote(region).ok()?;
        let i = self.pick(region).ok()?;
        r.nodes
            .get(i)
            .map(|(_, n)| n.http.clone())
            .filter(|h| !h.is_empty())
    }

    pub fn rtt_ms(&self, region: &str) -> Option<f64> {
        let us = self.remote(region).ok()?.rtt_us.load(Ordering::Relaxed);
        (us > 0).then_some(us as f64 / 1000.0)
    }

    /// The region's node to send a multi-step transfer to (the last one that answered).
    fn pick(&self, region: &str) -> Result<usize, GeoError> {
        let r = self.remote(region)?;
        Ok(r.preferred.load(Ordering::Relaxed) as usize % r.nodes.len().max(1))
    }

    /// Calls node `index` of `region`.
    async fn call_node(
        &self,
        region: &str,
        index: usize,
        req: GeoRequest,
    ) -> Result<GeoResponse, GeoError> {
        let r = self.remote(region)?;
        let (id, node) = r
            .nodes
            .get(index)
            .ok_or_else(|| GeoError::failed(format!("region {region} has no node {index}")))?;
        if self.blocked.load(Ordering::Relaxed) {
            return Err(GeoError::failed(format!("link to {region} is cut")));
        }
        let delay = Duration::from_millis(self.delay_ms.load(Ordering::Relaxed));
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let resp = self
            .transport
            .call(*id, node, PeerRequest::Geo(req))
            .await
            .map_err(|e| GeoError::failed(format!("{region}: {e}")))?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.blocked.load(Ordering::Relaxed) {
            return Err(GeoError::failed(format!("link to {region} is cut")));
        }
        match resp {
            PeerResponse::Geo(GeoResponse::Denied(m)) => Err(GeoError {
                denied: true,
                message: format!("{region}: {m}"),
            }),
            PeerResponse::Geo(GeoResponse::Failed(m)) => {
                Err(GeoError::failed(format!("{region}: {m}")))
            }
            PeerResponse::Geo(g) => {
                r.preferred.store(index as u64, Ordering::Relaxed);
                Ok(g)
            }
            PeerResponse::Refused(m) => Err(GeoError::failed(format!("{region} refused: {m}"))),
            other => Err(GeoError::failed(format!(
                "{region}: unexpected answer {other:?}"
            ))),
        }
    }

    /// Calls any node of `region`: the preferred one first, then the others.
    async fn call(
        &self,
        region: &str,
        req: impl Fn() -> GeoRequest,
    ) -> Result<GeoResponse, GeoError> {
        let n = self.remote(region)?.nodes.len();
        let first = self.pick(region)?;
        let mut last = GeoError::failed(format!("region {region} lists no node"));
        for i in 0..n {
            match self.call_node(region, (first + i) % n, req()).await {
                Ok(r) => return Ok(r),
                Err(e) if e.denied => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Measures each region's round-trip time, forever.
    pub async fn ping_loop(self: Arc<Self>) {
        loop {
            for r in &self.remotes {
                let start = tokio::time::Instant::now();
                if self.call(&r.name, || GeoRequest::Ping).await.is_ok() {
                    let us = start.elapsed().as_micros().max(1) as u64;
                    let old = r.rtt_us.load(Ordering::Relaxed);
                    let new = if old == 0 { us } else { (old * 3 + us) / 4 };
                    r.rtt_us.store(new, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(PING_INTERVAL).await;
        }
    }
}

/// Counters of one destination.
#[derive(Default)]
pub struct DestStats {
    /// Blob and manifest bytes the shipped images hold (what a full copy would send).
    pub bytes_logical: AtomicU64,
    /// Chunk and manifest bytes actually sent.
    pub bytes_shipped: AtomicU64,
    pub blobs_shipped: AtomicU64,
    /// Blobs the destination already had (linked, nothing sent).
    pub blobs_present: AtomicU64,
    pub events_shipped: AtomicU64,
    /// Shipping an event right now.
    pub busy: AtomicBool,
    /// Lag samples: milliseconds from an event's push to its acknowledgment here.
    pub lag_ms: Mutex<std::collections::VecDeque<u64>>,
    pub last_error: Mutex<Option<String>>,
}

/// Outbox events a status report reads past a destination's cursor.
const REPORT_SCAN_MAX: usize = 1024;
/// Lag samples kept per destination (the most recent).
const LAG_SAMPLES_MAX: usize = 10_000;

/// Cross-region replication of one node: its workers (while it leads its region), the
/// receiving side, and read-through.
pub struct Georep<P: Platform> {
    registry: Arc<NodeRegistry<P>>,
    pub link: Arc<GeoLink<P::Transport>>,
    region: String,
    poll: Duration,
    retry_max: Duration,
    /// Set by an operator: workers ship nothing (read-through still works).
    pub paused: AtomicBool,
    stats: Mutex<BTreeMap<Destination, Arc<DestStats>>>,
    workers: Mutex<BTreeMap<Destination, tokio::task::JoinHandle<()>>>,
    pub read_through_blobs: AtomicU64,
    pub read_through_manifests: AtomicU64,
    pub read_through_bytes: AtomicU64,
    client_networks: Vec<((std::net::IpAddr, u8), String)>,
}

type Ship<T> = Result<T, GeoError>;

impl<P: Platform> Georep<P> {
    pub fn new(
        registry: Arc<NodeRegistry<P>>,
        link: GeoLink<P::Transport>,
        region: &str,
        config: &ReplicationSection,
    ) -> Arc<Georep<P>> {
        Arc::new(Georep {
            registry,
            link: Arc::new(link),
            region: region.to_string(),
            poll: Duration::from_millis(config.poll_interval_ms.max(1)),
            retry_max: Duration::from_millis(config.retry_max_ms.max(1)),
            paused: AtomicBool::new(false),
            stats: Mutex::new(BTreeMap::new()),
            workers: Mutex::new(BTreeMap::new()),
            read_through_blobs: AtomicU64::new(0),
            read_through_manifests: AtomicU64::new(0),
            read_through_bytes: AtomicU64::new(0),
            client_networks: config
                .client_networks
                .iter()
                .filter_map(|n| Some((parse_cidr(&n.cidr)?, n.region.clone())))
                .collect(),
        })
    }

    pub fn stats(&self, dest: &Destination) -> Arc<DestStats> {
        self.stats
            .lock()
            .expect("stats lock")
            .entry(dest.clone())
            .or_default()
            .clone()
    }

    pub fn all_stats(&self) -> Vec<(Destination, Arc<DestStats>)> {
        self.stats
            .lock()
            .expect("stats lock")
            .iter()
            .map(|(d, s)| (d.clone(), s.clone()))
            .collect()
    }

    /// The region that serves a client address best, if it is another region.
    pub fn region_of_client(&self, ip: std::net::IpAddr) -> Option<&str> {
        self.client_networks
            .iter()
            .filter(|(net, _)| in_cidr(ip, *net))
            .max_by_key(|((_, len), _)| *len)
            .map(|(_, r)| r.as_str())
            .filter(|r| *r != self.region)
    }

    fn state(&self) -> State<'_, P::Kv> {
        State::new(self.registry.kv().as_ref())
    }

    // ---- workers ----

    /// Starts a worker for every destination the outbox names, as they appear; each ships
    /// only while this node leads its region.
    pub async fn run(self: Arc<Self>) {
        loop {
            match outbox::known_destinations(self.registry.kv().as_ref()) {
                Ok(dests) => {
                    let mut workers = self.workers.lock().expect("workers lock");
                    for d in dests {
                        workers.entry(d.clone()).or_insert_with(|| {
                            let me = self.clone();
                            crate::rt::spawn(async move { me.worker(d).await })
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "read replication destinations"),
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    async fn worker(self: Arc<Self>, dest: Destination) {
        tracing::info!(region = %dest.region, account = %dest.account, "replication worker started");
        let stats = self.stats(&dest);
        let mut failures: u32 = 0;
        loop {
            if self.registry.raft_stopped() {
                tracing::warn!(region = %dest.region, account = %dest.account, "the Raft core has stopped; replication worker stops");
                return;
            }
            if !self.registry.is_leader() || self.paused.load(Ordering::Relaxed) {
                tokio::time::sleep(self.poll).await;
                continue;
            }
            match self.round(&dest, &stats).await {
                Ok(true) => {
                    // Also clears a failure another leader recorded (a no-op when none is).
                    failures = 0;
                    *stats.last_error.lock().expect("stats lock") = None;
                    self.set_failure(&dest, None).await;
                }
                // Nothing to ship: wake on the next applied entry (a push lands in the outbox
                // as it applies), or after the poll interval.
                Ok(false) => {
                    if !self.registry.wait_for_next_apply(self.poll).await {
                        continue; // the Raft core stopped: the check above ends the worker
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(region = %dest.region, account = %dest.account, error = %e, failures, "replication failed; retrying");
                    *stats.last_error.lock().expect("stats lock") = Some(e.message.clone());
                    if e.denied || failures == FAILURES_BEFORE_STATUS {
                        self.set_failure(&dest, Some(e.message.clone())).await;
                    }
                    let backoff = RETRY_MIN
                        .saturating_mul(1 << failures.min(16))
                        .min(self.retry_max);
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    async fn set_failure(&self, dest: &Destination, reason: Option<String>) {
        let kv = self.registry.kv().clone();
        let current = outbox::failure(kv.as_ref(), dest).ok().flatten();
        if current == reason {
            return;
        }
        let _ = self
            .registry
            .propose_command(Command::ReplicationFailureSet {
                destination: dest.clone(),
                reason,
            })
            .await;
    }

    /// Ships the next events; `Ok(false)` when there was nothing to do. One round: the
    /// changes of up to `EVENTS_PER_ROUND` events, the blobs they need offered once per
    /// repository, each missing blob shipped once (a few at a time), then every change applied
    /// in order in as few messages as fit.
    async fn round(&self, dest: &Destination, stats: &DestStats) -> Ship<bool> {
        let kv = self.registry.kv().clone();
        let local = |e: engine::state::StateError| GeoError::failed(format!("local state: {e}"));
        let cursor = outbox::cursor(kv.as_ref(), dest).map_err(local)?;
        let events = outbox::events_after(kv.as_ref(), cursor, EVENTS_PER_ROUND).map_err(local)?;
        let Some(last) = events.last().map(|e| e.seq) else {
            return Ok(false);
        };
        tracing::debug!(region = %dest.region, cursor, events = events.len(), "shipping outbox events");
        stats.busy.store(true, Ordering::Relaxed);
        let r = self.ship_events(dest, &events, stats).await;
        stats.busy.store(false, Ordering::Relaxed);
        r?;
        let now = self.registry.now_ms();
        {
            let mut lag = stats.lag_ms.lock().expect("stats lock");
            for ev in events.iter().filter(|e| e.destinations.contains(dest)) {
                stats.events_shipped.fetch_add(1, Ordering::Relaxed);
                if ev.at_ms > 0 {
                    if lag.len() >= LAG_SAMPLES_MAX {
                        lag.pop_front();
                    }
                    lag.push_back(now.saturating_sub(ev.at_ms));
                }
            }
        }
        self.registry
            .propose_command(Command::ReplicationCursorAdvanced {
                destination: dest.clone(),
                seq: last,
            })
            .await
            .map_err(|e| GeoError::failed(format!("advance the cursor: {e}")))?;
        Ok(true)
    }

    async fn ship_events(
        &self,
        dest: &Destination,
        events: &[OutboxEvent],
        stats: &DestStats,
    ) -> Ship<()> {
        // The changes, in order (an index's children before it), and the blobs they need.
        let mut changes: Vec<(GeoTarget, GeoChange)> = Vec::new();
        let mut needs: BTreeMap<GeoTarget, BTreeMap<Digest, u64>> = BTreeMap::new();
        for ev in events.iter().filter(|e| e.destinations.contains(dest)) {
            let target = GeoTarget {
                source_account: ev.account,
                account: dest.account,
                repo: ev.repo.clone(),
            };
            let change = match &ev.change {
                Change::ManifestPut { digest, tag, stamp } => {
                    let Some(m) = self
                        .state()
                        .manifest(ev.account, &ev.repo, digest)
                        .map_err(|e| GeoError::failed(e.to_string()))?
                    else {
                        // Deleted since; its delete event follows. The delete took the tags
                        // pointing at it, this one included if nothing moved it since (a later
                        // event does, and follows too): the tag's net change is a delete at
                        // this event's stamp. Skipping the event would leave the tag at
                        // whatever it named before in the destination.
                        if let (Some(tag), Some(stamp)) = (tag, stamp) {
                            changes.push((
                                target,
                                GeoChange::TagDeleted {
                                    tag: tag.clone(),
                                    stamp: stamp.clone(),
                                },
                            ));
                        }
                        continue;
                    };
                    let blobs = needs.entry(target.clone()).or_default();
                    self.collect(&target, &m.bytes, &m.media_type, 0, blobs, &mut changes)?;
                    let logical = m.bytes.len() as u64;
                    stats.bytes_logical.fetch_add(logical, Ordering::Relaxed);
                    stats.bytes_shipped.fetch_add(logical, Ordering::Relaxed);
                    GeoChange::ManifestPut {
                        digest: digest.clone(),
                        media_type: m.media_type,
                        bytes: m.bytes,
                        tag: tag.clone(),
                        stamp: stamp.clone(),
                    }
                }
                Change::TagDeleted { tag, stamp } => GeoChange::TagDeleted {
                    tag: tag.clone(),
                    stamp: stamp.clone(),
                },
                Change::ManifestDeleted { digest } => GeoChange::ManifestDeleted {
                    digest: digest.clone(),
                },
                Change::ManifestDeletedAt { digest, stamp } => GeoChange::ManifestDeletedAt {
                    digest: digest.clone(),
                    stamp: stamp.clone(),
                },
            };
            changes.push((target, change));
        }
        self.ship_blobs(dest, &needs, stats).await?;
        self.apply(dest, changes).await
    }

    /// Applies changes in order, as many per message as fit.
    async fn apply(&self, dest: &Destination, changes: Vec<(GeoTarget, GeoChange)>) -> Ship<()> {
        let mut batch: Vec<(GeoTarget, GeoChange)> = Vec::new();
        let mut bytes = 0u64;
        let mut it = changes.into_iter().peekable();
        while let Some(c) = it.next() {
            if let GeoChange::ManifestPut { bytes: b, .. } = &c.1 {
                bytes += b.len() as u64;
            }
            batch.push(c);
            let next = it.peek().map_or(0, |(_, n)| match n {
                GeoChange::ManifestPut { bytes: b, .. } => b.len() as u64,
                _ => 0,
            });
            if it.peek().is_none()
                || batch.len() == GEO_LIST_MAX
                || bytes + next > GEO_BATCH_BYTES_MAX
            {
                let items = std::mem::take(&mut batch);
                bytes = 0;
                match self
                    .link
                    .call(&dest.region, || GeoRequest::Apply {
                        items: items.clone(),
                    })
                    .await?
                {
                    GeoResponse::Done => {}
                    other => return Err(GeoError::failed(format!("apply answered {other:?}"))),
                }
            }
        }
        Ok(())
    }

    /// Gathers what a manifest needs in the destination: its blobs, and its children (each
    /// with its own needs, applied before it).
    fn collect(
        &self,
        target: &GeoTarget,
        bytes: &[u8],
        media_type: &str,
        depth: u32,
        blobs: &mut BTreeMap<Digest, u64>,
        changes: &mut Vec<(GeoTarget, GeoChange)>,
    ) -> Ship<()> {
        let parsed = manifest::parse(bytes, media_type, u64::MAX)
            .map_err(|e| GeoError::failed(format!("stored manifest does not parse: {e}")))?;
        for child in parsed.required_manifests() {
            if depth + 1 > MANIFEST_DEPTH_MAX {
                return Err(GeoError::failed("manifests nest too deep to ship"));
            }
            let m = self
                .state()
                .manifest(target.source_account, &target.repo, child)
                .map_err(|e| GeoError::failed(e.to_string()))?
                .ok_or_else(|| GeoError::failed(format!("child manifest {child} is gone")))?;
            self.collect(target, &m.bytes, &m.media_type, depth + 1, blobs, changes)?;
            changes.push((
                target.clone(),
                GeoChange::ManifestPut {
                    digest: child.clone(),
                    media_type: m.media_type,
                    bytes: m.bytes,
                    tag: None,
                    stamp: None,
                },
            ));
        }
        for d in parsed.required_blobs() {
            let rec = self
                .state()
                .blob(d)
                .map_err(|e| GeoError::failed(e.to_string()))?
                .ok_or_else(|| GeoError::failed(format!("blob {d} is not in this region")))?;
            blobs.insert(d.clone(), rec.size_bytes);
        }
        Ok(())
    }

    /// Offers each repository's blobs; ships every blob the destination lacks once (a few at
    /// a time), then links it into the other repositories that need it.
    async fn ship_blobs(
        &self,
        dest: &Destination,
        needs: &BTreeMap<GeoTarget, BTreeMap<Digest, u64>>,
        stats: &DestStats,
    ) -> Ship<()> {
        let mut missing: BTreeMap<Digest, (u64, Vec<GeoTarget>)> = BTreeMap::new();
        for (target, blobs) in needs {
            let list: Vec<(Digest, u64)> = blobs.iter().map(|(d, s)| (d.clone(), *s)).collect();
            for d in self.offer(dest, target, &list).await? {
                if let Some(size) = blobs.get(&d) {
                    missing
                        .entry(d)
                        .or_insert((*size, Vec::new()))
                        .1
                        .push(target.clone());
                }
            }
            for (d, size) in &list {
                stats.bytes_logical.fetch_add(*size, Ordering::Relaxed);
                if !missing.contains_key(d) {
                    stats.blobs_present.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let jobs: Vec<(Digest, u64, GeoTarget)> = missing
            .iter()
            .map(|(d, (size, targets))| (d.clone(), *size, targets[0].clone()))
            .collect();
        let sends = jobs.into_iter().map(|(d, size, target)| async move {
            self.ship_blob(dest, &target, &d, size, stats).await?;
            stats.blobs_shipped.fetch_add(1, Ordering::Relaxed);
            Ok::<(), GeoError>(())
        });
        let results: Vec<Ship<()>> = futures_util::stream::iter(sends)
            .buffer_unordered(self.blobs_in_flight())
            .collect()
            .await;
        results.into_iter().collect::<Ship<()>>()?;
        // Blobs shipped into one repository are now in the region: link them elsewhere.
        let mut relink: BTreeMap<&GeoTarget, Vec<(Digest, u64)>> = BTreeMap::new();
        for (d, (size, targets)) in &missing {
            for t in &targets[1..] {
                relink.entry(t).or_default().push((d.clone(), *size));
            }
        }
        for (t, list) in relink {
            let still = self.offer(dest, t, &list).await?;
            if let Some(d) = still.first() {
                return Err(GeoError::failed(format!(
                    "blob {d} shipped but still missing"
                )));
            }
        }
        Ok(())
    }

    /// Blobs shipped to one destination at once: each has at most one message of chunks
    /// (`GEO_BATCH_BYTES_MAX`) in flight, so `limits.geo_inflight_bytes_max` bounds the bytes.
    fn blobs_in_flight(&self) -> usize {
        usize::try_from(self.registry.limits().geo_inflight_bytes_max / GEO_BATCH_BYTES_MAX)
            .unwrap_or(1)
            .max(1)
    }

    /// Offers blobs for `target`; returns those the destination region lacks.
    async fn offer(
        &self,
        dest: &Destination,
        target: &GeoTarget,
        blobs: &[(Digest, u64)],
    ) -> Ship<Vec<Digest>> {
        let mut missing = Vec::new();
        for batch in blobs.chunks(GEO_LIST_MAX) {
            match self
                .link
                .call(&dest.region, || GeoRequest::Offer {
                    target: target.clone(),
                    blobs: batch.to_vec(),
                })
                .await?
            {
                GeoResponse::MissingBlobs(m) => missing.extend(m),
                other => return Err(GeoError::failed(format!("offer answered {other:?}"))),
            }
        }
        Ok(missing)
    }

    /// Sends one blob to one node of the destination: only the chunks it lacks.
    async fn ship_blob(
        &self,
        dest: &Destination,
        target: &GeoTarget,
        digest: &Digest,
        size: u64,
        stats: &DestStats,
    ) -> Ship<()> {
        let bytes = self
            .registry
            .ensure_local(digest)
            .await
            .map_err(|e| GeoError::failed(format!("read {digest}: {e}")))?;
        let chunks = self.chunk_index(digest).await?;
        let node = self.link.pick(&dest.region)?;
        let ranges = chunk_ranges(&chunks);
        // A blob of one chunk is sent whole: asking first would cost a round trip to save it.
        let mut missing = if chunks.len() == 1 {
            vec![0]
        } else {
            Vec::new()
        };
        let parts = if chunks.len() > 1 {
            chunks.chunks(GEO_LIST_MAX)
        } else {
            [].chunks(1)
        };
        for (i, part) in parts.enumerate() {
            match self
                .link
                .call_node(
                    &dest.region,
                    node,
                    GeoRequest::ChunkQuery {
                        chunks: part.to_vec(),
                    },
                )
                .await?
            {
                GeoResponse::MissingChunks(m) => missing.extend(
                    m.into_iter()
                        .filter(|j| (*j as usize) < part.len())
                        .map(|j| i * GEO_LIST_MAX + j as usize),
                ),
                other => return Err(GeoError::failed(format!("chunk query answered {other:?}"))),
            }
        }
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut batch_bytes = 0u64;
        for (n, i) in missing.iter().enumerate() {
            let part = chunk_of(&bytes, &ranges, *i, digest)?;
            batch_bytes += part.len() as u64;
            batch.push(part.to_vec());
            // Full batches go ahead; the last one travels with the assembly.
            if batch_bytes >= GEO_BATCH_BYTES_MAX / 2 && n + 1 < missing.len() {
                let sent = std::mem::take(&mut batch);
                match self
                    .link
                    .call_node(&dest.region, node, GeoRequest::Chunks { chunks: sent })
                    .await?
                {
                    GeoResponse::Done => {}
                    other => return Err(GeoError::failed(format!("chunks answered {other:?}"))),
                }
                stats
                    .bytes_shipped
                    .fetch_add(batch_bytes, Ordering::Relaxed);
                batch_bytes = 0;
            }
        }
        match self
            .link
            .call_node(
                &dest.region,
                node,
                GeoRequest::Assemble {
                    target: target.clone(),
                    digest: digest.clone(),
                    size_bytes: size,
                    chunks,
                    data: batch,
                },
            )
            .await?
        {
            GeoResponse::Done => {
                stats
                    .bytes_shipped
                    .fetch_add(batch_bytes, Ordering::Relaxed);
                Ok(())
            }
            other => Err(GeoError::failed(format!("assemble answered {other:?}"))),
        }
    }

    async fn chunk_index(&self, digest: &Digest) -> Ship<Vec<ChunkRef>> {
        let store = self.registry.blob_store().clone();
        let d = digest.clone();
        self.registry
            .blocking(move || {
                store
                    .chunk_index(&d)
                    .map_err(|e| ApiError::Internal(e.to_string()))
            })
            .await
            .map_err(|e| GeoError::failed(format!("chunk index of {digest}: {e}")))
    }

    // ---- the receiving side ----

    /// Answers a request from a node of region `from`.
    pub async fn serve(&self, from: &str, req: GeoRequest) -> GeoResponse {
        match self.serve_inner(from, req).await {
            Ok(r) => r,
            Err(e) if e.denied => GeoResponse::Denied(e.message),
            Err(e) => GeoResponse::Failed(e.message),
        }
    }

    async fn serve_inner(&self, from: &str, req: GeoRequest) -> Ship<GeoResponse> {
        let api = |e: ApiError| GeoError::failed(e.to_string());
        let st = |e: engine::state::StateError| GeoError::failed(e.to_string());
        match req {
            GeoRequest::Ping => Ok(GeoResponse::Pong),
            GeoRequest::Offer { target, blobs } => {
                self.admit_shipment(from, &target)?;
                bounded(blobs.len(), "blobs offered")?;
                let mut missing = Vec::new();
                for (d, size) in blobs {
                    match self.state().blob(&d).map_err(st)? {
                        Some(rec) if rec.size_bytes == size => {
                            if self
                                .state()
                                .blob_link(target.account, &target.repo, &d)
                                .map_err(st)?
                                .is_none()
                            {
                                self.propose(Command::BlobCommitted {
                                    account: target.account,
                                    repo: target.repo.clone(),
                                    digest: d,
                                    size_bytes: size,
                                    holders: rec.holders,
                                    now_ms: self.registry.now_ms(),
                                })
                                .await?;
                            }
                        }
                        Some(rec) => {
                            return Err(GeoError::failed(format!(
                                "blob {d} is {} bytes here, offered as {size}",
                                rec.size_bytes
                            )))
                        }
                        None => missing.push(d),
                    }
                }
                Ok(GeoResponse::MissingBlobs(missing))
            }
            GeoRequest::ChunkQuery { chunks } => {
                bounded(chunks.len(), "chunks queried")?;
                let store = self.registry.blob_store().clone();
                let missing = self
                    .registry
                    .blocking(move || {
                        let mut missing = Vec::new();
                        for (i, c) in chunks.iter().enumerate() {
                            let have = store
                                .chunk_bytes(&c.hash, c.len_bytes)
                                .map_err(|e| ApiError::Internal(e.to_string()))?;
                            if have.is_none() {
                                missing.push(i as u32);
                            }
                        }
                        Ok(missing)
                    })
                    .await
                    .map_err(api)?;
                Ok(GeoResponse::MissingChunks(missing))
            }
            GeoRequest::Chunks { chunks } => {
                self.stage(chunks).await?;
                Ok(GeoResponse::Done)
            }
            GeoRequest::Assemble {
                target,
                digest,
                size_bytes,
                chunks,
                data,
            } => {
                self.admit_shipment(from, &target)?;
                self.stage(data).await?;
                self.assemble(&target, &digest, size_bytes, chunks).await?;
                Ok(GeoResponse::Done)
            }
            GeoRequest::Apply { items } => {
                bounded(items.len(), "changes applied")?;
                let targets: std::collections::BTreeSet<&GeoTarget> =
                    items.iter().map(|(t, _)| t).collect();
                for t in targets {
                    self.admit_shipment(from, t)?;
                }
                for (target, change) in items {
                    self.apply_change(from, &target, change).await?;
                }
                Ok(GeoResponse::Done)
            }
            GeoRequest::FetchManifest { target, reference } => {
                self.admit_read_through(from, &target)?;
                let reference = Reference::parse(&reference)
                    .map_err(|e| GeoError::failed(format!("reference: {e}")))?;
                let digest = match &reference {
                    Reference::Digest(d) => Some(d.clone()),
                    Reference::Tag(t) => self
                        .state()
                        .tag(target.source_account, &target.repo, t)
                        .map_err(st)?
                        .map(|t| t.digest),
                };
                let found = match digest {
                    Some(d) => self
                        .state()
                        .manifest(target.source_account, &target.repo, &d)
                        .map_err(st)?
                        .map(|m| (d, m)),
                    None => None,
                };
                Ok(match found {
                    Some((digest, m)) => GeoResponse::Manifest {
                        digest,
                        media_type: m.media_type,
                        bytes: m.bytes,
                    },
                    None => GeoResponse::NotFound(format!("{}:{reference}", target.repo)),
                })
            }
            GeoRequest::HasBlob { target, digest } => Ok(
                match self
                    .state()
                    .blob_link(target.account, &target.repo, &digest)
                    .map_err(st)?
                {
                    Some(_) => GeoResponse::Done,
                    None => GeoResponse::NotFound(digest.to_string()),
                },
            ),
            GeoRequest::FetchBlobIndex { target, digest } => {
                self.admit_read_through(from, &target)?;
                let Some(link) = self
                    .state()
                    .blob_link(target.source_account, &target.repo, &digest)
                    .map_err(st)?
                else {
                    return Ok(GeoResponse::NotFound(digest.to_string()));
                };
                self.registry.ensure_local(&digest).await.map_err(api)?;
                Ok(GeoResponse::BlobIndex {
                    size_bytes: link.size_bytes,
                    chunks: self.chunk_index(&digest).await?,
                })
            }
            GeoRequest::FetchChunks {
                target,
                digest,
                indices,
            } => {
                self.admit_read_through(from, &target)?;
                bounded(indices.len(), "chunks fetched")?;
                if self
                    .state()
                    .blob_link(target.source_account, &target.repo, &digest)
                    .map_err(st)?
                    .is_none()
                {
                    return Ok(GeoResponse::NotFound(digest.to_string()));
                }
                let bytes = self.registry.ensure_local(&digest).await.map_err(api)?;
                let ranges = chunk_ranges(&self.chunk_index(&digest).await?);
                let mut out = Vec::new();
                let mut total = 0u64;
                for i in indices {
                    let part = chunk_of(&bytes, &ranges, i as usize, &digest)?;
                    total += part.len() as u64;
                    if total > GEO_BATCH_BYTES_MAX {
                        return Err(GeoError::failed("chunks asked exceed one message"));
                    }
                    out.push(part.to_vec());
                }
                Ok(GeoResponse::ChunkData(out))
            }
        }
    }

    /// Keeps chunks sent by another region (each named by its own BLAKE3 hash), bounded.
    async fn stage(&self, chunks: Vec<Vec<u8>>) -> Ship<()> {
        bounded(chunks.len(), "chunks sent")?;
        let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        if total > GEO_BATCH_BYTES_MAX {
            return Err(GeoError::failed(format!(
                "{total} chunk bytes in one message; the bound is {GEO_BATCH_BYTES_MAX}"
            )));
        }
        if chunks.is_empty() {
            return Ok(());
        }
        let store = self.registry.blob_store().clone();
        let now = self.registry.now_ms();
        self.registry
            .blocking(move || {
                for c in &chunks {
                    let hash: [u8; 32] = blake3::hash(c).into();
                    store
                        .stage_chunk(&hash, c, now)
                        .map_err(|e| ApiError::BlobUploadInvalid(e.to_string()))?;
                }
                Ok(())
            })
            .await
            .map_err(|e| GeoError::failed(e.to_string()))
    }

    async fn propose(&self, cmd: Command) -> Ship<()> {
        match self
            .registry
            .propose_command(cmd)
            .await
            .map_err(|e| GeoError::failed(e.to_string()))?
        {
            Outcome::Done => Ok(()),
            o => Err(GeoError::failed(format!("not applied: {o:?}"))),
        }
    }

    /// A shipment from `from` into `target`: the account must exist here, and another
    /// account's shipment needs this account's registry policy to allow it.
    fn admit_shipment(&self, from: &str, target: &GeoTarget) -> Ship<()> {
        let kv = self.registry.kv().clone();
        let iam = Iam::new(kv.as_ref());
        let st = |e: engine::state::StateError| GeoError::failed(e.to_string());
        if target.account != AccountId::DEFAULT
            && iam.account(target.account).map_err(st)?.is_none()
        {
            return Err(GeoError {
                denied: true,
                message: format!(
                    "account {} does not exist in region {}",
                    target.account, self.region
                ),
            });
        }
        if target.source_account == target.account {
            return Ok(());
        }
        let policy = iam
            .registry_policy(target.account)
            .map_err(st)?
            .and_then(|t| PolicyDocument::parse_resource(&t).ok());
        let principal = Principal::root(&target.source_account.to_string());
        let resource = format!(
            "arn:aws:ecr:{}:{}:repository/{}",
            self.region, target.account, target.repo
        );
        let account = target.account.to_string();
        let context = BTreeMap::from([("portolan:sourceregion".to_string(), from.to_string())]);
        let req = RequestContext {
            principal: &principal,
            action: "ecr:ReplicateImage",
            resource: &resource,
            resource_account: &account,
            context: &context,
        };
        match policy.map(|p| p.verdict(&req, true)) {
            Some(Verdict::Allow) => Ok(()),
            _ => Err(GeoError {
                denied: true,
                message: format!(
                    "the registry policy of account {} in region {} does not allow account {} to replicate (ecr:ReplicateImage)",
                    target.account, self.region, target.source_account
                ),
            }),
        }
    }

    /// A read-through from `from`: this region's rules must send the repository there.
    fn admit_read_through(&self, from: &str, target: &GeoTarget) -> Ship<()> {
        let dests = outbox::destinations(
            self.registry.kv().as_ref(),
            target.source_account,
            &target.repo,
        )
        .map_err(|e| GeoError::failed(e.to_string()))?;
        let wanted = Destination {
            region: from.to_string(),
            account: target.account,
        };
        if dests.contains(&wanted) {
            Ok(())
        } else {
            Err(GeoError {
                denied: true,
                message: format!(
                    "no replication rule of account {} sends {} to {from}/{}",
                    target.source_account, target.repo, target.account
                ),
            })
        }
    }

    async fn assemble(
        &self,
        target: &GeoTarget,
        digest: &Digest,
        size_bytes: u64,
        chunks: Vec<ChunkRef>,
    ) -> Ship<()> {
        check_chunk_list(digest, size_bytes, &chunks, self.registry.limits())?;
        let store = self.registry.blob_store().clone();
        let (d, tmp) = (digest.clone(), crate::rt::new_id());
        let stored = self
            .registry
            .blocking(move || {
                store
                    .assemble_blob(&d, size_bytes, &chunks, &tmp)
                    .map_err(|e| ApiError::BlobUploadInvalid(e.to_string()))
            })
            .await
            .map_err(|e| GeoError::failed(e.to_string()))?;
        self.registry
            .commit_received(target.account, &target.repo, stored)
            .await
            .map_err(|e| GeoError::failed(e.to_string()))
    }

    async fn apply_change(&self, from: &str, target: &GeoTarget, change: GeoChange) -> Ship<()> {
        let (account, repo) = (target.account, target.repo.clone());
        let now = self.registry.now_ms();
        let stamped_here = |s: &engine::origin::Stamp| {
            if s.region != from {
                return Err(GeoError::failed(format!(
                    "region {from} sent a change stamped by {}",
                    s.region
                )));
            }
            // A stamp far ahead of this clock would win every later move here.
            if s.ms() > now.saturating_add(STAMP_AHEAD_MS_MAX) {
                return Err(GeoError::failed(format!(
                    "region {from} sent a change stamped {} ms ahead of this region's clock (at most {STAMP_AHEAD_MS_MAX})",
                    s.ms() - now
                )));
            }
            Ok(())
        };
        match change {
            GeoChange::ManifestPut {
                digest,
                media_type,
                bytes,
                tag,
                stamp,
            } => {
                let tag = if self.registry.bugs.lost_replica_tag_moves {
                    None
                } else {
                    tag
                };
                let limit = self.registry.limits().manifest_bytes_max;
                manifest::parse(&bytes, &media_type, limit)
                    .map_err(|e| GeoError::failed(format!("manifest {digest}: {e}")))?;
                if Digest::of(digest.algorithm(), &bytes) != digest {
                    return Err(GeoError::failed(format!("manifest bytes are not {digest}")));
                }
                let stamp = match (&tag, stamp) {
                    (Some(_), Some(s)) => {
                        stamped_here(&s)?;
                        if self.registry.bugs.replica_tags_always_win {
                            // Later than anything: the incoming move always wins.
                            Stamp {
                                hlc: s.hlc.max(
                                    engine::origin::hlc(self.registry.kv().as_ref()).unwrap_or(0)
                                        + (1 << 20),
                                ),
                                region: s.region,
                            }
                        } else {
                            s
                        }
                    }
                    (Some(_), None) => return Err(GeoError::failed("a tag move without a stamp")),
                    // A manifest without a tag carries no stamp; the state ignores it.
                    (None, _) => engine::origin::Stamp {
                        hlc: 0,
                        region: from.to_string(),
                    },
                };
                self.propose(Command::ReplicaManifestPut {
                    account,
                    repo,
                    digest,
                    media_type,
                    bytes,
                    tag,
                    stamp,
                    now_ms: self.registry.now_ms(),
                })
                .await
            }
            GeoChange::TagDeleted { tag, stamp } => {
                stamped_here(&stamp)?;
                self.propose(Command::ReplicaTagDeleted {
                    account,
                    repo,
                    tag,
                    stamp,
                })
                .await
            }
            GeoChange::ManifestDeleted { digest } => {
                self.propose(Command::ReplicaManifestDeleted {
                    account,
                    repo,
                    digest,
                })
                .await
            }
            GeoChange::ManifestDeletedAt { digest, stamp } => {
                stamped_here(&stamp)?;
                self.propose(Command::ReplicaManifestDeletedAt {
                    account,
                    repo,
                    digest,
                    stamp,
                })
                .await
            }
        }
    }

    // ---- read-through ----

    /// A manifest this region lacks, from the nearest region whose rules send it here
    /// (verified against its digest; served, not stored: it arrives with its blobs through
    /// replication, so a tag here never points at a manifest whose blobs are missing).
    pub async fn read_manifest(
        &self,
        account: AccountId,
        repo: &RepoName,
        reference: &Reference,
    ) -> Option<Manifest> {
        let target = GeoTarget {
            source_account: account,
            account,
            repo: repo.clone(),
        };
        for region in self.link.nearest() {
            let r = self
                .link
                .call(&region, || GeoRequest::FetchManifest {
                    target: target.clone(),
                    reference: reference.to_string(),
                })
                .await;
            if let Ok(GeoResponse::Manifest {
                digest,
                media_type,
                bytes,
            }) = r
            {
                let actual = Digest::of(digest.algorithm(), &bytes);
                let matches = match reference {
                    Reference::Digest(d) => *d == actual,
                    Reference::Tag(_) => actual == digest,
                };
                if matches {
                    self.read_through_manifests.fetch_add(1, Ordering::Relaxed);
                    return Some(Manifest {
                        digest,
                        media_type,
                        bytes: Bytes::from(bytes),
                    });
                }
                tracing::warn!(%region, %digest, "read-through manifest did not verify");
            }
        }
        None
    }

    /// A blob this region lacks, fetched from the nearest region whose rules send it here
    /// (only the chunks this node lacks), verified, stored on the region's write quorum and
    /// committed. Returns whether it was found.
    pub async fn read_blob(
        &self,
        account: AccountId,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<bool, ApiError> {
        let target = GeoTarget {
            source_account: account,
            account,
            repo: repo.clone(),
        };
        let mut last = None;
        for region in self.link.nearest() {
            match self.read_blob_from(&region, &target, digest).await {
                Ok(true) => {
                    self.read_through_blobs.fetch_add(1, Ordering::Relaxed);
                    return Ok(true);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%region, %digest, error = %e, "read-through failed");
                    last = Some(e);
                }
            }
        }
        match last {
            Some(e) if !e.denied => Err(ApiError::Unavailable(format!(
                "blob {digest} is not here yet and no other region could send it: {e}"
            ))),
            _ => Ok(false),
        }
    }

    async fn read_blob_from(
        &self,
        region: &str,
        target: &GeoTarget,
        digest: &Digest,
    ) -> Ship<bool> {
        let node = self.link.pick(region)?;
        let (size, chunks) = match self
            .link
            .call_node(
                region,
                node,
                GeoRequest::FetchBlobIndex {
                    target: target.clone(),
                    digest: digest.clone(),
                },
            )
            .await?
        {
            GeoResponse::BlobIndex { size_bytes, chunks } => {
                // Checked before any chunk is fetched, not only at assembly.
                check_chunk_list(digest, size_bytes, &chunks, self.registry.limits())?;
                (size_bytes, chunks)
            }
            GeoResponse::NotFound(_) => return Ok(false),
            other => return Err(GeoError::failed(format!("blob index answered {other:?}"))),
        };
        let store = self.registry.blob_store().clone();
        let query = chunks.clone();
        let missing: Vec<u32> = self
            .registry
            .blocking(move || {
                let mut m = Vec::new();
                for (i, c) in query.iter().enumerate() {
                    if store
                        .chunk_bytes(&c.hash, c.len_bytes)
                        .map_err(|e| ApiError::Internal(e.to_string()))?
                        .is_none()
                    {
                        m.push(i as u32);
                    }
                }
                Ok(m)
            })
            .await
            .map_err(|e| GeoError::failed(e.to_string()))?;
        let mut batch = Vec::new();
        let mut batch_bytes = 0u64;
        for (n, i) in missing.iter().enumerate() {
            batch_bytes += u64::from(chunks[*i as usize].len_bytes);
            batch.push(*i);
            if batch_bytes >= GEO_BATCH_BYTES_MAX / 2
                || batch.len() == GEO_LIST_MAX
                || n + 1 == missing.len()
            {
                let indices = std::mem::take(&mut batch);
                let data = match self
                    .link
                    .call_node(
                        region,
                        node,
                        GeoRequest::FetchChunks {
                            target: target.clone(),
                            digest: digest.clone(),
                            indices: indices.clone(),
                        },
                    )
                    .await?
                {
                    GeoResponse::ChunkData(d) if d.len() == indices.len() => d,
                    other => {
                        return Err(GeoError::failed(format!(
                            "chunk fetch answered {}",
                            match other {
                                GeoResponse::ChunkData(d) => format!("{} chunks", d.len()),
                                o => format!("{o:?}"),
                            }
                        )))
                    }
                };
                self.read_through_bytes
                    .fetch_add(batch_bytes, Ordering::Relaxed);
                batch_bytes = 0;
                let store = self.registry.blob_store().clone();
                let now = self.registry.now_ms();
                let expected: Vec<ChunkRef> = indices.iter().map(|i| chunks[*i as usize]).collect();
                self.registry
                    .blocking(move || {
                        for (c, bytes) in expected.iter().zip(&data) {
                            store
                                .stage_chunk(&c.hash, bytes, now)
                                .map_err(|e| ApiError::BlobUploadInvalid(e.to_string()))?;
                        }
                        Ok(())
                    })
                    .await
                    .map_err(|e| GeoError::failed(e.to_string()))?;
            }
        }
        self.assemble(target, digest, size, chunks).await?;
        Ok(true)
    }

    // ---- nearest-region routing ----

    /// The URL of the blob in the region a client's network belongs to, when that is another
    /// region and it holds the blob (asked over the link; no answer, no redirect).
    pub async fn redirect_url(
        &self,
        account: AccountId,
        repo: &RepoName,
        digest: &Digest,
        client: std::net::IpAddr,
    ) -> Option<String> {
        // Another account is named by the request's host, which the other region's endpoint
        // cannot carry: its pulls are served here.
        if account != AccountId::DEFAULT {
            return None;
        }
        let region = self.region_of_client(client)?.to_string();
        let target = GeoTarget {
            source_account: account,
            account,
            repo: repo.clone(),
        };
        let held = self
            .link
            .call(&region, || GeoRequest::HasBlob {
                target: target.clone(),
                digest: digest.clone(),
            })
            .await;
        // The node that answered, so the client is sent to one that is up.
        let endpoint = self.link.answering_http(&region)?;
        match held {
            Ok(GeoResponse::Done) => Some(format!("http://{endpoint}/v2/{repo}/blobs/{digest}")),
            _ => None,
        }
    }

    // ---- reporting ----

    /// Replication state per destination, for `/_portolan/v1/replication` and `/metrics`.
    pub fn report(&self) -> Vec<DestReport> {
        let kv = self.registry.kv().clone();
        let last = outbox::last_seq(kv.as_ref()).unwrap_or(0);
        let now = self.registry.now_ms();
        let mut dests: Vec<Destination> =
            outbox::known_destinations(kv.as_ref()).unwrap_or_default();
        for (d, _) in self.all_stats() {
            if !dests.contains(&d) {
                dests.push(d);
            }
        }
        dests
            .into_iter()
            .map(|d| {
                let cursor = outbox::cursor(kv.as_ref(), &d).unwrap_or(0);
                let scanned =
                    outbox::events_after(kv.as_ref(), cursor, REPORT_SCAN_MAX).unwrap_or_default();
                // Past the scan, every later event counts (an upper bound: some may be for
                // other destinations).
                let beyond = if scanned.len() == REPORT_SCAN_MAX {
                    last.saturating_sub(scanned.last().map_or(cursor, |e| e.seq))
                } else {
                    0
                };
                let pending = scanned
                    .into_iter()
                    .filter(|e| e.destinations.contains(&d))
                    .collect::<Vec<_>>();
                // Events are in push order: the first pending one is the oldest.
                let oldest = pending.iter().map(|e| e.at_ms).find(|t| *t > 0);
                let s = self.stats(&d);
                let mut lag: Vec<u64> = s
                    .lag_ms
                    .lock()
                    .expect("stats lock")
                    .iter()
                    .copied()
                    .collect();
                lag.sort_unstable();
                let last_error = s.last_error.lock().expect("stats lock").clone();
                DestReport {
                    events_behind: pending.len() as u64 + beyond,
                    seconds_behind: oldest.map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0),
                    cursor,
                    last_seq: last,
                    failure: outbox::failure(kv.as_ref(), &d).ok().flatten(),
                    last_error,
                    busy: s.busy.load(Ordering::Relaxed),
                    bytes_logical: s.bytes_logical.load(Ordering::Relaxed),
                    bytes_shipped: s.bytes_shipped.load(Ordering::Relaxed),
                    blobs_shipped: s.blobs_shipped.load(Ordering::Relaxed),
                    blobs_present: s.blobs_present.load(Ordering::Relaxed),
                    events_shipped: s.events_shipped.load(Ordering::Relaxed),
                    lag_ms_p50: quantile(&lag, 0.5),
                    lag_ms_p99: quantile(&lag, 0.99),
                    lag_samples: lag.len(),
                    region: d.region.clone(),
                    account: d.account.to_string(),
                    destination: d,
                }
            })
            .collect()
    }
}

impl<P: Platform> crate::registry::ReadThrough for Georep<P> {
    fn manifest<'a>(
        &'a self,
        account: AccountId,
        repo: &'a RepoName,
        reference: &'a Reference,
    ) -> futures_util::future::BoxFuture<'a, Option<Manifest>> {
        Box::pin(self.read_manifest(account, repo, reference))
    }

    fn blob<'a>(
        &'a self,
        account: AccountId,
        repo: &'a RepoName,
        digest: &'a Digest,
    ) -> futures_util::future::BoxFuture<'a, Result<bool, ApiError>> {
        Box::pin(self.read_blob(account, repo, digest))
    }

    fn redirect<'a>(
        &'a self,
        account: AccountId,
        repo: &'a RepoName,
        digest: &'a Digest,
        client: std::net::IpAddr,
    ) -> futures_util::future::BoxFuture<'a, Option<String>> {
        Box::pin(self.redirect_url(account, repo, digest, client))
    }
}

/// Items an inventory lists at most (a larger one says it is truncated).
pub const INVENTORY_ITEMS_MAX: usize = 20_000;

/// One image the rules send to a region: where it lands there, what it needs, its tags.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InventoryItem {
    /// The account it lands in, in the destination region.
    pub account: AccountId,
    pub repo: RepoName,
    pub digest: Digest,
    pub media_type: String,
    pub manifest_bytes: u64,
    pub blobs: Vec<(Digest, u64)>,
    pub tags: Vec<(engine::Tag, Option<engine::origin::Stamp>)>,
    pub pushed_ms: u64,
}

/// What a region holds of an inventory.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub items: u64,
    pub ok: u64,
    /// Images missing, or missing a blob, or holding a blob whose bytes do not verify.
    pub lost: Vec<String>,
    /// Tags missing there, or pointing elsewhere with an older stamp (a newer one there is
    /// not a loss).
    pub stale_tags: Vec<String>,
    /// Bytes of the images listed in `lost`.
    pub lost_bytes: u64,
    /// The oldest push among the lost images (Unix ms), for the recovery point.
    pub oldest_lost_ms: Option<u64>,
}

impl<P: Platform> Georep<P> {
    /// Every image this region's rules send to `region`, with blobs and stamped tags.
    pub fn inventory(&self, region: &str) -> Result<(Vec<InventoryItem>, bool), ApiError> {
        let kv = self.registry.kv().clone();
        let st = State::new(kv.as_ref());
        let e = |e: engine::state::StateError| ApiError::Internal(e.to_string());
        let mut out = Vec::new();
        let mut after: Option<(AccountId, RepoName)> = None;
        loop {
            let repos = st
                .repos_after(after.as_ref().map(|(a, r)| (*a, r)), 256)
                .map_err(e)?;
            let Some(last) = repos.last().cloned() else {
                break;
            };
            for (acct, repo) in &repos {
                let dests: Vec<Destination> = outbox::destinations(kv.as_ref(), *acct, repo)
                    .map_err(e)?
                    .into_iter()
                    .filter(|d| d.region == region)
                    .collect();
                if dests.is_empty() {
                    continue;
                }
                let mut tags: BTreeMap<Digest, Vec<(engine::Tag, Option<engine::origin::Stamp>)>> =
                    BTreeMap::new();
                let mut tag_after: Option<String> = None;
                loop {
                    let page = st
                        .tag_records(*acct, repo, tag_after.as_deref(), 1024)
                        .map_err(e)?;
                    for (name, rec) in &page {
                        if let Ok(tag) = engine::Tag::parse(name) {
                            let stamp = engine::origin::current(kv.as_ref(), *acct, repo, &tag)
                                .map_err(e)?
                                .map(|o| o.stamp);
                            tags.entry(rec.digest.clone())
                                .or_default()
                                .push((tag, stamp));
                        }
                    }
                    match page.last() {
                        Some((n, _)) if page.len() == 1024 => tag_after = Some(n.clone()),
                        _ => break,
                    }
                }
                let mut m_after: Option<String> = None;
                loop {
                    let page = st
                        .manifests_page(*acct, repo, m_after.as_deref(), 256)
                        .map_err(e)?;
                    for (d, m) in &page {
                        let Ok(digest) = Digest::parse(d) else {
                            continue;
                        };
                        let mut blobs = Vec::new();
                        if let Ok(parsed) = manifest::parse(&m.bytes, &m.media_type, u64::MAX) {
                            for b in parsed.required_blobs() {
                                if let Some(rec) = st.blob(b).map_err(e)? {
                                    blobs.push((b.clone(), rec.size_bytes));
                                }
                            }
                        }
                        for dest in &dests {
                            if out.len() >= INVENTORY_ITEMS_MAX {
                                return Ok((out, true));
                            }
                            out.push(InventoryItem {
                                account: dest.account,
                                repo: repo.clone(),
                                digest: digest.clone(),
                                media_type: m.media_type.clone(),
                                manifest_bytes: m.bytes.len() as u64,
                                blobs: blobs.clone(),
                                tags: tags.get(&digest).cloned().unwrap_or_default(),
                                pushed_ms: m.pushed_ms,
                            });
                        }
                    }
                    match page.last() {
                        Some((n, _)) if page.len() == 256 => m_after = Some(n.clone()),
                        _ => break,
                    }
                }
            }
            if repos.len() < 256 {
                break;
            }
            after = Some(last);
        }
        Ok((out, false))
    }

    /// Checks that this region holds every item: manifest, tags (or newer ones), and blobs
    /// whose bytes verify against their digests.
    pub async fn verify(&self, items: &[InventoryItem]) -> Result<VerifyReport, ApiError> {
        let kv = self.registry.kv().clone();
        let e = |e: engine::state::StateError| ApiError::Internal(e.to_string());
        let mut report = VerifyReport {
            items: items.len() as u64,
            ..VerifyReport::default()
        };
        // Each blob's bytes are read and hashed once, however many images share it.
        let mut checked: HashMap<Digest, Result<(), String>> = HashMap::new();
        for item in items {
            let st = State::new(kv.as_ref());
            let name = format!("{}/{}@{}", item.account, item.repo, item.digest);
            let mut problem = None;
            if st
                .manifest(item.account, &item.repo, &item.digest)
                .map_err(e)?
                .is_none()
            {
                problem = Some(format!("{name}: manifest missing"));
            }
            for (b, size) in &item.blobs {
                if problem.is_some() {
                    break;
                }
                if st
                    .blob_link(item.account, &item.repo, b)
                    .map_err(e)?
                    .is_none()
                {
                    problem = Some(format!("{name}: blob {b} missing"));
                    break;
                }
                if !checked.contains_key(b) {
                    // This node's copy first: one that does not verify is a finding of its
                    // own (the node then quarantines it and would fetch another).
                    let local = self.registry.local_copy(b).await;
                    let read = match local {
                        Ok(crate::registry::LocalCopy::Intact(bytes)) => Ok(bytes),
                        Ok(crate::registry::LocalCopy::Corrupt) => Ok(Bytes::new()),
                        Ok(crate::registry::LocalCopy::Absent) => {
                            self.registry.ensure_local(b).await
                        }
                        Err(err) => Err(err),
                    };
                    let verdict = match read {
                        Ok(bytes)
                            if bytes.len() as u64 == *size
                                && Digest::of(b.algorithm(), &bytes) == *b =>
                        {
                            Ok(())
                        }
                        Ok(_) => Err("does not verify".to_string()),
                        Err(err) => Err(format!("unreadable: {err}")),
                    };
                    checked.insert(b.clone(), verdict);
                }
                if let Some(Err(why)) = checked.get(b) {
                    problem = Some(format!("{name}: blob {b} {why}"));
                }
            }
            for (tag, stamp) in &item.tags {
                let here = st.tag(item.account, &item.repo, tag).map_err(e)?;
                if here.as_ref().is_some_and(|t| t.digest == item.digest) {
                    continue;
                }
                let here_stamp =
                    engine::origin::current(kv.as_ref(), item.account, &item.repo, tag)
                        .map_err(e)?
                        .map(|o| o.stamp);
                let newer_here = match (here_stamp, stamp) {
                    (Some(h), Some(s)) => h > *s,
                    _ => false,
                };
                if !newer_here {
                    report
                        .stale_tags
                        .push(format!("{}/{}:{tag}", item.account, item.repo));
                }
            }
            match problem {
                Some(p) => {
                    report.lost_bytes +=
                        item.manifest_bytes + item.blobs.iter().map(|(_, s)| s).sum::<u64>();
                    report.oldest_lost_ms = Some(
                        report
                            .oldest_lost_ms
                            .map_or(item.pushed_ms, |o| o.min(item.pushed_ms)),
                    );
                    report.lost.push(p);
                }
                None => report.ok += 1,
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
impl GeoRequest {
    /// The same changes, applied to `target` (tests).
    fn with_target(self, target: GeoTarget) -> GeoRequest {
        match self {
            GeoRequest::Apply { items } => GeoRequest::Apply {
                items: items
                    .into_iter()
                    .map(|(_, c)| (target.clone(), c))
                    .collect(),
            },
            other => other,
        }
    }
}

/// One destination's replication state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DestReport {
    #[serde(skip)]
    pub destination: Destination,
    /// The destination region and account (`registryId`).
    pub region: String,
    pub account: String,
    pub cursor: u64,
    pub last_seq: u64,
    pub events_behind: u64,
    pub seconds_behind: f64,
    pub failure: Option<String>,
    pub last_error: Option<String>,
    pub busy: bool,
    pub bytes_logical: u64,
    pub bytes_shipped: u64,
    pub blobs_shipped: u64,
    pub blobs_present: u64,
    pub events_shipped: u64,
    /// Push-to-applied-there lag of the recent events (ms): median, 99th percentile, count.
    pub lag_ms_p50: Option<u64>,
    pub lag_ms_p99: Option<u64>,
    pub lag_samples: usize,
}

/// The `q` quantile (0..=1) of `sorted` samples, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

/// A blob of `size_bytes` from `chunks`: within this region's blob limit, lengths adding up.
fn check_chunk_list(
    digest: &Digest,
    size_bytes: u64,
    chunks: &[ChunkRef],
    limits: &engine::Limits,
) -> Ship<()> {
    if size_bytes > limits.blob_bytes_max {
        return Err(GeoError::failed(format!(
            "blob of {size_bytes} bytes is over this region's limit of {}",
            limits.blob_bytes_max
        )));
    }
    let sum: u64 = chunks.iter().map(|c| u64::from(c.len_bytes)).sum();
    if sum != size_bytes {
        return Err(GeoError::failed(format!(
            "chunks of {digest} add up to {sum} bytes, not {size_bytes}"
        )));
    }
    Ok(())
}

/// Where each chunk lies in its blob, in order.
fn chunk_ranges(chunks: &[ChunkRef]) -> Vec<std::ops::Range<usize>> {
    let mut at = 0usize;
    chunks
        .iter()
        .map(|c| {
            let r = at..at + c.len_bytes as usize;
            at = r.end;
            r
        })
        .collect()
}

/// Chunk `i` of a blob's bytes (an index past the list, or past the bytes, is an error).
fn chunk_of<'a>(
    bytes: &'a [u8],
    ranges: &[std::ops::Range<usize>],
    i: usize,
    digest: &Digest,
) -> Ship<&'a [u8]> {
    ranges
        .get(i)
        .and_then(|r| bytes.get(r.clone()))
        .ok_or_else(|| GeoError::failed(format!("{digest} has no chunk {i}")))
}

fn bounded(n: usize, what: &str) -> Ship<()> {
    if n > GEO_LIST_MAX {
        Err(GeoError::failed(format!(
            "{n} {what} in one message; the bound is {GEO_LIST_MAX}"
        )))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Production;
    use crate::transport::quic::{NodeTls, QuicTransport};
    use engine::origin::Stamp;

    /// A single-node region "east" with cross-region replication, for driving its receiving
    /// side directly with what another region might send.
    async fn east() -> (tempfile::TempDir, Arc<Georep<Production>>) {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(engine::kv::RocksKv::open(&dir.path().join("meta")).unwrap());
        let blobs = engine::blob_store::BlobStore::open(&dir.path().join("store")).unwrap();
        let config = crate::Config::default();
        let raft = crate::raft::Raft::new(
            1,
            crate::server::raft_config(&config).unwrap(),
            crate::raft::network::LocalNetwork,
            crate::raft::log_store::LogStore::new(kv.clone()),
            crate::raft::state_machine::StateMachine::new(kv.clone(), "east"),
        )
        .await
        .unwrap();
        let info = NodeInfo {
            http: "127.0.0.1:1".into(),
            quic: "127.0.0.1:2".into(),
        };
        raft.initialize(BTreeMap::from([(1, info)])).await.unwrap();
        raft.wait(Some(Duration::from_secs(10)))
            .metrics(|m| m.current_leader == Some(1), "leader")
            .await
            .unwrap();
        let registry = Arc::new(NodeRegistry::<Production>::new(
            1,
            raft,
            kv,
            blobs,
            Arc::new(crate::clock::SystemClock),
            config.limits.clone(),
            None,
            Duration::from_secs(10),
        ));
        let certs = dir.path().join("certs");
        crate::cluster::certs::init(&certs, "east", &[1]).unwrap();
        let tls = NodeTls::load(&certs, 1, &[]).unwrap();
        let peer = Arc::new(crate::peer::NodePeer::<Production>::new(
            Duration::from_secs(1),
        ));
        let t = QuicTransport::start("127.0.0.1:0".parse().unwrap(), &tls, peer).unwrap();
        let g = Georep::new(
            registry,
            GeoLink::new(t, Vec::new(), 0),
            "east",
            &ReplicationSection::default(),
        );
        (dir, g)
    }

    fn target(source: &str, account: &str) -> GeoTarget {
        GeoTarget {
            source_account: AccountId::parse(source).unwrap(),
            account: AccountId::parse(account).unwrap(),
            repo: RepoName::parse("team/app").unwrap(),
        }
    }

    const SAME: &str = "000000000000";
    const OTHER: &str = "111122223333";

    fn failed(r: &GeoResponse, what: &str) {
        assert!(matches!(r, GeoResponse::Failed(_)), "{what}: {r:?}");
    }

    /// A worker whose Raft core has stopped (as a storage error stops it) ends instead of
    /// spinning on a closed metrics channel with the last metrics still saying "leader".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_stops_when_its_raft_core_stops() {
        let (_dir, g) = east().await;
        assert!(g.registry.is_leader());
        g.registry.raft().shutdown().await.unwrap();
        assert!(g.registry.raft_stopped());
        assert!(!g.registry.is_leader(), "a stopped core does not lead");
        assert!(
            !g.registry
                .wait_for_next_apply(Duration::from_secs(30))
                .await,
            "waiting on a stopped core returns at once, saying so"
        );
        let dest = Destination {
            region: "west".into(),
            account: AccountId::DEFAULT,
        };
        let worker = crate::rt::spawn(g.clone().worker(dest));
        tokio::time::timeout(Duration::from_secs(10), worker)
            .await
            .expect("the worker ended")
            .unwrap();
    }

    /// What another region sends is validated: bounds, digests, sizes, stamps, account
    /// policies and rules; nothing is committed from a bad message, and a good shipment
    /// applies, twice without harm.
    #[tokio::test]
    async fn the_receiving_side_refuses_what_does_not_verify() {
        let (_dir, g) = east().await;
        let t = target(SAME, SAME);
        // Lists past the bound.
        let d0 = Digest::sha256_of(b"x");
        let r = g
            .serve(
                "west",
                GeoRequest::Offer {
                    target: t.clone(),
                    blobs: vec![(d0.clone(), 1); GEO_LIST_MAX + 1],
                },
            )
            .await;
        failed(&r, "oversized offer");
        let r = g
            .serve(
                "west",
                GeoRequest::Chunks {
                    chunks: vec![vec![0u8; 4 * 1024 * 1024]; 5],
                },
            )
            .await;
        failed(&r, "chunk batch over GEO_BATCH_BYTES_MAX");
        // A blob assembled from chunks it was not sent, or whose sizes do not add up, or
        // whose bytes are not the digest: refused, nothing committed.
        let layer: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let ld = Digest::sha256_of(&layer);
        let chunks = engine::chunker::chunk_all(&layer);
        let r = g
            .serve(
                "west",
                GeoRequest::Assemble {
                    target: t.clone(),
                    digest: ld.clone(),
                    size_bytes: layer.len() as u64,
                    chunks: chunks.clone(),
                    data: vec![],
                },
            )
            .await;
        failed(&r, "assemble before the chunks came");
        let r = g
            .serve(
                "west",
                GeoRequest::Chunks {
                    chunks: vec![layer.clone()],
                },
            )
            .await;
        assert!(matches!(r, GeoResponse::Done), "{r:?}");
        let r = g
            .serve(
                "west",
                GeoRequest::Assemble {
                    target: t.clone(),
                    digest: ld.clone(),
                    size_bytes: layer.len() as u64 + 1,
                    chunks: chunks.clone(),
                    data: vec![],
                },
            )
            .await;
        failed(&r, "sizes that do not add up");
        let r = g
            .serve(
                "west",
                GeoRequest::Assemble {
                    target: t.clone(),
                    digest: Digest::sha256_of(b"something else"),
                    size_bytes: layer.len() as u64,
                    chunks: chunks.clone(),
                    data: vec![],
                },
            )
            .await;
        failed(&r, "bytes that are not the digest");
        assert!(g.state().blob(&ld).unwrap().is_none());
        // The right one commits.
        let r = g
            .serve(
                "west",
                GeoRequest::Assemble {
                    target: t.clone(),
                    digest: ld.clone(),
                    size_bytes: layer.len() as u64,
                    chunks,
                    data: vec![],
                },
            )
            .await;
        assert!(matches!(r, GeoResponse::Done), "{r:?}");
        // An offer of a blob it has, at another size: refused.
        let r = g
            .serve(
                "west",
                GeoRequest::Offer {
                    target: t.clone(),
                    blobs: vec![(ld.clone(), 5)],
                },
            )
            .await;
        failed(&r, "offer with a wrong size");
        // The config, then the manifest with its tag.
        let config = b"{}".to_vec();
        let cd = Digest::sha256_of(&config);
        g.serve(
            "west",
            GeoRequest::Chunks {
                chunks: vec![config.clone()],
            },
        )
        .await;
        let r = g
            .serve(
                "west",
                GeoRequest::Assemble {
                    target: t.clone(),
                    digest: cd.clone(),
                    size_bytes: 2,
                    chunks: engine::chunker::chunk_all(&config),
                    data: vec![],
                },
            )
            .await;
        assert!(matches!(r, GeoResponse::Done), "{r:?}");
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{}}}]}}"#,
            layer.len()
        )
        .into_bytes();
        let md = Digest::sha256_of(&manifest);
        let tag = engine::Tag::parse("v1").unwrap();
        let put =
            |digest: Digest, tag: Option<engine::Tag>, stamp: Option<Stamp>| GeoRequest::Apply {
                items: vec![(
                    t.clone(),
                    GeoChange::ManifestPut {
                        digest,
                        media_type: engine::media::OCI_MANIFEST.into(),
                        bytes: manifest.clone(),
                        tag,
                        stamp,
                    },
                )],
            };
        let west = |hlc| Stamp {
            hlc,
            region: "west".into(),
        };
        failed(
            &g.serve("west", put(Digest::sha256_of(b"not it"), None, None))
                .await,
            "manifest bytes that are not the digest",
        );
        failed(
            &g.serve("west", put(md.clone(), Some(tag.clone()), None))
                .await,
            "a tag move without a stamp",
        );
        failed(
            &g.serve(
                "west",
                put(
                    md.clone(),
                    Some(tag.clone()),
                    Some(Stamp {
                        hlc: 5,
                        region: "east".into(),
                    }),
                ),
            )
            .await,
            "a stamp of another region",
        );
        for _ in 0..2 {
            let r = g
                .serve(
                    "west",
                    put(md.clone(), Some(tag.clone()), Some(west(1 << 20))),
                )
                .await;
            assert!(matches!(r, GeoResponse::Done), "{r:?}");
        }
        let st = g.state();
        let repo = RepoName::parse("team/app").unwrap();
        assert_eq!(
            st.tag(AccountId::DEFAULT, &repo, &tag)
                .unwrap()
                .unwrap()
                .digest,
            md
        );
        // Another account: refused without the destination account's registry policy (and
        // without the account itself).
        let r = g
            .serve(
                "west",
                put(md.clone(), None, None).with_target(target(OTHER, SAME)),
            )
            .await;
        assert!(
            matches!(r, GeoResponse::Denied(ref m) if m.contains("registry policy")),
            "{r:?}"
        );
        let r = g
            .serve(
                "west",
                GeoRequest::Offer {
                    target: target(SAME, OTHER),
                    blobs: vec![],
                },
            )
            .await;
        assert!(
            matches!(r, GeoResponse::Denied(ref m) if m.contains("does not exist")),
            "{r:?}"
        );
        // Read-through needs a rule of this region that sends the repository to the asker.
        let r = g
            .serve(
                "west",
                GeoRequest::FetchManifest {
                    target: t.clone(),
                    reference: "v1".into(),
                },
            )
            .await;
        assert!(matches!(r, GeoResponse::Denied(_)), "{r:?}");
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), Some(50));
        assert_eq!(quantile(&v, 0.99), Some(99));
        assert_eq!(quantile(&[7], 0.99), Some(7));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn cidrs_match_by_prefix() {
        let net = parse_cidr("10.1.0.0/16").unwrap();
        assert!(in_cidr("10.1.200.3".parse().unwrap(), net));
        assert!(!in_cidr("10.2.0.1".parse().unwrap(), net));
        assert!(in_cidr(
            "127.0.0.2".parse().unwrap(),
            parse_cidr("127.0.0.2/32").unwrap()
        ));
        assert!(in_cidr(
            "1.2.3.4".parse().unwrap(),
            parse_cidr("0.0.0.0/0").unwrap()
        ));
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("nonsense").is_none());
    }
}
