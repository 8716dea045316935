//! Simulated nodes: the real `NodeRegistry`, openraft group, peer handler and repair worker
//! of the node crate, on the simulator's network, in-memory disks and clock.
//!
//! A node's "process" is its `TaskScope`: every task it runs (Raft, replication, requests it
//! serves) belongs to the scope, and a crash stops them all at once. Its "disk" (`MemKv`,
//! `MemBlobStore`) outlives the process and loses what was not synced. Starting a node opens
//! its metadata store first, as RocksDB would: a store that fails its checksums refuses to
//! open and the node does not start. A node rebuilt from scratch (`wipe`) starts empty and
//! never bootstraps its region again: it joins through a membership change.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::kv::MemKv;
use engine::mem_blobs::MemBlobStore;
use node::clock::Clock;
use node::peer::NodePeer;
use node::raft::log_store::LogStore;
use node::raft::network::PeerNetwork;
use node::raft::state_machine::StateMachine;
use node::raft::{NodeId, NodeInfo, Raft};
use node::rt::{self, TaskScope};
use node::NodeRegistry;

use crate::net::{GeoServe, SimNet, SimTransport};
use crate::{Bug, SimPlatform};

/// Simulated wall-clock time starts here (2026-01-01T00:00:00Z), so stamps are realistic.
const EPOCH_MS: u64 = 1_767_225_600_000;

/// How often each node's repair worker runs a pass.
const REPAIR_INTERVAL: Duration = Duration::from_secs(5);

/// Wall-clock time of one node: simulated time plus the node's skew.
pub struct SimClock {
    start: tokio::time::Instant,
    skew_ms: AtomicI64,
}

impl SimClock {
    fn new(start: tokio::time::Instant) -> SimClock {
        SimClock {
            start,
            skew_ms: AtomicI64::new(0),
        }
    }

    pub fn set_skew_ms(&self, skew: i64) {
        self.skew_ms.store(skew, Ordering::Relaxed);
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        let elapsed = self.start.elapsed().as_millis() as i64;
        (EPOCH_MS as i64 + elapsed + self.skew_ms.load(Ordering::Relaxed)).max(0) as u64
    }
}

/// A snapshot every this many entries, in a one-minute run (production: 10 000): a region
/// applies a few dozen entries a second under the workload, so one is built every few
/// seconds, and followers install some within the run.
const SNAPSHOT_LOGS_SINCE_LAST_MIN: u64 = 100;
/// The interval grows with the run's length up to this (each snapshot copies the whole
/// state, which grows with the run: at 100 entries, a 2-hour run spends its time building
/// and shipping snapshots, gigabytes of them).
const SNAPSHOT_LOGS_SINCE_LAST_MAX: u64 = 500;
/// Entries kept behind a snapshot, as a share of the interval (production: a tenth): a
/// follower a second or two behind (a crash, a partition) is sent the snapshot rather than
/// the log.
const LOGS_KEPT_PER_SNAPSHOT_INTERVAL: u64 = 5;

/// The snapshot interval of a run `duration` long: `SNAPSHOT_LOGS_SINCE_LAST_MIN` per simulated
/// minute, within bounds.
pub fn snapshot_interval(duration: Duration) -> u64 {
    (SNAPSHOT_LOGS_SINCE_LAST_MIN * (duration.as_secs() / 60).max(1))
        .min(SNAPSHOT_LOGS_SINCE_LAST_MAX)
}

/// A request that got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    /// The node was down: the request was refused, nothing happened.
    #[error("node {0} is down")]
    Down(NodeId),
    /// The node crashed while serving: the outcome is unknown.
    #[error("node {0} crashed while serving the request")]
    Crashed(NodeId),
}

/// A running node's handles.
#[derive(Clone)]
pub struct Running {
    pub scope: Arc<TaskScope>,
    pub raft: Raft,
    pub registry: Arc<NodeRegistry<SimPlatform>>,
}

/// One node: its durable parts, and its process while it is up.
pub struct SimNode {
    pub id: NodeId,
    pub region: usize,
    pub kv: Arc<MemKv>,
    pub blobs: MemBlobStore,
    pub clock: Arc<SimClock>,
    pub up: Option<Running>,
    /// Whether this node initializes its region's Raft group when it starts uninitialized:
    /// the first node of each region, until it has done so once. A node wiped later joins
    /// through a membership change instead (bootstrapping again would found a second group).
    pub bootstrap: bool,
}

/// Every node of every region, and the network between them.
pub struct Cluster {
    pub net: SimNet,
    pub nodes: Mutex<BTreeMap<NodeId, SimNode>>,
    /// Node ids of each region, in order.
    pub regions: Vec<Vec<NodeId>>,
    pub bug: Option<Bug>,
    config: node::Config,
    /// Snapshots installed by every node's state machine so far.
    pub snapshot_installs: Arc<AtomicU64>,
    /// Raised when the watchdog gives up on the run (a planted spinner stops then).
    pub abandoned: Arc<AtomicBool>,
}

/// When the planted `SpinningTask` and `PanickingTask` bugs strike (simulated).
const PLANTED_BUG_AFTER: Duration = Duration::from_secs(3);

/// A node's `Georep` as the simulated network calls it.
struct GeoServer(Arc<node::georep::Georep<SimPlatform>>);

impl GeoServe for GeoServer {
    fn serve(
        &self,
        from: String,
        req: node::transport::GeoRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = node::transport::GeoResponse> + Send>>
    {
        let g = self.0.clone();
        Box::pin(async move { g.serve(&from, req).await })
    }
}

/// The name of region `r` (its stamps and its rules use it).
pub fn region_name(r: usize) -> String {
    format!("region-{r}")
}

pub fn node_info(id: NodeId) -> NodeInfo {
    NodeInfo {
        http: format!("sim-node-{id}:5000"),
        quic: format!("sim-node-{id}:5001"),
    }
}

impl Cluster {
    pub fn new(regions: usize, nodes_per_region: usize, net: SimNet, bug: Option<Bug>) -> Cluster {
        let start = tokio::time::Instant::now();
        let mut nodes = BTreeMap::new();
        let mut ids = Vec::new();
        for r in 0..regions {
            let mut region = Vec::new();
            for n in 0..nodes_per_region {
                let id = (r * 100 + n + 1) as NodeId;
                net.add_node(id, r);
                nodes.insert(
                    id,
                    SimNode {
                        id,
                        region: r,
                        kv: Arc::new(MemKv::new()),
                        blobs: MemBlobStore::new(),
                        clock: Arc::new(SimClock::new(start)),
                        up: None,
                        bootstrap: n == 0,
                    },
                );
                region.push(id);
            }
            ids.push(region);
        }
        let mut config = node::Config::default();
        config.raft.snapshot_logs_since_last = SNAPSHOT_LOGS_SINCE_LAST_MIN;
        config.raft.logs_kept_after_snapshot =
            SNAPSHOT_LOGS_SINCE_LAST_MIN / LOGS_KEPT_PER_SNAPSHOT_INTERVAL;
        Cluster {
            net,
            nodes: Mutex::new(nodes),
            regions: ids,
            bug,
            config,
            snapshot_installs: Arc::default(),
            abandoned: Arc::default(),
        }
    }

    /// Small snapshot intervals (see `snapshot_interval`), so that snapshots are built, and
    /// installed on followers that fell behind, within a run under faults.
    pub fn with_snapshot_interval(mut self, logs: u64) -> Cluster {
        self.config.raft.snapshot_logs_since_last = logs;
        self.config.raft.logs_kept_after_snapshot = logs / LOGS_KEPT_PER_SNAPSHOT_INTERVAL;
        self
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, SimNode>> {
        self.nodes.lock().expect("cluster lock")
    }

    /// The handles of a node that is up.
    pub fn running(&self, id: NodeId) -> Option<Running> {
        self.lock().get(&id).and_then(|n| n.up.clone())
    }

    /// Whether the nemesis has made this node's disk fail right now.
    pub fn disk_failing(&self, id: NodeId) -> bool {
        self.lock()[&id].blobs.is_failing()
    }

    pub fn is_up(&self, id: NodeId) -> bool {
        self.running(id).is_some()
    }

    /// Starts (or restarts) a node's process on its disk.
    pub async fn start(&self, id: NodeId) -> Result<(), String> {
        let (kv, blobs, clock, region, bootstrap) = {
            let g = self.lock();
            let n = &g[&id];
            if n.up.is_some() {
                return Ok(());
            }
            (
                n.kv.clone(),
                n.blobs.clone(),
                n.clock.clone(),
                n.region,
                n.bootstrap,
            )
        };
        kv.open()
            .map_err(|e| format!("node {id} cannot open its metadata store: {e}"))?;
        let scope = Arc::new(TaskScope::default());
        let transport = Arc::new(SimTransport {
            me: id,
            net: self.net.clone(),
        });
        let rc = node::server::raft_config(&self.config).map_err(|e| e.to_string())?;
        let log = if self.bug == Some(Bug::UnsyncedLog) {
            LogStore::acknowledging_unsynced_appends(kv.clone())
        } else {
            LogStore::new(kv.clone())
        };
        let sm = StateMachine::new(kv.clone(), &region_name(region))
            .counting_installs(self.snapshot_installs.clone());
        let net = PeerNetwork {
            transport: transport.clone(),
        };
        use tracing::Instrument;
        let span = tracing::info_span!("node", id);
        let raft = match scope
            .enter(Raft::new(id, rc, net, log, sm).instrument(span.clone()))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                scope.abort_all();
                return Err(format!("start raft on node {id}: {e}"));
            }
        };
        let mut registry = NodeRegistry::<SimPlatform>::new(
            id,
            raft.clone(),
            kv,
            blobs,
            clock as Arc<dyn Clock>,
            self.config.limits.clone(),
            Some(transport.clone()),
            Duration::from_millis(self.config.raft.write_timeout_ms),
        );
        registry.bugs.stale_leader_reads = self.bug == Some(Bug::StaleLeaderReads);
        registry.bugs.lost_replica_tag_moves = self.bug == Some(Bug::LostReplicaTagMoves);
        registry.bugs.replica_tags_always_win = self.bug == Some(Bug::ReplicaTagsAlwaysWin);
        registry.bugs.ack_quorum_minus_one = self.bug == Some(Bug::AckQuorumMinusOne);
        let registry = Arc::new(registry);
        let peer = Arc::new(NodePeer::<SimPlatform>::new(Duration::from_millis(
            self.config.raft.learner_catch_up_ms,
        )));
        peer.attach(raft.clone(), registry.clone());
        let mut geo_server = None;
        if self.regions.len() > 1 {
            // Every other region, by its nodes' ids (the simulated network routes by id).
            let remotes = (0..self.regions.len())
                .filter(|o| *o != region)
                .map(|o| {
                    let nodes = self.regions[o]
                        .iter()
                        .map(|m| (*m, node_info(*m)))
                        .collect();
                    (region_name(o), nodes)
                })
                .collect();
            let link = node::georep::GeoLink::new(transport.clone(), remotes, 0);
            let geo = node::georep::Georep::new(
                registry.clone(),
                link,
                &region_name(region),
                &self.config.replication,
            );
            geo_server = Some(Arc::new(GeoServer(geo.clone())) as Arc<dyn GeoServe>);
            registry.set_read_through(geo.clone());
            rt::spawn_in(&scope, geo.clone().run().instrument(span.clone()));
            rt::spawn_in(
                &scope,
                geo.link.clone().ping_loop().instrument(span.clone()),
            );
        }
        rt::spawn_in(
            &scope,
            registry
                .clone()
                .repair_loop(REPAIR_INTERVAL)
                .instrument(span.clone()),
        );
        if id == self.regions[0][0] {
            self.plant_task_bug(&scope);
        }
        if bootstrap && !raft.is_initialized().await.map_err(|e| e.to_string())? {
            let members: BTreeMap<NodeId, NodeInfo> = self.regions[region]
                .iter()
                .map(|m| (*m, node_info(*m)))
                .collect();
            if let Err(e) = raft.initialize(members).await {
                scope.abort_all();
                return Err(format!("bootstrap region {region}: {e}"));
            }
        }
        if bootstrap {
            self.lock().get_mut(&id).expect("node exists").bootstrap = false;
        }
        self.net.attach(id, peer, scope.clone());
        if let Some(g) = geo_server {
            self.net.attach_geo(id, g);
        }
        self.lock().get_mut(&id).expect("node exists").up = Some(Running {
            scope,
            raft,
            registry,
        });
        Ok(())
    }

    /// The planted `SpinningTask` and `PanickingTask` bugs: a task of the node `scope` runs
    /// that, a few simulated seconds on, spins without awaiting (until the watchdog abandons
    /// the run, so that a test process does not keep a core busy) or panics.
    fn plant_task_bug(&self, scope: &Arc<TaskScope>) {
        match self.bug {
            Some(Bug::SpinningTask) => {
                let abandoned = self.abandoned.clone();
                rt::spawn_in(scope, async move {
                    tokio::time::sleep(PLANTED_BUG_AFTER).await;
                    while !abandoned.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                });
            }
            Some(Bug::PanickingTask) => {
                rt::spawn_in(scope, async move {
                    tokio::time::sleep(PLANTED_BUG_AFTER).await;
                    panic!("planted bug: a node task panics");
                });
            }
            _ => {}
        }
    }

    /// Stops a node's process at once; its disks lose what was not synced, except the first
    /// `kept_unsynced` metadata batches (they reached the platter before the power went).
    pub fn crash(&self, id: NodeId, kept_unsynced: usize) {
        self.net.detach(id);
        let mut g = self.lock();
        let n = g.get_mut(&id).expect("node exists");
        if let Some(up) = n.up.take() {
            up.scope.abort_all();
        }
        let unsynced = n.kv.crash_keeping(kept_unsynced);
        n.blobs.crash();
        tracing::info!(
            node = id,
            unsynced,
            kept = kept_unsynced.min(unsynced),
            "crashed"
        );
    }

    /// Like `crash`, but the metadata batch after the `kept_unsynced` ones was half written
    /// when the power went: the store finds it torn by its checksum and drops it (and the
    /// rest). Returns whether a torn record was found.
    pub fn crash_tearing(&self, id: NodeId, kept_unsynced: usize) -> bool {
        self.net.detach(id);
        let mut g = self.lock();
        let n = g.get_mut(&id).expect("node exists");
        if let Some(up) = n.up.take() {
            up.scope.abort_all();
        }
        let r = n.kv.crash_tearing(kept_unsynced);
        n.blobs.crash();
        tracing::info!(node = id, ?r, "crashed with a torn metadata record");
        r.torn
    }

    /// Replaces a node's disks (metadata and blobs) with empty ones. The node must be down.
    pub fn wipe(&self, id: NodeId) {
        let g = self.lock();
        let n = &g[&id];
        assert!(n.up.is_none(), "node {id} is wiped while up");
        n.kv.wipe();
        n.blobs.wipe();
    }

    /// Whether a node's metadata store would refuse to open.
    pub fn kv_corrupt(&self, id: NodeId) -> bool {
        self.lock()[&id].kv.is_corrupt()
    }

    /// Runs `f` against a node's registry as a request that node serves: a task of its
    /// process, which a crash stops.
    pub async fn request<R, F, Fut>(&self, id: NodeId, f: F) -> Result<R, RequestError>
    where
        R: Send + 'static,
        F: FnOnce(Arc<NodeRegistry<SimPlatform>>) -> Fut,
        Fut: std::future::Future<Output = R> + Send + 'static,
    {
        let Some(up) = self.running(id) else {
            return Err(RequestError::Down(id));
        };
        use tracing::Instrument;
        let fut = f(up.registry).instrument(tracing::info_span!("node", id));
        rt::spawn_in(&up.scope, fut)
            .await
            .map_err(|_| RequestError::Crashed(id))
    }

    /// The leader a majority of `region`'s nodes believe in, if it is up and believes it too.
    pub fn agreed_leader(&self, region: usize) -> Option<NodeId> {
        let ids = &self.regions[region];
        let mut votes: BTreeMap<NodeId, usize> = BTreeMap::new();
        for id in ids {
            if let Some(l) = self
                .running(*id)
                .and_then(|up| up.raft.metrics().borrow().current_leader)
            {
                *votes.entry(l).or_default() += 1;
            }
        }
        votes
            .into_iter()
            .find(|(l, n)| {
                *n > ids.len() / 2
                    && self
                        .running(*l)
                        .is_some_and(|up| up.raft.metrics().borrow().current_leader == Some(*l))
            })
            .map(|(l, _)| l)
    }

    /// The node of `region` that leads in the highest term, by its own account (members
    /// removed from the group do not count it, so no majority vote is needed here).
    pub fn self_declared_leader(&self, region: usize) -> Option<NodeId> {
        self.regions[region]
            .iter()
            .filter_map(|id| {
                let up = self.running(*id)?;
                let m = up.raft.metrics().borrow().clone();
                (m.state == openraft::ServerState::Leader).then_some((m.current_term, *id))
            })
            .max()
            .map(|(_, id)| id)
    }

    /// Whether every node of `region` is up and has applied the same last log index.
    /// Each node of `region`: (id, last log index, last applied index), for messages.
    pub fn region_positions(&self, region: usize) -> Vec<(NodeId, Option<u64>, Option<u64>)> {
        self.regions[region]
            .iter()
            .map(|id| match self.running(*id) {
                Some(up) => {
                    let m = up.raft.metrics().borrow().clone();
                    (*id, m.last_log_index, m.last_applied.map(|l| l.index))
                }
                None => (*id, None, None),
            })
            .collect()
    }

    pub fn region_caught_up(&self, region: usize) -> bool {
        let mut applied = None;
        for id in &self.regions[region] {
            let Some(up) = self.running(*id) else {
                return false;
            };
            let m = up.raft.metrics().borrow().clone();
            let a = m.last_applied.map(|l| l.index);
            if m.last_log_index != a || *applied.get_or_insert(a) != a {
                return false;
            }
        }
        true
    }
}
