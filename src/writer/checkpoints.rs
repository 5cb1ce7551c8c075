//! How often the checkpointer copies the WAL into the database file (SQLite).
//!
//! The checkpointer's passes run beside the writer, but while writes keep coming they never copy
//! the WAL to its very end, so the writer finishes the job itself once the WAL holds
//! `WRITER_CHECKPOINT_PAGES` (see mod.rs), inside a commit, and every write waits for it.
//!
//! Under `KV_SYNC=full` every commit has synced the WAL already: the writer's part is to copy the
//! frames since the checkpointer's last pass, and a pass every 100 ms is enough. Running passes
//! every 10 ms cost pure PUTs 12 to 23 % of their throughput there, since their syncs of the
//! database file queue with the commits' own.
//!
//! Under `normal`, commits do not sync the WAL, so a checkpoint syncs it first, and the writer's
//! checkpoint synced up to 100 ms of it: 10 to 25 ms during which every write waited (PUT p99
//! 13 ms, mixed 70/30 p99 11 ms, over 32 connections). So under `normal`, while the WAL grows
//! faster than `BUSY_WAL_FRAMES_PER_SECOND`, the checkpointer runs every 10 ms, and little is left
//! unsynced when the writer's turn comes; an idle or lightly written database is still checked
//! only every 100 ms. Measured in README "Concurrency".

use std::time::{Duration, Instant};

use crate::store::Store;

/// The wait between two passes while the WAL grows slowly, and under `KV_SYNC=full` always.
pub(super) const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);
/// The wait between two passes under `KV_SYNC=normal` while the WAL grows fast.
const BUSY_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(10);
/// WAL growth (4 KiB frames per second: 16 MiB/s) from which a `normal` WAL counts as fast-growing:
/// slower than that, 100 ms leave the writer at most ~1.6 MiB to sync.
const BUSY_WAL_FRAMES_PER_SECOND: u64 = 4096;

/// The checkpointer's memory of its last pass, for the choice of when to run the next.
pub(super) struct Pace {
    /// Every commit syncs the WAL (`KV_SYNC=full`).
    synced_at_commit: bool,
    /// Frames the WAL held at the last pass.
    frames: u64,
    /// When the last pass ran.
    at: Instant,
    /// The wait chosen after the last pass.
    interval: Duration,
}

impl Pace {
    pub(super) fn new(synced_at_commit: bool, now: Instant) -> Pace {
        Pace {
            synced_at_commit,
            frames: 0,
            at: now,
            interval: CHECKPOINT_INTERVAL,
        }
    }

    /// How long to wait for the next pass, after one at `now` that found `frames` frames in the WAL.
    pub(super) fn after(&mut self, frames: u64, now: Instant) -> Duration {
        let grown = frames.checked_sub(self.frames);
        let elapsed = now.saturating_duration_since(self.at);
        self.frames = frames;
        self.at = now;
        // Fewer frames than last time: the WAL started over at some moment since, which says
        // nothing of how fast it grows. The pace stays.
        let Some(grown) = grown else {
            return self.interval;
        };
        let fast = u128::from(grown) * 1_000_000
            >= u128::from(BUSY_WAL_FRAMES_PER_SECOND) * elapsed.as_micros();
        self.interval = if !self.synced_at_commit && grown > 0 && fast {
            BUSY_CHECKPOINT_INTERVAL
        } else {
            CHECKPOINT_INTERVAL
        };
        self.interval
    }
}

/// One pass of the checkpointer on its own connection; returns the wait before the next.
pub(super) fn pass(store: &Store, pace: &mut Pace) -> Duration {
    // The WAL's length is what it was as the pass began.
    let began = Instant::now();
    match store.checkpoint_passive() {
        Ok(frames) => pace.after(frames, began),
        Err(e) => {
            log::warn!("WAL checkpoint failed (it is retried): {e}");
            CHECKPOINT_INTERVAL
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sync;
    use crate::store::Sqlite;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_normal_wal_growing_fast_is_checkpointed_every_10_ms() {
        let t0 = Instant::now();
        let mut pace = Pace::new(false, t0);
        assert_eq!(pace.after(500, t0 + 100 * MS), BUSY_CHECKPOINT_INTERVAL);
        assert_eq!(pace.after(600, t0 + 110 * MS), BUSY_CHECKPOINT_INTERVAL);
        assert_eq!(
            pace.after(20, t0 + 120 * MS),
            BUSY_CHECKPOINT_INTERVAL,
            "started over: the pace stays"
        );
        assert_eq!(pace.after(80, t0 + 130 * MS), BUSY_CHECKPOINT_INTERVAL);
        assert_eq!(
            pace.after(0, t0 + 140 * MS),
            BUSY_CHECKPOINT_INTERVAL,
            "started over, nothing committed since: the pace stays"
        );
    }

    #[test]
    fn a_normal_wal_growing_slowly_or_not_at_all_waits_100_ms() {
        let t0 = Instant::now();
        let mut pace = Pace::new(false, t0);
        assert_eq!(
            pace.after(400, t0 + 100 * MS),
            CHECKPOINT_INTERVAL,
            "under 4096 frames per second"
        );
        assert_eq!(pace.after(400, t0 + 200 * MS), CHECKPOINT_INTERVAL);
        assert_eq!(
            pace.after(0, t0 + 300 * MS),
            CHECKPOINT_INTERVAL,
            "started over: the pace stays"
        );
        assert_eq!(
            pace.after(0, t0 + 300 * MS),
            CHECKPOINT_INTERVAL,
            "no time and no frames"
        );
    }

    #[test]
    fn the_pace_follows_the_rate_both_ways() {
        let t0 = Instant::now();
        let mut pace = Pace::new(false, t0);
        assert_eq!(pace.after(400, t0 + 100 * MS), CHECKPOINT_INTERVAL);
        assert_eq!(
            pace.after(4400, t0 + 200 * MS),
            BUSY_CHECKPOINT_INTERVAL,
            "40,000 frames per second"
        );
        assert_eq!(
            pace.after(4410, t0 + 210 * MS),
            CHECKPOINT_INTERVAL,
            "then 1,000"
        );
    }

    #[test]
    fn a_wal_synced_at_every_commit_waits_100_ms_however_fast_it_grows() {
        let t0 = Instant::now();
        let mut pace = Pace::new(true, t0);
        assert_eq!(pace.after(4000, t0 + 10 * MS), CHECKPOINT_INTERVAL);
        assert_eq!(pace.after(8000, t0 + 20 * MS), CHECKPOINT_INTERVAL);
    }

    /// A pass on a real database: fast after a burst of writes under `normal`, slow once the WAL
    /// stops growing, and slow under `full`.
    #[test]
    fn a_pass_paces_itself_by_what_the_wal_took_since_the_last() {
        for (sync, after_burst) in [
            (Sync::Normal, BUSY_CHECKPOINT_INTERVAL),
            (Sync::Full, CHECKPOINT_INTERVAL),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let sqlite = Sqlite::open_and_migrate(&dir.path().join("kv.sqlite3"), sync).unwrap();
            // Only the checkpointer copies the WAL here.
            sqlite.limit_wal(100_000, u64::MAX).unwrap();
            let value = format!("\"{}\"", "x".repeat(4000));
            let store = Store::from(sqlite);
            let checkpoints = store.reopen().unwrap();
            assert_eq!(checkpoints.syncs_wal_at_commit(), sync == Sync::Full);
            store.begin_write().unwrap();
            for i in 0..300u64 {
                store
                    .put("c", &format!("k{i}"), &value, i + 1, None)
                    .unwrap();
            }
            store.commit().unwrap();
            // Started just now, so its first pass sees 300 pages come at once.
            let mut pace = Pace::new(checkpoints.syncs_wal_at_commit(), Instant::now());
            assert_eq!(pass(&checkpoints, &mut pace), after_burst, "{sync}");
            assert_eq!(pass(&checkpoints, &mut pace), CHECKPOINT_INTERVAL, "{sync}");
        }
    }
}
