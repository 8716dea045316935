//! The nemesis: faults injected during the safety phase, each undone after a while.
//!
//! Every fault is drawn from the seeded RNG; every fault checks that the safety phase is
//! still on before it strikes, so the liveness phase starts from a healed cluster.

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
            sim.count_fault(kind);
            sim.trace(format!(
                "nemesis: removing node {target} from region {region}"
            ));
            match change_membership(&sim, leader, target, false).await {
                Ok(()) => sim.trace(format!("nemesis: node {target} removed")),
                Err(e) => sim.trace(format!("nemesis: removing node {target} failed: {e}")),
            }
            tokio::time::sleep(ms(1_000..8_000)).await;
            readd_removed(&sim, region, 10).await;
        }
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
/// failing may refuse to, and stays down until that fault ends and restarts it.
pub async fn restart(sim: &Sim, id: NodeId) {
    match sim.cluster.start(id).await {
        Ok(()) => sim.trace(format!("node {id} restarted")),
        Err(e) if sim.cluster.disk_failing(id) => {
            sim.trace(format!("node {id} did not start on its failing disk: {e}"))
        }
        Err(e) => sim.violation(format!("node {id} failed to restart: {e}")),
    }
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

/// The voters of the group as node `id` knows them.
fn voters(sim: &Sim, id: NodeId) -> Vec<NodeId> {
    sim.cluster.running(id).map_or_else(Vec::new, |up| {
        up.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
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
