//! Running a group again after PostgreSQL lost a race or the connection: how often, and how long
//! to wait in between.

use std::thread;
use std::time::Duration;

use crate::error::Error;

/// Times a group runs again after PostgreSQL lost a race (serialization failure, deadlock) or
/// the connection; then its writes get 503.
const MAX_RETRIES: u32 = 8;

/// The retries of one group, each after a jittered backoff doubling from 4 ms up to 200 ms
/// (about a second in all), so nodes that collided do not collide again in step.
#[derive(Default)]
pub(super) struct Retries {
    done: u32,
}

impl Retries {
    /// Whether to run the group again after `e` (having waited), or give up on it.
    pub(super) fn again(&mut self, e: &Error) -> bool {
        let retryable = match e {
            Error::DatabaseUnavailable(_) => true,
            Error::Storage(db) => db.is_transient(),
            _ => false,
        };
        if !retryable || self.done >= MAX_RETRIES {
            return false;
        }
        self.done += 1;
        log::debug!("write transaction retried ({}): {e}", self.done);
        let ceiling = (2u64 << self.done).min(200);
        thread::sleep(Duration::from_millis(jitter(ceiling).max(1)));
        true
    }
}

/// A pseudo-random number in `0..=max` (xorshift; backoff and test delays need no better).
pub(super) fn jitter(max: u64) -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64)
                | 1,
        );
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x % (max + 1)
    })
}
