//! The node's runtime seams: task spawning, the RNG, and openraft's `AsyncRuntime`.
//!
//! Production runs on tokio with an entropy-seeded RNG per thread. The simulator runs every
//! node on one current-thread tokio runtime whose clock is paused (time advances only when
//! every task is idle, so timers are simulated time), seeds the RNG from its seed, and gives
//! each node a `TaskScope` so that a simulated crash can stop every task of that node.
//!
//! Owns: `spawn` (every task the node starts goes through it), `with_rng`/`new_id` (every
//! random number the node draws), `NodeRuntime` (what openraft uses for both).

use std::cell::RefCell;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::async_runtime::TokioOneShotSender;
use openraft::{AsyncRuntime, OptionalSend};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

thread_local! {
    static RNG: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Seeds this thread's RNG (the simulator does, once per run, before any node starts).
pub fn seed_thread_rng(seed: u64) {
    RNG.with(|r| *r.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

/// Runs `f` with this thread's RNG (seeded from the OS on first use unless seeded).
pub fn with_rng<R>(f: impl FnOnce(&mut StdRng) -> R) -> R {
    RNG.with(|r| {
        let mut r = r.borrow_mut();
        f(r.get_or_insert_with(StdRng::from_entropy))
    })
}

/// A fresh 128-bit id as 32 hex digits (upload sessions, temporary files).
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    with_rng(|r| r.fill_bytes(&mut b));
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The thread's RNG as a value, for openraft (election timeouts).
#[derive(Debug, Default, Clone, Copy)]
pub struct NodeRng;

impl RngCore for NodeRng {
    fn next_u32(&mut self) -> u32 {
        with_rng(|r| r.next_u32())
    }
    fn next_u64(&mut self) -> u64 {
        with_rng(|r| r.next_u64())
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        with_rng(|r| r.fill_bytes(dest))
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        with_rng(|r| r.try_fill_bytes(dest))
    }
}

/// Tasks started by one node, so that they can all be stopped at once (a simulated crash).
/// Finished tasks are pruned as new ones register, so the list stays bounded by the tasks
/// alive plus `SCOPE_PRUNE_AT`.
#[derive(Default)]
pub struct TaskScope {
    handles: Mutex<Vec<tokio::task::AbortHandle>>,
}

const SCOPE_PRUNE_AT: usize = 256;

impl TaskScope {
    fn register(&self, h: tokio::task::AbortHandle) {
        let mut g = self.handles.lock().expect("task scope lock");
        if g.len() >= SCOPE_PRUNE_AT {
            g.retain(|h| !h.is_finished());
        }
        g.push(h);
    }

    /// Stops every task of the scope at its next await point.
    pub fn abort_all(&self) {
        for h in self.handles.lock().expect("task scope lock").drain(..) {
            h.abort();
        }
    }

    /// Runs `fut` inside this scope: every task it spawns (through `spawn`) joins the scope.
    pub fn enter<F: Future>(self: &Arc<Self>, fut: F) -> impl Future<Output = F::Output> {
        SCOPE.scope(self.clone(), fut)
    }
}

tokio::task_local! {
    static SCOPE: Arc<TaskScope>;
}

/// Spawns a task; inside a `TaskScope` the task joins it (and so does what it spawns).
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    use tracing::Instrument;
    // The task carries on the spawner's span (the node it belongs to, in logs).
    let fut = fut.in_current_span();
    match SCOPE.try_with(|s| s.clone()) {
        Ok(scope) => spawn_in(&scope, fut),
        Err(_) => tokio::spawn(fut),
    }
}

/// Spawns a task as part of `scope` (the simulator runs a node's share of a peer exchange
/// this way, so that the node's crash stops it).
pub fn spawn_in<F>(scope: &Arc<TaskScope>, fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let h = tokio::spawn(SCOPE.scope(scope.clone(), fut));
    scope.register(h.abort_handle());
    h
}

/// openraft's runtime: tokio timers and channels, tasks through `spawn`, the RNG through
/// `with_rng`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NodeRuntime;

impl AsyncRuntime for NodeRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = tokio::time::Instant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = NodeRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        NodeRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(tx), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_ids_repeat() {
        seed_thread_rng(7);
        let a = (new_id(), new_id());
        seed_thread_rng(7);
        let b = (new_id(), new_id());
        assert_eq!(a, b);
        assert_ne!(a.0, a.1);
        assert_eq!(a.0.len(), 32);
    }

    #[tokio::test]
    async fn aborting_a_scope_stops_nested_tasks() {
        let scope = Arc::new(TaskScope::default());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        scope
            .enter(async move {
                spawn(async move {
                    spawn(async move {
                        let _tx = tx;
                        std::future::pending::<()>().await;
                    });
                });
            })
            .await;
        tokio::task::yield_now().await;
        scope.abort_all();
        // The inner task held the only sender: once it is aborted the channel closes.
        let closed = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(closed, Ok(None));
    }
}
