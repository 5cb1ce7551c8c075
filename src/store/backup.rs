//! Whole-database copies: a consistent online backup (`VACUUM INTO` from a read snapshot, so the
//! live file is never copied as it changes), the checks a backup must pass before it is restored,
//! the restore itself, and the lock that tells a restore a kv is running on the directory.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, params};

use super::sqlite::schema::MIGRATIONS;
use super::{Database, Sqlite, Store};

/// The lock file in the data directory; a running kv holds an exclusive `flock` on it.
const LOCK_FILE: &str = "kv.lock";
/// Where `restore` moves the database it replaces.
const BEFORE_RESTORE_SUFFIX: &str = ".before-restore";

/// The data directory's lock, held for as long as this value lives.
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of `dir`, or says that another kv holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock, String> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open the lock file {}: {e}", path.display()))?;
        // SAFETY: flock on a file descriptor this function owns; it only sets an advisory lock.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            return Err(format!(
                "another kv is running on {} (it holds {})",
                dir.display(),
                path.display()
            ));
        }
        Ok(DirLock { _file: file })
    }
}

/// A file that is deleted when this value is dropped.
#[derive(Debug)]
pub struct TempFile(PathBuf);

impl TempFile {
    /// A fresh name in `dir` (nothing is created yet).
    pub fn new_in(dir: &Path, stem: &str) -> TempFile {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TempFile(dir.join(format!(".{stem}-{}-{n}.tmp", std::process::id())))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

impl Sqlite {
    /// Writes a consistent copy of the whole database to `target` (which must not exist), from
    /// one read snapshot, while writes go on.
    pub fn backup_into(&self, target: &Path) -> Result<(), rusqlite::Error> {
        let target = target
            .to_str()
            .ok_or_else(|| rusqlite::Error::InvalidPath(target.to_path_buf()))?;
        self.conn.execute("VACUUM INTO ?1", params![target])?;
        Ok(())
    }

    /// The directory the database file is in.
    pub fn directory(&self) -> PathBuf {
        self.conn
            .path()
            .and_then(|p| Path::new(p).parent())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }
}

/// `kv backup`: copies the database (in use by a running kv or not) to `out` as a SQLite file,
/// which appears only once complete. Returns its size.
pub fn backup(db: &Database, out: &Path) -> Result<u64, String> {
    match db {
        Database::Sqlite { file, .. } if !file.is_file() => {
            return Err(format!("there is no database at {}", file.display()));
        }
        _ => {}
    }
    if out.exists() {
        return Err(format!(
            "{} exists already; kv will not overwrite it",
            out.display()
        ));
    }
    let store = Store::open(db).map_err(|e| format!("cannot open {db}: {e}"))?;
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let partial = TempFile::new_in(dir, "kv-backup");
    store
        .backup_into(partial.path())
        .map_err(|e| format!("cannot write the backup: {e}"))?;
    File::open(partial.path())
        .and_then(|f| f.sync_all())
        .and_then(|()| fs::rename(partial.path(), out))
        .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    fs::metadata(out)
        .map(|m| m.len())
        .map_err(|e| format!("cannot read {}: {e}", out.display()))
}

/// Checks that `file` is a sound kv database this kv can use: SQLite's integrity check passes
/// and the schema version is one kv knows.
pub fn check(file: &Path) -> Result<(), String> {
    let bad = |why: String| format!("{} is not a sound kv database: {why}", file.display());
    let conn = Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| bad(e.to_string()))?;
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .map_err(|e| bad(e.to_string()))?;
    if integrity != "ok" {
        return Err(bad(format!("integrity check: {integrity}")));
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|e| bad(e.to_string()))?;
    let has_objects: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = 'kv'",
            [],
            |row| row.get(0),
        )
        .map_err(|e| bad(e.to_string()))?;
    if version < 1 || !has_objects {
        return Err(bad("it has no kv schema".into()));
    }
    if version as usize > MIGRATIONS.len() {
        return Err(bad(format!(
            "its schema version {version} is newer than this kv knows ({})",
            MIGRATIONS.len()
        )));
    }
    Ok(())
}

/// `kv restore`: puts the backup `from` in place of the database `db_file`, moving the existing
/// one aside (never deleting it). Refuses while a kv runs on the directory, and leaves everything
/// as it was when `from` is not a sound kv database.
pub fn restore(db_file: &Path, from: &Path) -> Result<PathBuf, String> {
    let dir = db_file.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create the data directory {}: {e}", dir.display()))?;
    let _lock = DirLock::acquire(dir).map_err(|e| format!("refusing to restore: {e}"))?;
    check(from)?;
    let aside = PathBuf::from(format!("{}{BEFORE_RESTORE_SUFFIX}", db_file.display()));
    let incoming = TempFile::new_in(dir, "kv-restore");
    fs::copy(from, incoming.path())
        .and_then(|_| File::open(incoming.path()))
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("cannot copy {} into {}: {e}", from.display(), dir.display()))?;
    if db_file.exists() {
        if aside.exists() {
            return Err(format!(
                "{} exists from an earlier restore; move it away first",
                aside.display()
            ));
        }
        // The WAL holds commits not yet in the main file: it moves with it.
        for suffix in ["", "-wal"] {
            let file = PathBuf::from(format!("{}{suffix}", db_file.display()));
            if file.exists() {
                let to = PathBuf::from(format!("{}{suffix}", aside.display()));
                fs::rename(&file, &to)
                    .map_err(|e| format!("cannot move {} aside: {e}", file.display()))?;
            }
        }
        let _ = fs::remove_file(format!("{}-shm", db_file.display()));
    }
    fs::rename(incoming.path(), db_file)
        .map_err(|e| format!("cannot put the backup in place: {e}"))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::tests::store;

    #[test]
    fn a_backup_restores_to_the_same_data_and_the_old_database_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        s.put("c", "k", "1", 1, None).unwrap();
        s.set_revision(1).unwrap();
        let out = dir.path().join("backup.sqlite3");
        let db = Database::Sqlite {
            file: dir.path().join("kv.sqlite3"),
            sync: crate::config::Sync::Full,
        };
        let bytes = backup(&db, &out).unwrap();
        assert!(bytes > 0);
        assert!(backup(&db, &out).is_err(), "never overwrites");
        check(&out).unwrap();
        s.put("c", "k", "2", 2, None).unwrap();
        drop(s);
        let target = tempfile::tempdir().unwrap();
        let db = target.path().join("kv.sqlite3");
        std::fs::write(&db, b"").unwrap();
        let aside = restore(&db, &out).unwrap();
        assert!(aside.exists(), "the database it replaced is kept");
        let restored = Sqlite::open(&db, crate::config::Sync::Full).unwrap();
        assert_eq!(restored.get("c", "k").unwrap().as_deref(), Some("1"));
        assert_eq!(restored.revision().unwrap(), 1);
    }

    #[test]
    fn restore_refuses_an_unsound_file_and_a_running_kv() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("kv.sqlite3");
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![b'x'; 4096]).unwrap();
        assert!(
            restore(&db, &junk)
                .unwrap_err()
                .contains("not a sound kv database")
        );
        assert!(!db.exists(), "nothing changed");
        let empty = dir.path().join("empty.sqlite3");
        Connection::open(&empty)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        assert!(restore(&db, &empty).unwrap_err().contains("no kv schema"));
        let _running = DirLock::acquire(dir.path()).unwrap();
        let err = restore(&db, &junk).unwrap_err();
        assert!(err.contains("another kv is running"), "{err}");
    }
}
