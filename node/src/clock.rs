//! Wall-clock time for stamping commands. The engine never reads the clock; the node stamps
//! every command it proposes, so replicas apply the same time.
//!
//! `Clock` is the seam: production reads the system clock, the simulator derives time from
//! its simulated clock (with a per-node skew).

use std::time::{SystemTime, UNIX_EPOCH};

/// Where a node reads wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        now_ms()
    }
}

/// Milliseconds since the Unix epoch from the system clock (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
