//! The run's watchdog: every run ends with a verdict, whatever its tasks do.
//!
//! A run executes on a thread of its own (the simulation thread: one current-thread tokio
//! runtime with a paused clock); the caller's thread watches it through a `Watch`:
//! - simulated time must advance. The paused clock moves only when every task waits, so a
//!   task that spins without awaiting freezes it (and hangs `block_on` forever). The run
//!   publishes its simulated time (`Watch::beat`, from every trace line and from
//!   `watch_leaders`' 50 ms tick); if the value stays still for `SimConfig::stall_limit` of
//!   wall time, the run ends with a violation;
//! - the run ends within `SimConfig::wall_limit` of wall time.
//!
//! To end a run, the watcher raises `Cluster::abandoned` (planted spinners poll it), wakes `stop`
//! (which `run` selects on beside the simulation: enough when the spinning task yields now
//! and then), waits `STOP_GRACE`, and reports from the shared `Sim` what the run saw so far.
//! A task that never awaits cannot be preempted on a current-thread runtime: if the
//! simulation thread does not stop within the grace, it is detached. It keeps its core until
//! the process exits, and the caller has its verdict anyway. The report reads the `Sim`'s
//! own locks, which no simulator code holds across an await or a loop.
//!
//! Panics: a panic hook (installed once per process, chaining to the hook it replaces)
//! records every panic raised on a simulation thread — in a node task, a client, a check —
//! into that run's `Watch` with its message and location, and each becomes a violation.
//! Without it tokio turns a panicking task into a `JoinError`, which the clients read as a
//! crash of the node serving them (an outcome unknown, not a failure).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::Sim;

/// How long the watcher waits for a stopped simulation thread before detaching it.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the watcher looks at the run.
const POLL: Duration = Duration::from_millis(200);
/// Panics recorded per run at most (one panic often poisons a lock and others follow).
const PANICS_MAX: usize = 10;

/// What the simulation thread and its watcher share.
#[derive(Default)]
pub struct Watch {
    /// Simulated milliseconds since the start, as last published.
    sim_ms: AtomicU64,
    /// Woken when the watcher gives up: `run` stops the simulation if it can.
    pub stop: tokio::sync::Notify,
    /// The run's state, once it exists (for a report on a run that did not finish). Taken
    /// by `run` at the end: the `Sim` holds this `Watch`, and the cycle must not outlive it.
    pub sim: Mutex<Option<Arc<Sim>>>,
    panics: Mutex<Vec<String>>,
}

impl Watch {
    /// Publishes the simulated time.
    pub fn beat(&self, sim_ms: u64) {
        self.sim_ms.fetch_max(sim_ms, Ordering::Relaxed);
    }

    /// Gives up on the run: stops the simulation if its tasks let it, and tells planted
    /// spinners (`Cluster::abandoned`) to stop.
    pub fn give_up(&self) {
        if let Some(sim) = self
            .sim
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            sim.cluster.abandoned.store(true, Ordering::Relaxed);
        }
        self.stop.notify_one();
    }

    pub fn sim_ms(&self) -> u64 {
        self.sim_ms.load(Ordering::Relaxed)
    }

    /// The panics recorded so far, as violations.
    pub fn panics(&self) -> Vec<String> {
        self.panics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn record_panic(&self, what: String) {
        // `try_lock`: a panic raised while this very thread holds the lock must not deadlock.
        if let Ok(mut p) = self.panics.try_lock() {
            if p.len() < PANICS_MAX {
                p.push(what);
            }
        }
    }
}

thread_local! {
    /// The watch of the run this thread simulates, if it is a simulation thread.
    static RUN: RefCell<Option<Arc<Watch>>> = const { RefCell::new(None) };
}

/// Marks this thread as `watch`'s simulation thread: its panics become that run's violations.
pub fn record_panics_here(watch: Arc<Watch>) {
    install_hook();
    RUN.with(|r| *r.borrow_mut() = Some(watch));
}

fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let watch = RUN
                .try_with(|r| r.try_borrow().ok().and_then(|w| w.clone()))
                .ok()
                .flatten();
            if let Some(w) = watch {
                let payload = info.payload();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(a non-text payload)".to_string());
                let location = info
                    .location()
                    .map_or_else(|| "an unknown location".to_string(), |l| l.to_string());
                w.record_panic(format!(
                    "panic at {location} near {} ms simulated: {message}",
                    w.sim_ms()
                ));
            }
            previous(info);
        }));
    });
}

/// Why the watcher gave up on a run.
pub enum Verdict {
    /// The run ended on its own.
    Finished(Box<crate::Summary>),
    /// The simulation thread ended without a summary (it panicked outside any task).
    Died,
    /// The watcher gave up: the violation to report.
    GaveUp(String),
}

/// Waits for the run's summary on `rx`, giving up when simulated time stops advancing for
/// `stall_limit` or the run exceeds `wall_limit` (both wall-clock).
pub fn watch(
    w: &Watch,
    rx: &std::sync::mpsc::Receiver<Option<crate::Summary>>,
    stall_limit: Duration,
    wall_limit: Duration,
) -> Verdict {
    let started = std::time::Instant::now();
    let mut last = (w.sim_ms(), std::time::Instant::now());
    loop {
        match rx.recv_timeout(POLL) {
            Ok(Some(s)) => return Verdict::Finished(Box::new(s)),
            Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Verdict::Died
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        let now = w.sim_ms();
        if now != last.0 {
            last = (now, std::time::Instant::now());
        } else if last.1.elapsed() >= stall_limit {
            return Verdict::GaveUp(format!(
                "simulated time stopped at {now} ms for {} s of wall time (a task spins without awaiting)",
                stall_limit.as_secs_f64()
            ));
        }
        if started.elapsed() >= wall_limit {
            return Verdict::GaveUp(format!(
                "the run exceeded its wall-clock limit of {} s (simulated time at {now} ms)",
                wall_limit.as_secs_f64()
            ));
        }
    }
}
