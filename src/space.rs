//! Room to write: the storage quota (`KV_MAX_DB_BYTES`), what happens when the disk is full, and
//! the state `/ready` reports.
//!
//! A full disk must not stop deletes, or nobody could free space through the API. So kv keeps a
//! small reserve file in the data directory. When SQLite reports the disk full, kv gives the
//! reserve up, which leaves room for the WAL frames of deletes and for checkpoints, and refuses
//! writes that add data (507 `storage_full`) until the file system has room again; a background
//! check then takes the reserve back and lets writes through. Nothing acknowledged is lost on the
//! way: a failed commit rolls back and its writers hear 507.

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::Error;

/// The reserve kept in the data directory while the disk has room.
const RESERVE_FILE: &str = "kv.reserve";
/// Its size: enough for the WAL of many deletes and a checkpoint's bookkeeping.
const RESERVE_BYTES: u64 = 8 * 1024 * 1024;
/// Free bytes on the file system, besides the reserve, before writes are let through again.
const RESUME_FREE_BYTES: u64 = 2 * RESERVE_BYTES;

/// The shared state of the room to write.
pub struct Space {
    reserve: PathBuf,
    full: AtomicBool,
    /// The last write that asked was refused for the quota.
    over_quota: AtomicBool,
    /// Bytes of database pages in use (free pages left by deletes not counted), after the last
    /// commit.
    used_bytes: AtomicU64,
    max_bytes: Option<u64>,
}

impl Space {
    /// The state for the data directory `dir`, with the quota `max_bytes`; takes the reserve.
    pub fn new(dir: &Path, used_bytes: u64, max_bytes: Option<u64>) -> Space {
        let space = Space {
            reserve: dir.join(RESERVE_FILE),
            full: AtomicBool::new(false),
            over_quota: AtomicBool::new(false),
            used_bytes: AtomicU64::new(used_bytes),
            max_bytes,
        };
        if let Err(e) = allocate(&space.reserve, RESERVE_BYTES) {
            log::warn!(
                "the disk is full: cannot keep a reserve ({e}); refusing writes until it has room"
            );
            space.full.store(true, Ordering::SeqCst);
        }
        space
    }

    /// Whether a write that adds about `bytes` may go ahead; deletes never ask.
    pub fn admit(&self, bytes: u64) -> Result<(), Error> {
        if self.full.load(Ordering::SeqCst) {
            return Err(Error::StorageFull);
        }
        let over = self
            .max_bytes
            .filter(|&max| self.used_bytes.load(Ordering::SeqCst).saturating_add(bytes) > max);
        self.over_quota.store(over.is_some(), Ordering::SeqCst);
        match over {
            Some(max) => Err(Error::QuotaExceeded { max_bytes: max }),
            None => Ok(()),
        }
    }

    /// SQLite said the disk is full: give the reserve up so deletes and checkpoints can proceed.
    pub fn disk_full(&self) {
        if !self.full.swap(true, Ordering::SeqCst) {
            log::error!("the disk is full: giving up the reserve, refusing writes that add data");
            if let Err(e) = fs::remove_file(&self.reserve) {
                log::warn!("cannot remove the reserve {}: {e}", self.reserve.display());
            }
        }
    }

    /// While full, checks whether the file system has room again; if so takes the reserve back
    /// and lets writes through. Called every second or so.
    pub fn recover(&self) {
        if !self.full.load(Ordering::SeqCst) {
            return;
        }
        let dir = self.reserve.parent().unwrap_or(Path::new("."));
        match free_bytes(dir) {
            Ok(free) if free >= RESUME_FREE_BYTES + RESERVE_BYTES => {
                match allocate(&self.reserve, RESERVE_BYTES) {
                    Ok(()) => {
                        self.full.store(false, Ordering::SeqCst);
                        log::info!("the disk has room again: writes resume");
                    }
                    Err(e) => log::warn!("cannot take the reserve back yet: {e}"),
                }
            }
            Ok(_) => {}
            Err(e) => log::warn!("cannot read the free space of {}: {e}", dir.display()),
        }
    }

    /// Records the bytes in use after a commit.
    pub fn set_used(&self, bytes: u64) {
        self.used_bytes.store(bytes, Ordering::SeqCst);
    }

    /// Bytes of database pages in use.
    pub fn used(&self) -> u64 {
        self.used_bytes.load(Ordering::SeqCst)
    }

    /// The quota, if any.
    pub fn max(&self) -> Option<u64> {
        self.max_bytes
    }

    /// Why writes are refused now, if they are: `storage_full` (from the first write refused for
    /// lack of space until the disk has room) or `quota_exceeded` (from a write refused for the
    /// quota until one is let through).
    pub fn refusal(&self) -> Option<&'static str> {
        if self.full.load(Ordering::SeqCst) {
            Some("storage_full")
        } else if self.over_quota.load(Ordering::SeqCst) {
            Some("quota_exceeded")
        } else {
            None
        }
    }
}

/// Creates `path` with `bytes` really allocated (not a sparse file).
fn allocate(path: &Path, bytes: u64) -> std::io::Result<()> {
    let file = File::create(path)?;
    let len = libc::off_t::try_from(bytes).map_err(std::io::Error::other)?;
    // SAFETY: posix_fallocate on a file descriptor this function owns.
    let err = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if err != 0 {
        drop(file);
        let _ = fs::remove_file(path);
        return Err(std::io::Error::from_raw_os_error(err));
    }
    file.sync_all()
}

/// Bytes available to an unprivileged writer on the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statvfs writes into the zeroed struct it is given; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail * stat.f_frsize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quota_refuses_writes_that_would_pass_it() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(dir.path(), 900, Some(1000));
        assert!(dir.path().join(RESERVE_FILE).exists());
        assert!(space.admit(100).is_ok());
        assert!(matches!(
            space.admit(101),
            Err(Error::QuotaExceeded { max_bytes: 1000 })
        ));
        assert_eq!(space.refusal(), Some("quota_exceeded"));
        assert!(space.admit(0).is_ok(), "a write within the quota");
        assert_eq!(space.refusal(), None);
    }

    #[test]
    fn a_full_disk_gives_up_the_reserve_until_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(dir.path(), 0, None);
        space.disk_full();
        assert!(!dir.path().join(RESERVE_FILE).exists());
        assert!(matches!(space.admit(1), Err(Error::StorageFull)));
        assert_eq!(space.refusal(), Some("storage_full"));
        // This temporary directory's file system has room: the reserve comes back.
        space.recover();
        assert!(dir.path().join(RESERVE_FILE).exists());
        assert!(space.admit(1).is_ok());
    }
}
