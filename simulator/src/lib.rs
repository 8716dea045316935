//! Deterministic simulation of Portolan: many nodes in several regions, in one process, on a
//! simulated clock, network and disk, driven by a seed — the same seed gives the same run.
//!
//! The node code runs unmodified: `NodeRegistry`, openraft with the node's log store and
//! state machine, the peer handler, blob replication and repair. The simulator binds the
//! node's seams: `Transport` to `net::SimNet`, the metadata store to `MemKv`, the blob store
//! to `MemBlobStore`, `Clock` to simulated time, and the RNG to the seed. Every node runs on
//! one current-thread tokio runtime with a paused clock (time jumps to the next timer when
//! every task waits) and a seeded scheduler RNG (`select!` draws from it).
//!
//! A run has a safety phase (clients and the nemesis at work, invariants checked as answers
//! arrive), then a liveness phase (faults healed; every region must elect a leader, converge
//! and accept writes within a bound), then the final checks.

pub mod cluster;
pub mod faults;
pub mod history;
pub mod net;
pub mod watchdog;
pub mod workload;

#[cfg(not(tokio_unstable))]
compile_error!(
    "the simulator needs `--cfg tokio_unstable` (set in .cargo/config.toml) to seed tokio's RNG"
);

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use engine::keys::Cf;
use engine::kv::KvStore;
use engine::mem_blobs::MemBlobStore;
use engine::{AccountId, Digest, Reference};
use node::raft::NodeId;
use node::Platform;

use crate::cluster::Cluster;
use crate::faults::{FaultKind, Intensity};
use crate::history::Model;
use crate::net::{SimNet, SimTransport};
use crate::workload::{pull_verified, Client, Kind, PullError};

/// The simulator's bindings of the node's seams.
pub struct SimPlatform;

impl Platform for SimPlatform {
    type Transport = SimTransport;
    type Kv = engine::kv::MemKv;
    type Blobs = MemBlobStore;
}

/// Promises broken on purpose, to show that a sweep catches each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Bug {
    /// The Raft log acknowledges appends before they are fsynced.
    UnsyncedLog,
    /// Linearizable tag reads skip the leader's read-index check.
    StaleLeaderReads,
    /// A region applying another region's push stores the manifest but drops its tag move.
    LostReplicaTagMoves,
    /// A tag move from another region always wins, whatever its stamp (no last-writer-wins).
    ReplicaTagsAlwaysWin,
    /// A push is acknowledged once quorum − 1 blob copies are durable.
    AckQuorumMinusOne,
    /// A node task spins without awaiting after a few simulated seconds (the watchdog's
    /// self-test: simulated time stops).
    SpinningTask,
    /// A node task panics after a few simulated seconds (a panic must be a violation).
    PanickingTask,
}

/// One run's parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub regions: usize,
    pub nodes: usize,
    /// Length of the safety phase (simulated).
    pub duration: Duration,
    pub faults: Intensity,
    pub clients_per_region: usize,
    pub bug: Option<Bug>,
    /// Print every trace line as it happens.
    pub verbose: bool,
    /// Wall-clock time the run may take (the watchdog ends it past this).
    pub wall_limit: Duration,
    /// Wall-clock time simulated time may stand still before the watchdog ends the run.
    pub stall_limit: Duration,
}

/// Wall-clock time a run may take at least: generous for a one-minute run in a debug build
/// on a busy machine (release runs go 30–40 times faster than simulated time).
pub const WALL_LIMIT_MIN: Duration = Duration::from_secs(600);
/// Wall-clock time simulated time may stand still: a run publishes its time every 50
/// simulated ms, and no step of the simulator computes for more than a fraction of a second.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

/// The default wall-clock limit of a run `duration` long: `WALL_LIMIT_MIN`, plus a quarter
/// of the duration (long runs, at least 4 times faster than simulated time).
pub fn default_wall_limit(duration: Duration) -> Duration {
    WALL_LIMIT_MIN + duration / 4
}

impl SimConfig {
    pub fn new(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            regions: 2,
            nodes: 3,
            duration: Duration::from_secs(60),
            faults: Intensity::Heavy,
            clients_per_region: 3,
            bug: None,
            verbose: false,
            wall_limit: default_wall_limit(Duration::from_secs(60)),
            stall_limit: STALL_LIMIT,
        }
    }

    /// What decides the run (the first, hashed, trace line): every field but those that
    /// only print or watch it, so a `--trace` replay reproduces the trace hash.
    pub fn run_description(&self) -> String {
        // Destructured, so that a new field must be sorted into one side or the other.
        let SimConfig {
            seed,
            regions,
            nodes,
            duration,
            faults,
            clients_per_region,
            bug,
            verbose: _,
            wall_limit: _,
            stall_limit: _,
        } = self;
        format!(
            "seed {seed}, {regions} region(s) x {nodes} node(s), {duration:?}, faults {faults:?}, {clients_per_region} client(s) per region, bug {bug:?}"
        )
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        let mut c = format!(
            "cargo run --release -p simulator -- --seed {} --regions {} --nodes {} --duration {}s --faults {} --clients {}",
            self.seed,
            self.regions,
            self.nodes,
            self.duration.as_secs(),
            format!("{:?}", self.faults).to_lowercase(),
            self.clients_per_region,
        );
        if let Some(b) = self.bug {
            c.push_str(&format!(
                " --bug {}",
                clap::ValueEnum::to_possible_value(&b)
                    .expect("bugs have names")
                    .get_name()
            ));
        }
        c.push_str(" --trace");
        c
    }
}

/// Lines of trace kept for the report of a failed run.
const TRACE_TAIL_LINES: usize = 400;
/// How long the liveness phase may take before the run fails for lack of progress.
const LIVENESS_BOUND: Duration = Duration::from_secs(120);

#[derive(Default)]
struct TraceState {
    hasher: blake3::Hasher,
    lines: u64,
    tail: VecDeque<String>,
}

#[derive(Default)]
struct Counters {
    ops: BTreeMap<(Kind, bool), u64>,
    faults: BTreeMap<FaultKind, u64>,
    checks: u64,
}

/// The state of one run, shared by clients, the nemesis and the checks.
pub struct Sim {
    pub config: SimConfig,
    pub cluster: Cluster,
    pub model: Mutex<Model>,
    start: tokio::time::Instant,
    safety_end: tokio::time::Instant,
    trace: Mutex<TraceState>,
    counters: Mutex<Counters>,
    violations: Mutex<Vec<String>>,
    pub(crate) faults_active: AtomicUsize,
    /// Regions where a fault has copies out of reach or lost right now (see `faults`, "the
    /// minority bound"): at most one such fault per region at a time.
    pub(crate) copies_affected: Mutex<BTreeSet<usize>>,
    /// Shared with the watchdog (simulated time, panics, the order to stop).
    pub watch: Arc<watchdog::Watch>,
}

/// Violations found, readable.
pub type Violations = Vec<String>;

impl Sim {
    /// Microseconds of simulated time since the start.
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    pub fn faults_on(&self) -> bool {
        tokio::time::Instant::now() < self.safety_end
    }

    pub fn trace(&self, line: String) {
        let t = self.now_us();
        self.watch.beat(t / 1000);
        let line = format!("{:>10.3} ms  {line}", t as f64 / 1000.0);
        if self.config.verbose {
            println!("{line}");
        }
        let mut g = self.trace.lock().unwrap_or_else(PoisonError::into_inner);
        g.hasher.update(line.as_bytes());
        g.hasher.update(b"\n");
        g.lines += 1;
        if g.tail.len() == TRACE_TAIL_LINES {
            g.tail.pop_front();
        }
        g.tail.push_back(line);
    }

    /// Records a violation (once, however often it is found).
    pub fn violation(&self, what: String) {
        let mut v = self
            .violations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if v.contains(&what) {
            return;
        }
        self.trace(format!("VIOLATION: {what}"));
        v.push(what);
    }

    pub fn count_op(&self, kind: Kind, ok: bool) {
        *self
            .counters
            .lock()
            .expect("counters lock")
            .ops
            .entry((kind, ok))
            .or_default() += 1;
    }

    pub fn count_fault(&self, kind: FaultKind) {
        self.trace(format!("nemesis: {kind:?}"));
        *self
            .counters
            .lock()
            .expect("counters lock")
            .faults
            .entry(kind)
            .or_default() += 1;
    }

    fn count_checks(&self, n: u64) {
        self.counters.lock().expect("counters lock").checks += n;
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub config: SimConfig,
    pub simulated: Duration,
    pub wall: Duration,
    pub ops_ok: u64,
    pub ops_failed: u64,
    pub ops: BTreeMap<String, (u64, u64)>,
    pub faults: BTreeMap<String, u64>,
    pub checks: u64,
    pub messages: u64,
    pub messages_lost: u64,
    pub messages_duplicated: u64,
    pub trace_lines: u64,
    pub trace_hash: String,
    /// Raft snapshots installed by followers that were behind (every node, whole run).
    pub snapshots_installed: u64,
    pub violations: Violations,
    pub trace_tail: Vec<String>,
}

impl Summary {
    /// The report of a run that ended before it had any state (its thread died at once).
    fn empty(config: SimConfig) -> Summary {
        Summary {
            config,
            simulated: Duration::ZERO,
            wall: Duration::ZERO,
            ops_ok: 0,
            ops_failed: 0,
            ops: BTreeMap::new(),
            faults: BTreeMap::new(),
            checks: 0,
            messages: 0,
            messages_lost: 0,
            messages_duplicated: 0,
            trace_lines: 0,
            trace_hash: String::new(),
            snapshots_installed: 0,
            violations: vec!["the simulation thread died before the run began".into()],
            trace_tail: Vec::new(),
        }
    }

    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// Simulated seconds per wall-clock second.
    pub fn speedup(&self) -> f64 {
        self.simulated.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "seed {}: {} region(s) x {} node(s), faults {:?}{}",
            c.seed,
            c.regions,
            c.nodes,
            c.faults,
            c.bug.map(|b| format!(", bug {b:?}")).unwrap_or_default()
        )?;
        writeln!(
            f,
            "  simulated {:.1} s in {:.2} s wall ({:.0}x)",
            self.simulated.as_secs_f64(),
            self.wall.as_secs_f64(),
            self.speedup()
        )?;
        writeln!(
            f,
            "  operations: {} ok, {} failed",
            self.ops_ok, self.ops_failed
        )?;
        for (k, (ok, failed)) in &self.ops {
            writeln!(f, "    {k:<12} {ok:>6} ok {failed:>6} failed")?;
        }
        let total: u64 = self.faults.values().sum();
        writeln!(f, "  faults injected: {total}")?;
        for (k, n) in &self.faults {
            writeln!(f, "    {k:<16} {n:>5}")?;
        }
        writeln!(
            f,
            "  network: {} messages, {} lost, {} duplicated",
            self.messages, self.messages_lost, self.messages_duplicated
        )?;
        writeln!(f, "  snapshots installed: {}", self.snapshots_installed)?;
        writeln!(f, "  invariant checks passed: {}", self.checks)?;
        writeln!(
            f,
            "  trace: {} lines, hash {}",
            self.trace_lines, self.trace_hash
        )?;
        if self.passed() {
            write!(f, "  result: PASS")
        } else {
            writeln!(f, "  result: FAIL, {} violation(s):", self.violations.len())?;
            for v in self.violations.iter().take(20) {
                writeln!(f, "    - {v}")?;
            }
            writeln!(f, "  last trace lines:")?;
            for l in &self.trace_tail {
                writeln!(f, "    {l}")?;
            }
            write!(f, "  replay: {}", c.replay_command())
        }
    }
}

/// Latency between regions: 1 ms inside a region, 30–150 ms across (fixed per pair by the
/// seed), one way.
fn latencies(regions: usize) -> Vec<Vec<u64>> {
    use rand::Rng;
    let mut m = vec![vec![1_000u64; regions]; regions];
    let pairs: Vec<(usize, usize)> = (0..regions)
        .flat_map(|a| ((a + 1)..regions).map(move |b| (a, b)))
        .collect();
    for (a, b) in pairs {
        let l = node::rt::with_rng(|r| r.gen_range(30_000..150_000));
        m[a][b] = l;
        m[b][a] = l;
    }
    m
}

/// Stack of a simulation thread: the main thread's size, which the simulator always had.
const SIM_STACK_BYTES: usize = 8 << 20;

/// Runs one simulation to the end and reports it. Deterministic in `config`. The simulation
/// runs on a thread of its own under a watchdog (see `watchdog`): a run whose simulated time
/// stops, that exceeds its wall-clock limit or that panics ends with a violation.
pub fn run(config: SimConfig) -> Summary {
    let wall = std::time::Instant::now();
    let watch = Arc::new(watchdog::Watch::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let (w, c) = (watch.clone(), config.clone());
    let thread = std::thread::Builder::new()
        .name(format!("sim-{}", config.seed))
        .stack_size(SIM_STACK_BYTES)
        .spawn(move || {
            watchdog::record_panics_here(w.clone());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .rng_seed(tokio::runtime::RngSeed::from_bytes(&c.seed.to_le_bytes()))
                .build()
                .expect("build the simulation runtime");
            node::rt::seed_thread_rng(c.seed);
            let summary = rt.block_on(async {
                // `biased`: polling the stop signal first draws nothing from the seeded RNG.
                tokio::select! {
                    biased;
                    _ = w.stop.notified() => None,
                    s = run_inner(c, w.clone()) => Some(s),
                }
            });
            // Tasks still parked (nodes, stragglers) are dropped with the runtime.
            drop(rt);
            let _ = tx.send(summary);
        })
        .expect("spawn the simulation thread");
    let verdict = watchdog::watch(&watch, &rx, config.stall_limit, config.wall_limit);
    let (summary, gave_up) = match verdict {
        watchdog::Verdict::Finished(s) => {
            let _ = thread.join();
            (Some(*s), None)
        }
        watchdog::Verdict::Died => {
            let _ = thread.join();
            (None, None)
        }
        watchdog::Verdict::GaveUp(why) => {
            watch.give_up();
            match rx.recv_timeout(watchdog::STOP_GRACE) {
                Ok(s) => {
                    let _ = thread.join();
                    (s, Some(why))
                }
                // Still spinning: detached (it cannot be preempted), see `watchdog`.
                Err(_) => (None, Some(why)),
            }
        }
    };
    let sim = watch
        .sim
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let mut summary = match (summary, sim) {
        (Some(s), _) => s,
        (None, Some(sim)) => summarize(&sim, Duration::from_millis(watch.sim_ms())),
        (None, None) => Summary::empty(config),
    };
    summary.violations.extend(gave_up);
    for p in watch.panics() {
        if !summary.violations.contains(&p) {
            summary.violations.push(p);
        }
    }
    Summary {
        wall: wall.elapsed(),
        ..summary
    }
}

async fn run_inner(config: SimConfig, watch: Arc<watchdog::Watch>) -> Summary {
    let start = tokio::time::Instant::now();
    let net = SimNet::new(latencies(config.regions));
    let cluster = Cluster::new(config.regions, config.nodes, net, config.bug)
        .with_snapshot_interval(cluster::snapshot_interval(config.duration));
    let sim = Arc::new(Sim {
        watch: watch.clone(),
        safety_end: start + config.duration,
        config: config.clone(),
        cluster,
        model: Mutex::new(Model::default()),
        start,
        trace: Mutex::default(),
        counters: Mutex::default(),
        violations: Mutex::default(),
        faults_active: AtomicUsize::new(0),
        copies_affected: Mutex::default(),
    });
    *watch
        .sim
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sim.clone());
    sim.trace(format!("start: {}", config.run_description()));
    for region in &sim.cluster.regions {
        for id in region {
            if let Err(e) = sim.cluster.start(*id).await {
                sim.violation(format!("node {id} did not start: {e}"));
            }
        }
    }
    configure_replication(&sim).await;
    // Safety phase: clients and the nemesis.
    let mut clients = Vec::new();
    for region in 0..config.regions {
        for i in 0..config.clients_per_region {
            let c = Client {
                id: region * 100 + i,
                region,
                sim: sim.clone(),
            };
            clients.push(tokio::spawn(c.run(sim.safety_end)));
        }
    }
    let nemesis = tokio::spawn(faults::nemesis(sim.clone(), config.faults));
    let checker = tokio::spawn(check_history_periodically(sim.clone()));
    tokio::spawn(watch_leaders(sim.clone()));
    for c in clients {
        let _ = c.await;
    }
    let _ = nemesis.await;
    let _ = checker.await;
    sim.trace("safety phase over".into());

    // Liveness phase: heal everything; the cluster must make progress within the bound.
    let deadline = tokio::time::Instant::now() + LIVENESS_BOUND;
    let settled = liveness(&sim, deadline).await;
    if settled {
        final_checks(&sim, deadline).await;
        cross_region_checks(&sim).await;
    }
    let simulated = start.elapsed();
    summarize(&sim, simulated)
}

/// How long after the final checks every region may take to converge on what the others
/// replicate to it, at least (simulated time).
const CONVERGENCE_BOUND: Duration = Duration::from_secs(180);
/// Past `CONVERGENCE_BOUND`, the wait goes on while the replication backlog (outbox events
/// not yet acknowledged by their destination) keeps shrinking: it fails once the backlog has
/// not reached a new low for this long (the workers retry at least every 10 s), …
const CONVERGENCE_NO_PROGRESS: Duration = Duration::from_secs(60);
/// … or once the backlog had time to drain at this many events per second: a 2-hour run
/// under heavy faults ends with thousands of events unshipped, drained at ~15 a second.
const CONVERGENCE_EVENTS_PER_S_MIN: u64 = 5;

/// Outbox events every region has not yet seen acknowledged by each other region, summed
/// (read from each region's first node, which has caught up after `liveness`).
fn replication_backlog(c: &Cluster) -> u64 {
    let mut total = 0;
    for (r, ids) in c.regions.iter().enumerate() {
        let kv = c.lock()[&ids[0]].kv.clone();
        let last = engine::outbox::last_seq(kv.as_ref()).unwrap_or(0);
        for o in (0..c.regions.len()).filter(|o| *o != r) {
            let dest = engine::outbox::Destination {
                region: cluster::region_name(o),
                account: AccountId::DEFAULT,
            };
            let cursor = engine::outbox::cursor(kv.as_ref(), &dest).unwrap_or(0);
            total += last.saturating_sub(cursor);
        }
    }
    total
}

/// The convergence wait's bound: it scales with the replication backlog (see
/// `CONVERGENCE_NO_PROGRESS`).
struct Convergence {
    started: tokio::time::Instant,
    cap: tokio::time::Instant,
    lowest: u64,
    lowest_at: tokio::time::Instant,
}

impl Convergence {
    fn new(c: &Cluster) -> Convergence {
        let now = tokio::time::Instant::now();
        let backlog = replication_backlog(c);
        Convergence {
            started: now,
            cap: now
                + CONVERGENCE_BOUND
                    .max(Duration::from_secs(backlog / CONVERGENCE_EVENTS_PER_S_MIN)),
            lowest: backlog,
            lowest_at: now,
        }
    }

    /// Whether to give up waiting now.
    fn exhausted(&mut self, c: &Cluster) -> bool {
        let now = tokio::time::Instant::now();
        let backlog = replication_backlog(c);
        if backlog < self.lowest {
            self.lowest = backlog;
            self.lowest_at = now;
        }
        now >= self.started + CONVERGENCE_BOUND
            && (now >= self.lowest_at + CONVERGENCE_NO_PROGRESS || now >= self.cap)
    }

    /// For messages: how long the wait went on, and the backlog left.
    fn describe(&self) -> String {
        format!(
            "within {} s of healing, replication backlog at {} events",
            self.started.elapsed().as_secs(),
            self.lowest
        )
    }
}

/// With several regions, each replicates its default account to every other (as
/// `dev-cluster` sets up), set through each region's Raft like PutReplicationConfiguration.
async fn configure_replication(sim: &Arc<Sim>) {
    let c = &sim.cluster;
    let regions = c.regions.len();
    if regions < 2 {
        return;
    }
    let deadline = tokio::time::Instant::now() + LIVENESS_BOUND;
    for r in 0..regions {
        let destinations: Vec<serde_json::Value> = (0..regions)
            .filter(|o| *o != r)
            .map(|o| serde_json::json!({ "region": cluster::region_name(o), "registryId": "000000000000" }))
            .collect();
        let config = serde_json::json!({ "rules": [{ "destinations": destinations }] }).to_string();
        let mut attempt = 0usize;
        loop {
            let id = c.regions[r][attempt % c.regions[r].len()];
            attempt += 1;
            let cmd = engine::state::Command::Iam(engine::iam::IamCommand::ReplicationConfigSet {
                account: AccountId::DEFAULT,
                config: config.clone(),
            });
            let r2 = c
                .request(id, move |reg| async move { reg.propose_command(cmd).await })
                .await;
            if matches!(r2, Ok(Ok(engine::state::Outcome::Done))) {
                sim.trace(format!("region {r} replicates to every other region"));
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                sim.violation(format!("region {r} did not take its replication rule"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The tags of `repo` (default account) on one node's state.
fn tags_on(c: &Cluster, id: NodeId, repo: &str) -> BTreeMap<String, Digest> {
    let kv = c.lock()[&id].kv.clone();
    engine::state::State::new(kv.as_ref())
        .tag_records(
            AccountId::DEFAULT,
            &workload::parse_repo(repo),
            None,
            100_000,
        )
        .unwrap_or_default()
        .into_iter()
        .map(|(t, rec)| (t, rec.digest))
        .collect()
}

/// The manifests of `repo` (default account) on one node's state, by digest.
fn manifests_on(c: &Cluster, id: NodeId, repo: &str) -> BTreeSet<Digest> {
    let kv = c.lock()[&id].kv.clone();
    let state = engine::state::State::new(kv.as_ref());
    let repo = workload::parse_repo(repo);
    let mut out = BTreeSet::new();
    let mut after: Option<String> = None;
    loop {
        let page = state
            .manifests_page(AccountId::DEFAULT, &repo, after.as_deref(), 1024)
            .unwrap_or_default();
        let full = page.len() == 1024;
        after = page.last().map(|(d, _)| d.clone());
        out.extend(page.into_iter().filter_map(|(d, _)| Digest::parse(&d).ok()));
        if !full {
            return out;
        }
    }
}

/// Invariant 4: after healing, every region holds every other region's repositories with the
/// same tags and digests and every manifest (tagged or not), and what it serves verifies.
async fn cross_region_checks(sim: &Arc<Sim>) {
    let c = &sim.cluster;
    if c.regions.len() < 2 {
        return;
    }
    let mut bound = Convergence::new(c);
    let mut checks = 0u64;
    let repos: BTreeSet<(usize, String)> = {
        let m = sim.model.lock().expect("model lock");
        m.manifests
            .keys()
            .cloned()
            .chain(m.keys().into_iter().map(|(r, repo, _)| (r, repo)))
            .collect()
    };
    for (origin, repo) in &repos {
        for (o, ids) in c.regions.iter().enumerate().filter(|(o, _)| o != origin) {
            for id in ids {
                // Read both sides each time: a shared repository's origin region may itself
                // still be receiving the other regions' pushes.
                // The repository clients delete manifests from by digest: its tags must
                // converge (manifest deletes are stamped, last writer wins), but an untagged
                // manifest deleted and pushed again has no stamp of its own yet, so a delete
                // shipped again can still remove it at the destination (seed 2003 at 600 s):
                // its untagged manifests are not compared until manifests carry stamps.
                let untagged_checked = *repo != workload::repo_name(*origin, workload::DELETE_REPO);
                let (source, got, source_manifests, missing_manifests) = loop {
                    let source = tags_on(c, c.regions[*origin][0], repo);
                    let got = tags_on(c, *id, repo);
                    let source_manifests = manifests_on(c, c.regions[*origin][0], repo);
                    let got_manifests = manifests_on(c, *id, repo);
                    let missing: Vec<Digest> = if untagged_checked {
                        source_manifests
                            .difference(&got_manifests)
                            .cloned()
                            .collect()
                    } else {
                        Vec::new()
                    };
                    if (got == source && missing.is_empty()) || bound.exhausted(c) {
                        break (source, got, source_manifests, missing);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                };
                if got != source {
                    let missing: Vec<String> = source
                        .iter()
                        .filter(|(t, d)| got.get(*t) != Some(*d))
                        .map(|(t, d)| match got.get(t) {
                            Some(g) => format!("{t}: {d} here {g}"),
                            None => format!("{t}: {d} here none"),
                        })
                        .collect();
                    let extra: Vec<&String> =
                        got.keys().filter(|t| !source.contains_key(*t)).collect();
                    sim.violation(format!(
                        "no convergence: node {id} of region {o} has {repo} differing from region {origin} {} (tags missing or different: {missing:?}, extra: {extra:?})",
                        bound.describe()
                    ));
                    continue;
                }
                if !missing_manifests.is_empty() {
                    sim.violation(format!(
                        "no convergence: node {id} of region {o} lacks {} of {repo}'s manifests that region {origin} holds {} (e.g. {})",
                        missing_manifests.len(),
                        bound.describe(),
                        missing_manifests[0]
                    ));
                    continue;
                }
                checks += 1;
                // Pulls may still wait on a blob copy inside the region.
                let deadline = tokio::time::Instant::now() + CONVERGENCE_NO_PROGRESS;
                for tag in source.keys() {
                    let reference = Reference::Tag(workload::parse_tag(tag));
                    match pull_until(sim, *id, repo, &reference, deadline).await {
                        Ok(_) => checks += 1,
                        Err(e) => sim.violation(format!(
                            "replicated tag {repo}:{tag} on node {id} of region {o} does not pull whole: {e}"
                        )),
                    }
                }
                for d in source_manifests
                    .iter()
                    .filter(|d| untagged_checked || source.values().any(|t| t == *d))
                {
                    let reference = Reference::Digest(d.clone());
                    match pull_until(sim, *id, repo, &reference, deadline).await {
                        Ok(_) => checks += 1,
                        Err(e) => sim.violation(format!(
                            "replicated manifest {repo}@{d} on node {id} of region {o} does not pull whole: {e}"
                        )),
                    }
                }
            }
        }
    }
    sim.trace(format!(
        "cross-region: {} repositories converged",
        repos.len()
    ));
    sim.count_checks(checks);
}

/// Heals every fault, restarts every node, and waits until each region has a leader, has
/// caught up, and accepts a write on every node. False (with a violation) past `deadline`.
async fn liveness(sim: &Arc<Sim>, deadline: tokio::time::Instant) -> bool {
    let c = &sim.cluster;
    // Faults in flight finish their own healing first (each is bounded in time).
    while sim.faults_active.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.net.heal_all();
    c.net.set_faults(net::NetFaults::default());
    let ids: Vec<NodeId> = c.regions.iter().flatten().copied().collect();
    for id in &ids {
        let (kv, blobs, clock) = {
            let g = c.lock();
            (g[id].kv.clone(), g[id].blobs.clone(), g[id].clock.clone())
        };
        kv.set_failing(None);
        kv.set_sync_latency(Duration::ZERO);
        blobs.set_failing(None);
        blobs.set_latency(Duration::ZERO);
        clock.set_skew_ms(0);
        if !c.is_up(*id) {
            faults::restart(sim, *id).await;
        }
        // A node whose metadata store is corrupt cannot start: it is replaced by an empty one.
        if !c.is_up(*id) && c.kv_corrupt(*id) {
            let region = c.lock()[id].region;
            faults::replace_node(sim, region, *id, deadline).await;
        }
    }
    for region in 0..c.regions.len() {
        // Nodes the nemesis removed rejoin their region.
        while !faults::readd_removed(sim, region, 1).await {
            if tokio::time::Instant::now() >= deadline {
                sim.violation(format!(
                    "no progress: region {region} did not take its removed nodes back within {} s of healing",
                    LIVENESS_BOUND.as_secs()
                ));
                return false;
            }
        }
        // A write through every node of the region (forwarded to the leader).
        for id in c.regions[region].clone() {
            let mut attempt = 0u32;
            loop {
                attempt += 1;
                let r = workload::probe_write(sim, region, id, attempt).await;
                match r {
                    Ok(()) => break,
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        sim.violation(format!(
                            "no progress: region {region} did not accept a write through node {id} within {} s of healing: {e}",
                            LIVENESS_BOUND.as_secs()
                        ));
                        return false;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
        while !c.region_caught_up(region) {
            if tokio::time::Instant::now() >= deadline {
                sim.violation(format!(
                    "no convergence: region {region}'s nodes did not apply the same log within {} s of healing (node, last log, applied: {:?})",
                    LIVENESS_BOUND.as_secs(),
                    c.region_positions(region)
                ));
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    sim.trace("liveness: every region leads, accepts writes and has caught up".into());
    true
}

/// The end-of-run invariants on a healed, caught-up cluster.
async fn final_checks(sim: &Arc<Sim>, deadline: tokio::time::Instant) {
    let c = &sim.cluster;
    let mut checks = 0u64;
    // Convergence: every node of a region holds the same state at the same applied entry
    // (the repair worker may still be committing, so nodes are compared at equal positions).
    for (region, ids) in c.regions.iter().enumerate() {
        let snapshot = loop {
            let views: Vec<(NodeId, Vec<u8>, blake3::Hash)> = ids
                .iter()
                .map(|id| {
                    let kv = c.lock()[id].kv.clone();
                    let applied = kv
                        .get(Cf::SmMeta, engine::keys::SM_LAST_APPLIED)
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    (*id, applied, state_hash(kv.as_ref()))
                })
                .collect();
            if views.windows(2).all(|w| w[0].1 == w[1].1) || tokio::time::Instant::now() >= deadline
            {
                break views;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (first, first_applied, first_hash) = &snapshot[0];
        for (id, applied, h) in &snapshot[1..] {
            if applied != first_applied {
                sim.violation(format!(
                    "region {region}: nodes {first} and {id} never applied the same entries within the bound"
                ));
            } else if h != first_hash {
                let a = state_rows(c.lock()[first].kv.as_ref());
                let b = state_rows(c.lock()[id].kv.as_ref());
                let diff = a
                    .iter()
                    .zip(b.iter())
                    .find(|(x, y)| x != y)
                    .map(|(x, y)| format!("first difference: {} vs {}", show_row(x), show_row(y)))
                    .unwrap_or_else(|| format!("{} rows vs {}", a.len(), b.len()));
                sim.violation(format!(
                    "region {region}: node {id}'s state differs from node {first}'s at the same applied entry ({diff})"
                ));
            } else {
                checks += 1;
            }
        }
    }
    // Durability and completeness: every acknowledged manifest and blob, on every node.
    let (manifests, blobs) = {
        let m = sim.model.lock().expect("model lock");
        (m.manifests.clone(), m.blobs.clone())
    };
    for ((region, repo), ms) in &manifests {
        for id in &c.regions[*region] {
            for d in ms.keys() {
                match pull_until(sim, *id, repo, &Reference::Digest(d.clone()), deadline).await {
                    Ok(_) => checks += 1,
                    Err(e) => sim.violation(format!(
                        "acknowledged manifest {repo}@{d} is not served whole by node {id}: {e}"
                    )),
                }
            }
        }
    }
    for (region, repo, d) in &blobs {
        for id in &c.regions[*region] {
            let (r, d2) = (workload::parse_repo(repo), d.clone());
            let got = c
                .request(*id, move |reg| async move {
                    use registry_api::Registry;
                    reg.blob_content(AccountId::DEFAULT, &r, &d2).await
                })
                .await;
            match got {
                Ok(Ok(content)) if Digest::of(d.algorithm(), &content.bytes) == *d => checks += 1,
                Ok(Ok(_)) => sim.violation(format!(
                    "served corrupt bytes: node {id} served {repo}@{d} with bytes of another digest"
                )),
                Ok(Err(e)) => sim.violation(format!(
                    "acknowledged blob {repo}@{d} is not served by node {id}: {e}"
                )),
                Err(e) => sim.violation(format!("node {id}: {e}")),
            }
        }
    }
    // Every tag on every node points at a manifest whose blobs are all there.
    let keys = sim.model.lock().expect("model lock").keys();
    for (region, repo, tag) in &keys {
        for id in &c.regions[*region] {
            let reference = Reference::Tag(workload::parse_tag(tag));
            match pull_until(sim, *id, repo, &reference, deadline).await {
                Ok(_) => checks += 1,
                Err(PullError::Failed(e)) if e.contains("unknown") => checks += 1,
                Err(e) => sim.violation(format!(
                    "tag {repo}:{tag} on node {id} does not pull whole: {e}"
                )),
            }
        }
        // One last linearizable read of each tag joins the history.
        workload::final_strong_read(sim, *region, repo, tag).await;
    }
    // Linearizability of tag reads.
    let ops = sim.model.lock().expect("model lock").ops.clone();
    let (violations, passed) = history::check_registers(&ops);
    for v in violations {
        sim.violation(v.0);
    }
    checks += passed as u64;
    sim.count_checks(checks);
}

/// Traces every change of each node's view of its leader and term, for readable traces.
async fn watch_leaders(sim: Arc<Sim>) {
    let mut seen: BTreeMap<NodeId, (Option<NodeId>, u64, Option<u64>)> = BTreeMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        sim.watch.beat(sim.now_us() / 1000);
        for id in sim.cluster.regions.iter().flatten() {
            let Some(up) = sim.cluster.running(*id) else {
                seen.remove(id);
                continue;
            };
            let m = up.raft.metrics().borrow().clone();
            let now = (
                m.current_leader,
                m.current_term,
                m.snapshot.map(|s| s.index),
            );
            if seen.get(id) != Some(&now) {
                sim.trace(format!(
                    "node {id}: term {}, leader {:?}, snapshot at {:?}, applied {:?}",
                    now.1,
                    now.0,
                    now.2,
                    m.last_applied.map(|l| l.index)
                ));
                seen.insert(*id, now);
            }
        }
    }
}

/// How often the tag history is checked during the safety phase.
const HISTORY_CHECK_INTERVAL: Duration = Duration::from_secs(20);

/// Checks the tag history as it grows, so a stale read is reported when it happens.
async fn check_history_periodically(sim: Arc<Sim>) {
    while sim.faults_on() {
        tokio::time::sleep(HISTORY_CHECK_INTERVAL).await;
        let ops = sim.model.lock().expect("model lock").ops.clone();
        let (violations, _) = history::check_registers(&ops);
        for v in violations {
            sim.violation(v.0);
        }
    }
}

/// Pulls with retries until `deadline` (a follower may still be fetching a blob copy).
async fn pull_until(
    sim: &Arc<Sim>,
    id: NodeId,
    repo: &str,
    reference: &Reference,
    deadline: tokio::time::Instant,
) -> Result<Digest, PullError> {
    loop {
        match pull_verified(&sim.cluster, id, repo, reference).await {
            Err(PullError::Failed(e))
                if tokio::time::Instant::now() < deadline && !e.contains("unknown") =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = e;
            }
            other => return other,
        }
    }
}

type StateRow = (Cf, Vec<u8>, Vec<u8>);

/// Every state row (not the Raft log), in order: what every node of a region must hold alike
/// once it applied the same entries. All of `sm_meta` is state too (the HLC, the outbox
/// sequence, each destination's cursor and failure, the stats, the membership with its log
/// id) — each written by applying an entry, or by a snapshot install taken at an entry —
/// except the applied id itself: nodes are compared at the same applied entry, and a node
/// records it apart (the install writes the snapshot's, not the snapshot row's).
fn state_rows(kv: &dyn KvStore) -> Vec<StateRow> {
    let mut out = Vec::new();
    for cf in Cf::STATE {
        let mut start = Vec::new();
        loop {
            let rows = kv.scan(cf, b"", &start, 1024).unwrap_or_default();
            let full = rows.len() == 1024;
            if let Some((k, _)) = rows.last() {
                start = k.clone();
                start.push(0);
            }
            out.extend(
                rows.into_iter()
                    .filter(|(k, _)| !(cf == Cf::SmMeta && k == engine::keys::SM_LAST_APPLIED))
                    .map(|(k, v)| (cf, k, v)),
            );
            if !full {
                break;
            }
        }
    }
    out
}

fn show_row((cf, k, v): &StateRow) -> String {
    format!(
        "{}/{} ({} bytes: {})",
        cf.name(),
        String::from_utf8_lossy(k),
        v.len(),
        hex_prefix(v)
    )
}

fn hex_prefix(v: &[u8]) -> String {
    v.iter().take(24).map(|b| format!("{b:02x}")).collect()
}

/// A hash of every state row.
fn state_hash(kv: &dyn KvStore) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for (cf, k, v) in state_rows(kv) {
        h.update(cf.name().as_bytes());
        h.update(&(k.len() as u64).to_le_bytes());
        h.update(&k);
        h.update(&(v.len() as u64).to_le_bytes());
        h.update(&v);
    }
    h.finalize()
}

fn summarize(sim: &Arc<Sim>, simulated: Duration) -> Summary {
    let counters = sim.counters.lock().unwrap_or_else(PoisonError::into_inner);
    let mut ops = BTreeMap::new();
    let (mut ok, mut failed) = (0, 0);
    for ((kind, success), n) in &counters.ops {
        let e: &mut (u64, u64) = ops.entry(format!("{kind:?}")).or_default();
        if *success {
            e.0 += n;
            ok += n;
        } else {
            e.1 += n;
            failed += n;
        }
    }
    let net = sim.cluster.net.stats();
    let trace = sim.trace.lock().unwrap_or_else(PoisonError::into_inner);
    Summary {
        config: sim.config.clone(),
        simulated,
        wall: Duration::ZERO,
        ops_ok: ok,
        ops_failed: failed,
        ops,
        faults: counters
            .faults
            .iter()
            .map(|(k, n)| (format!("{k:?}"), *n))
            .collect(),
        checks: counters.checks,
        messages: net.messages,
        messages_lost: net.lost + net.cut,
        messages_duplicated: net.duplicated,
        trace_lines: trace.lines,
        trace_hash: trace.hasher.finalize().to_hex().to_string(),
        snapshots_installed: sim.cluster.snapshot_installs.load(Ordering::Relaxed),
        violations: sim
            .violations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
        trace_tail: trace.tail.iter().cloned().collect(),
    }
}
