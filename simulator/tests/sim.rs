//! The simulator's own acceptance: runs are deterministic, a fixed sweep of seeds passes on
//! the real code, and each deliberately broken promise is caught by a sweep.

use std::time::Duration;

use simulator::faults::Intensity;
use simulator::{run, Bug, SimConfig, Summary};

fn config(seed: u64, regions: usize, secs: u64) -> SimConfig {
    SimConfig {
        seed,
        regions,
        nodes: 3,
        duration: Duration::from_secs(secs),
        faults: Intensity::Heavy,
        clients_per_region: 3,
        bug: None,
        verbose: false,
        ..SimConfig::new(seed)
    }
}

fn report(s: &Summary) -> String {
    format!("{s}\nreplay: {}", s.config.replay_command())
}

/// 20 seeds, each run twice: the same seed gives the same trace, bit for bit.
#[test]
fn same_seed_same_trace() {
    let mut hashes = std::collections::BTreeSet::new();
    for seed in 0..20 {
        let a = run(config(seed, 1, 8));
        let b = run(config(seed, 1, 8));
        assert_eq!(
            a.trace_hash,
            b.trace_hash,
            "seed {seed} is not deterministic:\n{}",
            report(&a)
        );
        assert!(a.trace_lines > 10, "seed {seed} did nothing:\n{a}");
        hashes.insert(a.trace_hash);
    }
    assert_eq!(hashes.len(), 20, "different seeds must give different runs");
}

/// The CI sweep: two regions of three nodes under heavy faults; every invariant holds and
/// the cluster makes progress.
#[test]
fn sweep_passes_on_the_real_code() {
    let mut ops = 0;
    let mut faults = 0;
    let mut installs = 0;
    let mut kinds = std::collections::BTreeMap::new();
    for seed in 100..110 {
        let s = run(config(seed, 2, 60));
        assert!(s.passed(), "{}", report(&s));
        assert!(s.checks > 0, "seed {seed} checked nothing:\n{s}");
        ops += s.ops_ok;
        faults += s.faults.values().sum::<u64>();
        installs += s.snapshots_installed;
        for (k, (ok, failed)) in &s.ops {
            *kinds.entry(k.clone()).or_insert(0) += ok + failed;
        }
    }
    assert!(
        installs > 0,
        "no follower installed a snapshot in the whole sweep"
    );
    for kind in ["DeleteManifest", "ResumeUpload"] {
        assert!(
            kinds.get(kind).copied().unwrap_or(0) > 0,
            "the sweep never did a {kind}: {kinds:?}"
        );
    }
    assert!(
        ops > 100,
        "the workload barely ran: {ops} successful operations"
    );
    assert!(faults > 20, "the nemesis barely struck: {faults} faults");
}

/// Seeds of the deep sweep when `PORTOLAN_SIM_DEEP_SEEDS` (`A..B`) does not name them: a
/// range no run used before, from the wall clock, so every CI run explores new schedules.
fn deep_seeds() -> std::ops::Range<u64> {
    if let Ok(r) = std::env::var("PORTOLAN_SIM_DEEP_SEEDS") {
        let (a, b) = r
            .split_once("..")
            .expect("PORTOLAN_SIM_DEEP_SEEDS looks like A..B");
        return a.parse().expect("a seed")..b.parse().expect("a seed");
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs();
    // Seconds since the epoch, times 1000: far from the fixed seeds and from each other run.
    let first = secs * 1000;
    first..first + DEEP_SWEEP_SEEDS
}

/// Fresh seeds at 600 simulated seconds per CI run: the depth at which a restarted leader's
/// stale read index showed up (seeds 2003 and 2009), which 60 s runs never reach.
const DEEP_SWEEP_SEEDS: u64 = 3;

/// One seed of the deep sweep: fresh each run, 600 s, 2 regions x 3 nodes, heavy faults. The
/// seed is printed first, so a failure is replayed with the command it prints. Each seed is
/// its own test, so they run side by side.
fn deep_sweep_seed(i: u64) {
    let seeds = deep_seeds();
    let seed = seeds.start + i;
    if seed >= seeds.end {
        println!(
            "deep sweep: seeds {}..{} leave out seed #{i}",
            seeds.start, seeds.end
        );
        return;
    }
    println!(
        "deep sweep: seed {seed} of {}..{} at 600 s (replay: cargo run --release -p simulator -- --seed {seed} --duration 600s)",
        seeds.start, seeds.end
    );
    let s = run(config(seed, 2, 600));
    assert!(s.passed(), "deep sweep seed {seed}:\n{}", report(&s));
    assert!(s.checks > 0, "seed {seed} checked nothing:\n{s}");
}

#[test]
fn deep_sweep_0() {
    deep_sweep_seed(0);
}

#[test]
fn deep_sweep_1() {
    deep_sweep_seed(1);
}

#[test]
fn deep_sweep_2() {
    deep_sweep_seed(2);
}

/// Runs that once failed, kept as regression cases (each must pass now).
#[test]
fn regression_seeds() {
    for (seed, secs, what) in [
        (
            3,
            40,
            "a node removed from its region kept forwarding writes it could never see",
        ),
        (
            105,
            30,
            "a write still in flight was missing from the tag history the check read",
        ),
        (
            6,
            300,
            "nodes were compared while the repair worker was still committing",
        ),
        (
            5,
            60,
            "a tag move whose manifest was deleted by digest before it shipped was skipped: the tag stayed in the other region",
        ),
        (
            106,
            60,
            "a region leader's Raft core quit on a disk failure and its replication worker spun",
        ),
    ] {
        let s = run(config(seed, 2, secs));
        assert!(s.passed(), "regression ({what}):\n{}", report(&s));
    }
}

/// A region loses power; its leader restarts holding its committed vote and is leader of its
/// old term at once, with the committed index it had saved unsynced — older than entries it
/// had acknowledged — and answered a linearizable read from before an acknowledged tag move.
/// Each seed at 600 s is its own test, so the two run side by side.
#[test]
fn regression_seed_2003_restarted_leader_read_index() {
    let s = run(config(2003, 2, 600));
    assert!(
        s.passed(),
        "regression (stale read after a leader restarted):\n{}",
        report(&s)
    );
}

/// The same stale read as seed 2003, on tag `t0` at ~560 s.
#[test]
fn regression_seed_2009_restarted_leader_read_index() {
    let s = run(config(2009, 2, 600));
    assert!(
        s.passed(),
        "regression (stale read after a leader restarted):\n{}",
        report(&s)
    );
}

/// Runs seeds until one fails; returns the failing summary.
fn first_failure(bug: Bug, seeds: std::ops::Range<u64>, secs: u64) -> Option<Summary> {
    for seed in seeds {
        let mut c = config(seed, 1, secs);
        // More clients: more requests in flight while the nemesis strikes.
        c.clients_per_region = 6;
        c.bug = Some(bug);
        let s = run(c);
        if !s.passed() {
            return Some(s);
        }
    }
    None
}

/// Acknowledging Raft appends before they are fsynced loses acknowledged pushes when a
/// region loses power; the sweep must catch it.
#[test]
fn sweep_catches_unsynced_raft_log() {
    let s = first_failure(Bug::UnsyncedLog, 0..10, 30)
        .expect("no seed of 0..10 caught a log that acknowledges unsynced appends");
    println!("{s}");
}

/// Acknowledging a push once quorum − 1 copies are durable leaves a blob on one node while
/// the others cannot take it; losing that node's blob volume then loses an acknowledged
/// push. The CI-length sweep (two regions of three nodes, 60 s) must catch it.
#[test]
fn sweep_catches_acks_before_a_write_quorum() {
    let mut caught = None;
    for seed in 0..10 {
        let mut c = config(seed, 2, 60);
        c.bug = Some(Bug::AckQuorumMinusOne);
        let s = run(c);
        if !s.passed() {
            caught = Some(s);
            break;
        }
    }
    let s = caught.expect("no seed of 0..10 caught pushes acknowledged before a write quorum");
    assert!(
        s.violations
            .iter()
            .any(|v| v.contains("acknowledged") || v.contains("does not pull whole")),
        "caught, but not as a lost acknowledged push: {:?}",
        s.violations
    );
    println!("{s}");
}

/// A region that drops the tag moves it receives from another region never converges; the
/// cross-region check must catch it.
#[test]
fn sweep_catches_lost_replicated_tag_moves() {
    let mut caught = None;
    for seed in 0..5 {
        let mut c = config(seed, 2, 20);
        c.bug = Some(Bug::LostReplicaTagMoves);
        let s = run(c);
        if !s.passed() {
            caught = Some(s);
            break;
        }
    }
    let s = caught.expect("no seed of 0..5 caught a region dropping replicated tag moves");
    assert!(
        s.violations.iter().any(|v| v.contains("no convergence")),
        "caught, but not as a convergence failure: {:?}",
        s.violations
    );
}

/// Without last-writer-wins, two regions moving one tag end on each other's push, and a
/// replicated delete loses to an older move; the cross-region check must catch it.
#[test]
fn sweep_catches_replicated_tag_moves_that_ignore_stamps() {
    let mut caught = None;
    for seed in 0..10 {
        let mut c = config(seed, 2, 30);
        c.bug = Some(Bug::ReplicaTagsAlwaysWin);
        let s = run(c);
        if !s.passed() {
            caught = Some(s);
            break;
        }
    }
    let s = caught.expect("no seed of 0..10 caught replicated tag moves that ignore stamps");
    assert!(
        s.violations.iter().any(|v| v.contains("no convergence")),
        "caught, but not as a convergence failure: {:?}",
        s.violations
    );
}

/// A deposed leader answering linearizable reads from its own state serves stale tags; the
/// register check must catch it.
#[test]
fn sweep_catches_stale_leader_reads() {
    let s = first_failure(Bug::StaleLeaderReads, 0..40, 30)
        .expect("no seed of 0..40 caught stale reads from a deposed leader");
    assert!(
        s.violations.iter().any(|v| v.contains("stale")),
        "caught, but not as a stale read: {:?}",
        s.violations
    );
    println!("{s}");
}

/// A task that spins without awaiting freezes the paused clock; the watchdog ends the run
/// with a violation within bounded wall time instead of hanging. A run past its wall-clock
/// limit ends the same way.
#[test]
fn watchdog_ends_runs_whose_time_stops_or_that_run_too_long() {
    let mut c = config(1, 1, 20);
    c.bug = Some(Bug::SpinningTask);
    c.stall_limit = Duration::from_secs(2);
    let s = run(c);
    assert!(
        s.violations
            .iter()
            .any(|v| v.contains("simulated time stopped")),
        "the spinning task went unnoticed:\n{s}"
    );
    assert!(s.wall < Duration::from_secs(30), "took {:?}:\n{s}", s.wall);

    // Ten simulated minutes take seconds; the watchdog looks every 200 ms.
    let mut c = config(1, 1, 600);
    c.wall_limit = Duration::from_millis(50);
    let s = run(c);
    assert!(
        s.violations.iter().any(|v| v.contains("wall-clock limit")),
        "the wall-clock limit went unnoticed:\n{s}"
    );
    assert!(s.wall < Duration::from_secs(10), "took {:?}:\n{s}", s.wall);
}

/// A panicking task is a violation with its message and location, not an unknown outcome.
#[test]
fn a_panicking_task_is_a_violation() {
    let mut c = config(2, 1, 6);
    c.bug = Some(Bug::PanickingTask);
    let s = run(c);
    assert!(
        s.violations
            .iter()
            .any(|v| v.contains("planted bug: a node task panics") && v.contains("cluster.rs")),
        "the panic went unnoticed:\n{s}"
    );
}

/// Printing the trace (`--trace`) does not change it: a replay reproduces the hash.
#[test]
fn a_traced_replay_has_the_same_hash() {
    let quiet = run(config(4, 1, 4));
    let mut c = config(4, 1, 4);
    c.verbose = true;
    let traced = run(c);
    assert_eq!(quiet.trace_hash, traced.trace_hash);
    assert_eq!(quiet.trace_lines, traced.trace_lines);
}
