//! The nemesis: faults injected during the safety phase, each undone after a while.
//!
//! Every fault is drawn from the seeded RNG; every fault checks that the safety phase is
//! still on before it strikes, so the liveness phase starts from a healed cluster.
//!
//! Owns: the fault kinds and their schedules, the bound that keeps storage faults within what
//! the promises survive, and the checks a fault makes on the spot (a node must not start on a
//! corrupt metadata store; a damaged blob copy must never be served).
//! Never: heals a storage fault by hand — a lost or damaged copy comes back only through the
//! node's own repair (holdings check, verified reads, the leader's repair worker).
//!
//! ## Storage faults and the minority bound
//! Promise 1 holds against the loss of any minority of a region's copies. Crashes, power
//! loss, failing or full disks and torn unsynced metadata tails lose nothing that was synced
//! (an fsynced blob, a synced metadata batch), so they do not count against the bound: they
//! make copies unreachable for a while, which may fail requests but never loses what was
//! acknowledged. What counts is a copy lost or damaged, or out of reach for long:
//! - `BlobVolumeLost`: every blob copy of one node;
//! - `BlobBitFlip`, `BlobTruncated`: one copy of one blob on one node;
//! - `MetadataCorrupted`: everything one node stored (it is rebuilt from scratch);
//! - `MembershipChange`: the copies of a member removed from the region (not counted by the
//!   region while it is out).
//!
//! Each of these takes its region's slot (`Sim::copies_affected`) before it strikes and gives
//! it back only once the node it struck holds again, whole, every blob the region records it
//! as holding (for `MembershipChange`: once the node is a voter again). So at most one node
//! per region has copies lost or out of reach at any time: with R = 3 copies and a write
//! quorum of 2, every acknowledged blob keeps an intact copy on another recorded holder, and
//! the region's repair can restore the rest. A fault whose node is not repaired before the
//! safety phase ends keeps its slot: no further copy loss in that region for the run.
//! Raft state is never lost by these faults except whole, with the node removed from its
//! group first (a node that forgot its vote must not vote in the terms it voted in).

use std::sync::Arc;
use std::time::Duration;

use node::raft::NodeId;
use node::rt;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::net::NetFaults;
use crate::Sim;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// One node's process dies (unsynced writes lost, some batches torn in) and restarts.
    NodeCrash,
    /// Every node of a region loses power at once, and comes back later.
    RegionPowerLoss,
    /// The leader is cut off from the rest of its region (and keeps believing it leads).
    IsolateLeader,
    /// A region split in two sides that cannot talk.
    Partition,
    /// A node can send but not receive.
    OneWayPartition,
    /// Two regions cannot reach each other.
    RegionPartition,
    /// Links of a random subset of nodes cut one by one, restored in another order.
    Swizzle,
    /// Message loss, duplication and reordering jitter across the network.
    LossyNetwork,
    /// A node's disk fails (full, or fsync errors): writes fail, then the node restarts.
    DiskFailure,
    /// A node's wall clock jumps.
    ClockSkew,
    /// A node's disk turns slow (fsyncs and blob I/O take milliseconds).
    SlowDisk,
    /// A follower is removed from its region, then added back (learner, catch-up, voter).
    MembershipChange,
    /// A node's blob volume is replaced by an empty one: the node crashes and restarts on it.
    /// Half the time the region's other blob volumes are full first (blob writes fail,
    /// metadata writes work) and the volume is lost as that window ends: what was
    /// acknowledged while only this node could take blobs must have been refused.
    BlobVolumeLost,
    /// One bit of one stored blob flips on one node.
    BlobBitFlip,
    /// A stored blob on one node loses its tail.
    BlobTruncated,
    /// A node crashes while its next unsynced metadata batch is half written: the store finds
    /// the torn record by its checksum at open and drops it and what follows.
    MetadataTornTail,
    /// A synced record of a node's metadata store is damaged: the node refuses to start and
    /// is replaced (removed from its region, wiped, added back empty), recovering from peers.
    MetadataCorrupted,
}

/// How hard the nemesis hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Intensity {
    None,
    Light,
    Heavy,
}

impl Intensity {
    fn kinds(self, regions: usize) -> Vec<FaultKind> {
        use FaultKind::*;
        let mut k = match self {
            Intensity::None => vec![],
            Intensity::Light => vec![NodeCrash, Partition, LossyNetwork, ClockSkew],
            Intensity::Heavy => vec![
                NodeCrash,
                NodeCrash,
                RegionPowerLoss,
                IsolateLeader,
                IsolateLeader,
                IsolateLeader,
                Partition,
                OneWayPartition,
                Swizzle,
                LossyNetwork,
                DiskFailure,
                ClockSkew,
                SlowDisk,
                MembershipChange,
                BlobVolumeLost,
                BlobVolumeLost,
                BlobBitFlip,
                BlobTruncated,
                MetadataTornTail,
                MetadataCorrupted,
            ],
        };
        if regions > 1 && self != Intensity::None {
            k.push(RegionPartition);
        }
        k
    }

    /// Pause between two faults, milliseconds.
    fn gap_ms(self) -> std::ops::Range<u64> {
        match self {
            Intensity::Heavy => 300..3_000,
            _ => 2_000..8_000,
        }
    }
}

fn ms(range: std::ops::Range<u64>) -> Duration {
    Duration::from_millis(rt::with_rng(|r| r.gen_range(range)))
}

fn pick<T: Clone>(v: &[T]) -> Option<T> {
    rt::with_rng(|r| v.choose(r).cloned())
}

/// Runs faults until the safety phase ends.
pub async fn nemesis(sim: Arc<Sim>, intensity: Intensity) {
    let kinds = intensity.kinds(sim.cluster.regions.len());
    if kinds.is_empty() {
        return;
    }
    loop {
        tokio::time::sleep(ms(intensity.gap_ms())).await;
        if !sim.faults_on() {
            return;
        }
        let kind = pick(&kinds).expect("kinds is not empty");
        let s = sim.clone();
        // Each fault runs (and heals) on its own, so faults overlap.
        s.faults_active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            strike(s.clone(), kind).await;
            s.faults_active
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
}

async fn strike(sim: Arc<Sim>, kind: FaultKind) {
    let c = &sim.cluster;
    let region = rt::with_rng(|r| r.gen_range(0..c.regions.len()));
    let members = c.regions[region].clone();
    let Some(victim) = pick(&members) else {
        return;
    };
    match kind {
        FaultKind::NodeCrash => {
            if !c.is_up(victim) {
                return;
            }
            sim.count_fault(kind);
            crash(&sim, victim);
            tokio::time::sleep(ms(100..5_000)).await;
            restart(&sim, victim).await;
        }
        FaultKind::RegionPowerLoss => {
            sim.count_fault(kind);
            sim.trace(format!("nemesis: region {region} loses power"));
            for id in &members {
                crash(&sim, *id);
            }
            tokio::time::sleep(ms(1_000..10_000)).await;
            for id in &members {
                restart(&sim, *id).await;
                tokio::time::sleep(ms(0..500)).await;
            }
        }
        FaultKind::IsolateLeader => {
            let Some(leader) = c.agreed_leader(region) else {
                return;
            };
            sim.count_fault(kind);
            let others: Vec<NodeId> = members.iter().copied().filter(|m| *m != leader).collect();
            sim.trace(format!(
                "nemesis: leader {leader} of region {region} isolated"
            ));
            for o in &others {
                c.net.cut(leader, *o);
                c.net.cut(*o, leader);
            }
            tokio::time::sleep(ms(2_000..10_000)).await;
            for o in &others {
                c.net.restore(leader, *o);
                c.net.restore(*o, leader);
            }
            sim.trace(format!("nemesis: leader {leader} reconnected"));
        }
        FaultKind::Partition => {
            let mut side = members.clone();
            rt::with_rng(|r| side.shuffle(r));
            let cut_at = rt::with_rng(|r| r.gen_range(1..side.len().max(2)));
            let (a, b) = side.split_at(cut_at.min(side.len()));
            if a.is_empty() || b.is_empty() {
                return;
            }
            sim.count_fault(kind);
            sim.trace(format!("nemesis: partition {a:?} | {b:?}"));
            cut_between(&sim, a, b, true);
            tokio::time::sleep(ms(1_000..10_000)).await;
            cut_between(&sim, a, b, false);
            sim.trace(format!("nemesis: partition {a:?} | {b:?} healed"));
        }
        FaultKind::OneWayPartition => {
            sim.count_fault(kind);
            sim.trace(format!("nemesis: node {victim} can send but not receive"));
            for o in members.iter().filter(|m| **m != victim) {
                c.net.cut(*o, victim);
            }
            tokio::time::sleep(ms(1_000..8_000)).await;
            for o in members.iter().filter(|m| **m != victim) {
                c.net.restore(*o, victim);
            }
        }
        FaultKind::RegionPartition => {
            let other = (region + 1) % c.regions.len();
            if other == region {
                return;
            }
            sim.count_fault(kind);
            let b = c.regions[other].clone();
            sim.trace(format!("nemesis: regions {region} and {other} partitioned"));
            cut_between(&sim, &members, &b, true);
            tokio::time::sleep(ms(2_000..15_000)).await;
            cut_between(&sim, &members, &b, false);
        }
        FaultKind::Swizzle => {
            let mut subset = members.clone();
            rt::with_rng(|r| subset.shuffle(r));
            let k = rt::with_rng(|r| r.gen_range(1..=subset.len()));
            subset.truncate(k);
            sim.count_fault(kind);
            sim.trace(format!("nemesis: swizzle-clogging {subset:?}"));
            for id in &subset {
                if !sim.faults_on() {
                    break;
                }
                isolate(&sim, *id, &members, true);
                tokio::time::sleep(ms(100..800)).await;
            }
            tokio::time::sleep(ms(500..3_000)).await;
            rt::with_rng(|r| subset.shuffle(r));
            for id in &subset {
                isolate(&sim, *id, &members, false);
                tokio::time::sleep(ms(100..800)).await;
            }
        }
        FaultKind::LossyNetwork => {
            sim.count_fault(kind);
            let f = rt::with_rng(|r| NetFaults {
                loss: r.gen_range(0.01..0.10),
                duplicate: r.gen_range(0.01..0.10),
                jitter_us: r.gen_range(1_000..50_000),
            });
            sim.trace(format!("nemesis: lossy network {f:?}"));
            c.net.set_faults(f);
            tokio::time::sleep(ms(1_000..10_000)).await;
            c.net.set_faults(NetFaults::default());
        }
        FaultKind::DiskFailure => {
            if !c.is_up(victim) {
                return;
            }
            sim.count_fault(kind);
            sim.trace(format!("nemesis: disk of node {victim} fails"));
            let (kv, blobs) = {
                let g = c.lock();
                (g[&victim].kv.clone(), g[&victim].blobs.clone())
            };
            kv.set_failing(Some("no space left on device".into()));
            blobs.set_failing(Some("fsync failed: EIO".into()));
            tokio::time::sleep(ms(500..5_000)).await;
            kv.set_failing(None);
            blobs.set_failing(None);
            // After a failed fsync the process restarts: what it wrote is not trusted.
            crash(&sim, victim);
            restart(&sim, victim).await;
        }
        FaultKind::SlowDisk => {
            sim.count_fault(kind);
            let (kv, blobs) = {
                let g = c.lock();
                (g[&victim].kv.clone(), g[&victim].blobs.clone())
            };
            let (sync, io) = rt::with_rng(|r| (r.gen_range(5..100), r.gen_range(1..50)));
            sim.trace(format!(
                "nemesis: disk of node {victim} slow ({sync} ms per fsync, {io} ms per blob call)"
            ));
            kv.set_sync_latency(Duration::from_millis(sync));
            blobs.set_latency(Duration::from_millis(io));
            tokio::time::sleep(ms(2_000..10_000)).await;
            kv.set_sync_latency(Duration::ZERO);
            blobs.set_latency(Duration::ZERO);
        }
        FaultKind::MembershipChange => {
            let Some(leader) = c.self_declared_leader(region) else {
                return;
            };
            // One member out at a time per region: the region keeps a majority of its size.
            if members.len() < 3 || voters(&sim, leader).len() < members.len() {
                return;
            }
            let others: Vec<NodeId> = members.iter().copied().filter(|m| *m != leader).collect();
            let Some(target) = pick(&others) else {
                return;
            };
            // A removed member's copies are out of reach: this counts against the bound.
            if !take_slot(&sim, region) {
                return;
            }
            sim.count_fault(kind);
            sim.trace(format!(
                "nemesis: removing node {target} from region {region}"
            ));
            match change_membership(&sim, leader, target, false).await {
                Ok(()) => sim.trace(format!("nemesis: node {target} removed")),
                Err(e) => sim.trace(format!("nemesis: removing node {target} failed: {e}")),
            }
            tokio::time::sleep(ms(1_000..8_000)).await;
            if readd_removed(&sim, region, 10).await {
                release_slot(&sim, region);
            }
        }
        FaultKind::BlobVolumeLost => blob_volume_lost(&sim, region, victim).await,
        FaultKind::BlobBitFlip | FaultKind::BlobTruncated => {
            damage_blob(&sim, kind, region, victim).await
        }
        FaultKind::MetadataTornTail => {
            if !c.is_up(victim) {
                return;
            }
            let kept = rt::with_rng(|r| r.gen_range(0..3));
            let torn = c.crash_tearing(victim, kept);
            if torn {
                sim.count_fault(kind);
            }
            sim.trace(format!(
                "nemesis: node {victim} crashed{}",
                if torn {
                    " with a metadata batch half written"
                } else {
                    ""
                }
            ));
            tokio::time::sleep(ms(100..5_000)).await;
            restart(&sim, victim).await;
        }
        FaultKind::MetadataCorrupted => metadata_corrupted(&sim, region, victim).await,
        FaultKind::ClockSkew => {
            sim.count_fault(kind);
            let skew = rt::with_rng(|r| r.gen_range(-300_000..300_000));
            sim.trace(format!(
                "nemesis: clock of node {victim} skewed by {skew} ms"
            ));
            c.lock()[&victim].clock.set_skew_ms(skew);
        }
    }
}

fn cut_between(sim: &Sim, a: &[NodeId], b: &[NodeId], cut: bool) {
    for x in a {
        for y in b {
            if cut {
                sim.cluster.net.cut(*x, *y);
                sim.cluster.net.cut(*y, *x);
            } else {
                sim.cluster.net.restore(*x, *y);
                sim.cluster.net.restore(*y, *x);
            }
        }
    }
}

fn isolate(sim: &Sim, id: NodeId, members: &[NodeId], cut: bool) {
    let others: Vec<NodeId> = members.iter().copied().filter(|m| *m != id).collect();
    cut_between(sim, &[id], &others, cut);
}

/// Crashes a node, keeping a random number of its unsynced metadata batches.
pub fn crash(sim: &Sim, id: NodeId) {
    if !sim.cluster.is_up(id) {
        return;
    }
    let kept = rt::with_rng(|r| r.gen_range(0..4));
    sim.cluster.crash(id, kept);
    sim.trace(format!("nemesis: node {id} crashed"));
}

/// Restarts a node. A node whose disk works must start; one whose disk the nemesis is
/// failing may refuse to, and stays down until that fault ends and restarts it; one whose
/// metadata store is corrupt must refuse to, and stays down until it is replaced.
pub async fn restart(sim: &Sim, id: NodeId) {
    match sim.cluster.start(id).await {
        Ok(()) => sim.trace(format!("node {id} restarted")),
        Err(e) if sim.cluster.disk_failing(id) => {
            sim.trace(format!("node {id} did not start on its failing disk: {e}"))
        }
        Err(e) if sim.cluster.kv_corrupt(id) => sim.trace(format!(
            "node {id} refuses to start on its corrupt metadata store: {e}"
        )),
        Err(e) => sim.violation(format!("node {id} failed to restart: {e}")),
    }
}

/// Takes `region`'s slot for a fault that affects copies; false if another fault holds it.
fn take_slot(sim: &Sim, region: usize) -> bool {
    sim.copies_affected
        .lock()
        .expect("copies lock")
        .insert(region)
}

fn release_slot(sim: &Sim, region: usize) {
    sim.copies_affected
        .lock()
        .expect("copies lock")
        .remove(&region);
}

/// The blobs (digest, size) that `region`'s state records node `id` as holding, read from
/// the member that has applied the most (the records that matter are the newest).
fn recorded_holdings(sim: &Sim, region: usize, id: NodeId) -> Vec<(engine::Digest, u64)> {
    let c = &sim.cluster;
    let Some(source) = c.regions[region]
        .iter()
        .filter_map(|m| {
            let up = c.running(*m)?;
            let applied = up.raft.metrics().borrow().last_applied.map(|l| l.index);
            Some((applied, *m))
        })
        .max()
        .map(|(_, m)| m)
    else {
        return Vec::new();
    };
    let kv = c.lock()[&source].kv.clone();
    let state = engine::state::State::new(kv.as_ref());
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let Ok(batch) = state.blobs_after(cursor.as_ref(), 1024) else {
            return out;
        };
        let full = batch.len() == 1024;
        cursor = batch.last().map(|(d, _)| d.clone());
        out.extend(
            batch
                .into_iter()
                .filter(|(_, rec)| rec.holders.contains(&id))
                .map(|(d, rec)| (d, rec.size_bytes)),
        );
        if !full {
            return out;
        }
    }
}

/// The blobs node `id` is recorded as holding but does not hold whole (`damaged`, if given,
/// must also hash to its digest: a flipped bit keeps the size). `None` while it is down.
fn missing_copies(
    sim: &Sim,
    region: usize,
    id: NodeId,
    damaged: Option<&engine::Digest>,
) -> Option<Vec<engine::Digest>> {
    if !sim.cluster.is_up(id) {
        return None;
    }
    let blobs = sim.cluster.lock()[&id].blobs.clone();
    use engine::blob_store::BlobBackend;
    Some(
        recorded_holdings(sim, region, id)
            .into_iter()
            .filter(|(d, size)| {
                blobs.blob_len(d) != Some(*size) || (Some(d) == damaged && !blobs.holds_intact(d))
            })
            .map(|(d, _)| d)
            .collect(),
    )
}

/// Waits until the node a fault struck is repaired, then gives the region's slot back; keeps
/// it if the safety phase ends first. `damaged` is read through the node each time (reading
/// is what finds a damaged copy that kept its size).
async fn release_when_repaired(
    sim: &Sim,
    region: usize,
    id: NodeId,
    damaged: Option<(&str, &engine::Digest)>,
) {
    let mut missing = None;
    while sim.faults_on() {
        missing = missing_copies(sim, region, id, damaged.map(|(_, d)| d));
        if missing.as_ref().is_some_and(|m| m.is_empty()) {
            sim.trace(format!(
                "nemesis: node {id} holds every blob it is recorded as holding again"
            ));
            release_slot(sim, region);
            return;
        }
        if let Some((repo, d)) = damaged {
            read_damaged(sim, id, repo, d).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let missing = match missing {
        Some(m) => format!(
            "{} recorded copies missing, first {:?}",
            m.len(),
            m.iter().take(3).map(|d| d.to_string()).collect::<Vec<_>>()
        ),
        None => "down".into(),
    };
    sim.trace(format!(
        "nemesis: node {id} not confirmed repaired before the safety phase ended ({missing}); region {region} takes no further copy loss"
    ));
}

/// Reads blob `d` through node `id` right after its copy there was damaged: the node must
/// answer the right bytes (repaired from another holder) or an error, never what it stored.
async fn read_damaged(sim: &Sim, id: NodeId, repo: &str, d: &engine::Digest) {
    use registry_api::Registry;
    let (r, d2) = (crate::workload::parse_repo(repo), d.clone());
    let got = tokio::time::timeout(
        crate::workload::OP_TIMEOUT,
        sim.cluster.request(id, move |reg| async move {
            reg.blob_content(engine::AccountId::DEFAULT, &r, &d2).await
        }),
    )
    .await;
    match got {
        Ok(Ok(Ok(content))) => {
            let h = engine::Digest::of(d.algorithm(), &content.bytes);
            if h == *d {
                sim.trace(format!(
                    "nemesis: node {id} served {d} whole after its copy was damaged"
                ));
            } else {
                sim.violation(format!(
                    "served corrupt bytes: node {id} served its damaged copy of {repo}@{d} (bytes hash to {h})"
                ));
            }
        }
        Ok(Ok(Err(e))) => sim.trace(format!(
            "nemesis: node {id} refused {d} after its copy was damaged: {e}"
        )),
        Ok(Err(e)) => sim.trace(format!("nemesis: reading {d} from node {id}: {e}")),
        Err(_) => sim.trace(format!("nemesis: reading {d} from node {id} timed out")),
    }
}

/// `FaultKind::BlobVolumeLost` on `victim`.
async fn blob_volume_lost(sim: &Sim, region: usize, victim: NodeId) {
    let c = &sim.cluster;
    if !c.is_up(victim) || !take_slot(sim, region) {
        return;
    }
    sim.count_fault(FaultKind::BlobVolumeLost);
    let others: Vec<NodeId> = c.regions[region]
        .iter()
        .copied()
        .filter(|m| *m != victim)
        .collect();
    // The other volumes fill up first (half the time), unless a disk fault is on them.
    let fill = rt::with_rng(|r| r.gen_bool(0.5)) && others.iter().all(|o| !c.disk_failing(*o));
    if fill {
        sim.trace(format!(
            "nemesis: blob volumes of {others:?} full; only node {victim} takes blobs"
        ));
        for o in &others {
            c.lock()[o]
                .blobs
                .set_failing(Some("no space left on device (blob volume)".into()));
        }
        tokio::time::sleep(ms(2_000..8_000)).await;
    }
    // Crash and wipe at once: nothing may restart the node on its old volume in between.
    if c.is_up(victim) {
        crash(sim, victim);
    }
    c.lock()[&victim].blobs.wipe();
    sim.trace(format!("nemesis: blob volume of node {victim} lost"));
    if fill {
        for o in &others {
            c.lock()[o].blobs.set_failing(None);
        }
        sim.trace(format!(
            "nemesis: blob volumes of {others:?} have room again"
        ));
    }
    tokio::time::sleep(ms(100..3_000)).await;
    restart(sim, victim).await;
    release_when_repaired(sim, region, victim, None).await;
}

/// `FaultKind::BlobBitFlip` or `FaultKind::BlobTruncated` on one acknowledged blob that
/// `victim` holds.
async fn damage_blob(sim: &Sim, kind: FaultKind, region: usize, victim: NodeId) {
    let c = &sim.cluster;
    if !c.is_up(victim) {
        return;
    }
    use engine::blob_store::BlobBackend;
    let blobs = c.lock()[&victim].blobs.clone();
    let candidates: Vec<(String, engine::Digest)> = sim
        .model
        .lock()
        .expect("model lock")
        .blobs
        .iter()
        .filter(|(r, _, d)| *r == region && blobs.blob_len(d).is_some_and(|n| n > 1))
        .map(|(_, repo, d)| (repo.clone(), d.clone()))
        .collect();
    let Some((repo, d)) = pick(&candidates) else {
        return;
    };
    if !take_slot(sim, region) {
        return;
    }
    let len = blobs.blob_len(&d).unwrap_or(0);
    let done = if kind == FaultKind::BlobBitFlip {
        let bit = rt::with_rng(|r| r.gen_range(0..len * 8));
        blobs.flip_bit(&d, bit)
    } else {
        let keep = rt::with_rng(|r| r.gen_range(0..len));
        blobs.truncate_blob(&d, keep)
    };
    if !done {
        release_slot(sim, region);
        return;
    }
    sim.count_fault(kind);
    sim.trace(format!(
        "nemesis: copy of {d} on node {victim} damaged ({kind:?})"
    ));
    read_damaged(sim, victim, &repo, &d).await;
    release_when_repaired(sim, region, victim, Some((&repo, &d))).await;
}

/// `FaultKind::MetadataCorrupted` on `victim`: the node must refuse to start; it is then
/// replaced by an empty node that recovers from its peers.
async fn metadata_corrupted(sim: &Sim, region: usize, victim: NodeId) {
    let c = &sim.cluster;
    if !c.is_up(victim) || c.regions[region].len() < 3 {
        return;
    }
    // Replacing a node removes it from the group: every other member must be a voter.
    let Some(leader) = c.self_declared_leader(region) else {
        return;
    };
    if voters(sim, leader).len() < c.regions[region].len() || !take_slot(sim, region) {
        return;
    }
    crash(sim, victim);
    if !c.lock()[&victim].kv.corrupt_synced_tail() {
        release_slot(sim, region);
        restart(sim, victim).await;
        return;
    }
    sim.count_fault(FaultKind::MetadataCorrupted);
    sim.trace(format!(
        "nemesis: a synced record of node {victim}'s metadata store is damaged"
    ));
    tokio::time::sleep(ms(100..2_000)).await;
    match c.start(victim).await {
        Ok(()) => {
            sim.violation(format!(
                "node {victim} started on a metadata store whose synced record fails its checksum"
            ));
            release_slot(sim, region);
            return;
        }
        Err(e) => sim.trace(format!("nemesis: node {victim} refuses to start: {e}")),
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    if replace_node(sim, region, victim, deadline).await {
        release_when_repaired(sim, region, victim, None).await;
    }
}

/// Replaces a node that lost its disks (or cannot open them): removes it from its region
/// through the leader, wipes it, starts it empty and adds it back (learner, catch-up, voter).
/// The removal is committed before the wipe, so no member counts the forgetful node's vote
/// until it has learnt the current term from the leader. True once it is a voter again;
/// gives up at `deadline`, leaving the node down (or removed) for a later attempt.
pub async fn replace_node(
    sim: &Sim,
    region: usize,
    id: NodeId,
    deadline: tokio::time::Instant,
) -> bool {
    let c = &sim.cluster;
    loop {
        if tokio::time::Instant::now() >= deadline {
            sim.trace(format!("nemesis: node {id} could not be removed in time"));
            return false;
        }
        if let Some(leader) = c.self_declared_leader(region).filter(|l| *l != id) {
            let members: Vec<NodeId> = c.running(leader).map_or_else(Vec::new, |up| {
                up.raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .nodes()
                    .map(|(n, _)| *n)
                    .collect()
            });
            if !members.is_empty() && !members.contains(&id) {
                break;
            }
            match change_membership(sim, leader, id, false).await {
                Ok(()) => {
                    sim.trace(format!("nemesis: node {id} removed to be replaced"));
                    break;
                }
                Err(e) => sim.trace(format!("nemesis: removing node {id} failed: {e}")),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if c.is_up(id) {
        crash(sim, id);
    }
    c.wipe(id);
    sim.trace(format!("nemesis: node {id} wiped (metadata and blobs)"));
    if let Err(e) = c.start(id).await {
        sim.violation(format!("node {id} did not start on empty disks: {e}"));
        return false;
    }
    while tokio::time::Instant::now() < deadline {
        if readd_removed(sim, region, 1).await {
            sim.trace(format!("nemesis: node {id} replaced"));
            return true;
        }
    }
    false
}

/// Adds or removes `target` through the current leader `via` (as a request it serves).
async fn change_membership(
    sim: &Sim,
    via: NodeId,
    target: NodeId,
    add: bool,
) -> Result<(), String> {
    let Some(up) = sim.cluster.running(via) else {
        return Err(format!("node {via} is down"));
    };
    let raft = up.raft.clone();
    let catch_up = Duration::from_secs(30);
    let r = rt::spawn_in(&up.scope, async move {
        if add {
            node::peer::add_member(&raft, target, crate::cluster::node_info(target), catch_up).await
        } else {
            node::peer::remove_member(&raft, target).await
        }
    })
    .await;
    r.map_err(|_| format!("node {via} crashed while changing membership"))?
}

/// The voters of the group as node `id` knows them. In a joint configuration (a change half
/// done) only the nodes of every set count: the others do not yet make the quorum whole, so
/// the change is not over.
fn voters(sim: &Sim, id: NodeId) -> Vec<NodeId> {
    sim.cluster.running(id).map_or_else(Vec::new, |up| {
        let m = up.raft.metrics().borrow().membership_config.clone();
        let configs = m.membership().get_joint_config();
        m.membership()
            .voter_ids()
            .filter(|v| configs.iter().all(|c| c.contains(v)))
            .collect()
    })
}

/// Adds back every node of `region` that its leader does not count as a voter, trying up
/// to `attempts` times. True when every node of the region is a voter again.
pub async fn readd_removed(sim: &Sim, region: usize, attempts: usize) -> bool {
    for _ in 0..attempts {
        if let Some(leader) = sim.cluster.self_declared_leader(region) {
            let voters = voters(sim, leader);
            let missing: Vec<NodeId> = sim.cluster.regions[region]
                .iter()
                .copied()
                .filter(|id| !voters.contains(id))
                .collect();
            if missing.is_empty() {
                return true;
            }
            for target in missing {
                match change_membership(sim, leader, target, true).await {
                    Ok(()) => sim.trace(format!("node {target} added back to region {region}")),
                    Err(e) => sim.trace(format!("adding node {target} back failed: {e}")),
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    false
}
