//! The PostgreSQL schema: SQLite's tables (see `sqlite/schema.rs` for why each exists) with
//! PostgreSQL's types. Keys and collection names compare byte-wise (`COLLATE "C"`), as in SQLite,
//! so lists, prefixes and cursors come out in the same order on both backends. Values stay the
//! JSON text the client sent (`text`, not `jsonb`, which would reformat it).
//!
//! Migrations run in one transaction that first locks the row of `kv_schema`, so nodes that start
//! at once migrate once: the others wait, then find the schema current.

use postgres::error::SqlState;

use super::Postgres;

/// The schema, one entry per version: entry N takes `kv_schema.version` from N to N+1.
/// Never edit or reorder an entry; append a new one.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: the whole model of SQLite's schema version 5.
    r#"CREATE TABLE kv (
        collection text COLLATE "C" NOT NULL,
        key text COLLATE "C" NOT NULL,
        value text NOT NULL,
        updated_at bigint NOT NULL,
        rev bigint NOT NULL,
        expires_at bigint,
        PRIMARY KEY (collection, key)
    );
    CREATE INDEX kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE collections (
        name text COLLATE "C" NOT NULL PRIMARY KEY,
        count bigint NOT NULL,
        rev bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE changes (
        rev bigint PRIMARY KEY,
        collection text COLLATE "C" NOT NULL,
        key text COLLATE "C" NOT NULL
    );
    CREATE INDEX changes_by_collection ON changes (collection, rev);
    CREATE TABLE tombstones (
        rev bigint PRIMARY KEY,
        collection text COLLATE "C" NOT NULL,
        key text COLLATE "C" NOT NULL,
        kind smallint NOT NULL,
        deleted_at bigint NOT NULL,
        UNIQUE (collection, key)
    );
    CREATE TABLE meta (name text PRIMARY KEY, value bigint NOT NULL);
    INSERT INTO meta (name, value) VALUES ('revision', 0), ('compacted_rev', 0);
    CREATE FUNCTION kv_counted_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO collections (name, count) VALUES (NEW.collection, 1)
        ON CONFLICT (name) DO UPDATE SET count = collections.count + 1;
        DELETE FROM tombstones WHERE collection = NEW.collection AND key = NEW.key;
        RETURN NULL;
    END $$;
    CREATE TRIGGER kv_counted_insert AFTER INSERT ON kv
        FOR EACH ROW EXECUTE FUNCTION kv_counted_insert();
    CREATE FUNCTION kv_counted_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE collections SET count = count - 1 WHERE name = OLD.collection;
        RETURN NULL;
    END $$;
    CREATE TRIGGER kv_counted_delete AFTER DELETE ON kv
        FOR EACH ROW EXECUTE FUNCTION kv_counted_delete();"#,
];

impl Postgres {
    /// Brings the schema up to date; refuses a database made by a newer kv.
    pub fn migrate(&mut self) -> Result<(), String> {
        let failed = |e: postgres::Error| super::describe(&e);
        // Nodes starting at once may race to create the version table: the loser sees it exists.
        for attempt in 0.. {
            match self.control(
                "CREATE TABLE IF NOT EXISTS kv_schema (id int PRIMARY KEY CHECK (id = 1), version int NOT NULL);
                 INSERT INTO kv_schema (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
            ) {
                Ok(()) => break,
                Err(e)
                    if attempt < 3
                        && e.code().is_some_and(|c| {
                            // The loser of the race on the table's row type says so in one
                            // of these ways, depending on where it lost.
                            [
                                SqlState::UNIQUE_VIOLATION,
                                SqlState::DUPLICATE_TABLE,
                                SqlState::DUPLICATE_OBJECT,
                            ]
                            .contains(c)
                        }) => {}
                Err(e) => return Err(failed(e)),
            }
        }
        self.control("BEGIN").map_err(failed)?;
        self.in_transaction.set(true);
        let migrated = self.migrate_locked();
        let ended = if migrated.is_ok() {
            self.commit().map_err(failed)
        } else {
            self.rollback().map_err(failed)
        };
        migrated.and(ended)
    }

    fn migrate_locked(&self) -> Result<(), String> {
        let failed = |e: postgres::Error| super::describe(&e);
        let version: i32 = self
            .query_one("SELECT version FROM kv_schema WHERE id = 1 FOR UPDATE", &[])
            .map_err(failed)?
            .get(0);
        let version = usize::try_from(version)
            .map_err(|_| "the database has a negative schema version".to_string())?;
        if version > MIGRATIONS.len() {
            return Err(format!(
                "the database has schema version {version}, newer than this kv knows ({}); \
                 refusing to touch it (run the newer kv)",
                MIGRATIONS.len()
            ));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            log::info!("migrating the database to schema version {}", i + 1);
            self.control(sql).map_err(|e| {
                format!(
                    "migration to schema version {} failed: {}",
                    i + 1,
                    failed(e)
                )
            })?;
        }
        self.execute(
            "UPDATE kv_schema SET version = $1 WHERE id = 1",
            &[&(MIGRATIONS.len() as i32)],
        )
        .map_err(failed)?;
        Ok(())
    }
}
