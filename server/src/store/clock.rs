//! The time a shard has been running: a monotonic clock that does not move
//! while the process is stopped (SIGSTOP, a paused VM, a machine too busy to
//! schedule it). Leases, step deadlines and round deadlines are measured on
//! it, so a shard never holds against a worker the time it was not running
//! itself: when it resumes, every lease has the time left it had when the
//! shard stopped, and the heartbeats that queued up meanwhile renew them.
//!
//! A ticker thread looks at the system's monotonic clock every
//! [`TICK`]; any look (the ticker's or a caller's) that finds more than
//! [`STALL`] since the last one counts the excess as time the process did
//! not run, so the first code to run after a stop accounts for it before it
//! judges any lease.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often the ticker looks.
pub const TICK: Duration = Duration::from_millis(20);

/// A gap between two looks longer than this is time the process did not run
/// (scheduling jitter on a busy machine stays well under it).
pub const STALL: Duration = Duration::from_millis(250);

struct Clock {
    /// The system clock at the last look, and the stalls counted so far.
    state: Mutex<(Instant, Duration)>,
}

impl Clock {
    fn look(&self) -> Instant {
        let raw = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (last, stalled) = &mut *state;
        let gap = raw.saturating_duration_since(*last);
        if gap > STALL {
            let missed = gap - TICK;
            *stalled += missed;
            tracing::warn!(
                stalled_ms = missed.as_millis() as u64,
                "this shard did not run for a while; leases and deadlines are extended by that time"
            );
        }
        *last = raw.max(*last);
        raw.checked_sub(*stalled).unwrap_or(raw)
    }
}

fn clock() -> &'static Clock {
    static CLOCK: OnceLock<Clock> = OnceLock::new();
    CLOCK.get_or_init(|| {
        std::thread::Builder::new()
            .name("awake-clock".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(TICK);
                    clock().look();
                }
            })
            .expect("starting the clock's ticker");
        Clock { state: Mutex::new((Instant::now(), Duration::ZERO)) }
    })
}

/// Now, on the clock that stands still while the process does not run.
pub fn now() -> Instant {
    clock().look()
}

/// Time the process has been running since `since` (a [`now`] reading).
pub fn since(since: Instant) -> Duration {
    now().saturating_duration_since(since)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_longer_than_a_stall_does_not_count_and_ordinary_time_does() {
        let clock = Clock { state: Mutex::new((Instant::now(), Duration::ZERO)) };
        let start = clock.look();
        std::thread::sleep(Duration::from_millis(60));
        let ordinary = clock.look().saturating_duration_since(start);
        assert!(ordinary >= Duration::from_millis(60), "time under the stall threshold counts: {ordinary:?}");
        // Nothing looks for 600 ms, as when the whole process is stopped.
        std::thread::sleep(Duration::from_millis(600));
        let after = clock.look().saturating_duration_since(start);
        assert!(after < Duration::from_millis(200), "a stopped process's time does not count: {after:?}");
        std::thread::sleep(Duration::from_millis(100));
        let later = clock.look().saturating_duration_since(start);
        assert!(later >= after + Duration::from_millis(100), "time runs on after the stall: {later:?} after {after:?}");
    }
}
