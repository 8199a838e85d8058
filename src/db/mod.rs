//! Storage: one connection type over SQLite and PostgreSQL, the pool, embedded migrations, and one
//! module of query functions per aggregate. Nothing outside `db` writes diesel queries.
//!
//! The backend is chosen by the URL: `postgres://…`/`postgresql://…` is PostgreSQL, anything else
//! (`sqlite://file`, a plain path, `:memory:`) is an SQLite file.

pub mod answers;
pub mod api_keys;
pub mod assignments;
pub mod audit;
pub mod candidates;
pub mod evaluations;
pub mod events;
pub mod group;
pub mod leases;
pub mod messages;
pub mod models;
pub mod participants;
pub mod provenance;
pub mod ratings;
pub mod researchers;
pub mod revisions;
pub mod rewards;
pub mod rollouts;
pub mod schema;
pub mod secrets;
pub mod sessions;
pub mod studies;
pub mod synth_turns;
pub mod vocab;

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use diesel::sqlite::SqliteConnection;
use diesel::Connection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

/// One connection to whichever backend the URL names.
#[derive(diesel::MultiConnection)]
pub enum DbConn {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

pub type DbPool = Pool<ConnectionManager<DbConn>>;
pub type PooledConn = diesel::r2d2::PooledConnection<ConnectionManager<DbConn>>;

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// How long an SQLite writer waits for another writer before giving up.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 10_000;
/// How long a request waits for a free pooled connection.
const POOL_TIMEOUT_SECS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error(
        "cannot connect to the database {url}: {reason}. Check that the server is running and the \
         URL (--database-url / COLLABLLM_DATABASE_URL) is right."
    )]
    Connect { url: String, reason: String },
    #[error("cannot apply the database migrations: {0}")]
    Migration(String),
    #[error("no database connection: {0}")]
    NoConnection(String),
    #[error("{0}")]
    Invalid(String),
}

pub type DbResult<T> = Result<T, DbError>;

impl DbConn {
    pub fn backend(&self) -> Backend {
        match self {
            DbConn::Sqlite(_) => Backend::Sqlite,
            DbConn::Postgres(_) => Backend::Postgres,
        }
    }
}

/// A connection from the pool, or why there is none (the database is down or every pooled
/// connection stayed busy).
pub fn connection(pool: &DbPool) -> DbResult<PooledConn> {
    pool.get().map_err(|e| DbError::NoConnection(e.to_string()))
}

/// Which backend a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Backend {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }
}

/// The SQLite path diesel expects: without a `sqlite://` prefix.
fn sqlite_path(url: &str) -> &str {
    url.strip_prefix("sqlite://").unwrap_or(url)
}

/// Opens one connection, with the SQLite settings applied.
pub fn connect(url: &str) -> DbResult<DbConn> {
    let conn = match Backend::of_url(url) {
        Backend::Postgres => PgConnection::establish(url).map(DbConn::Postgres),
        Backend::Sqlite => SqliteConnection::establish(sqlite_path(url)).map(DbConn::Sqlite),
    };
    let mut conn = conn.map_err(|e| DbError::Connect {
        url: redact(url),
        reason: e.to_string().trim().to_string(),
    })?;
    configure(&mut conn).map_err(|e| DbError::Connect {
        url: redact(url),
        reason: e.to_string(),
    })?;
    Ok(conn)
}

/// WAL lets readers run beside the writer; FULL sync makes every acknowledged write survive a
/// power cut, not only a crash; foreign keys are off by default in SQLite.
fn configure(conn: &mut DbConn) -> diesel::QueryResult<()> {
    if let DbConn::Sqlite(c) = conn {
        c.batch_execute(&format!(
            "PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS};
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;"
        ))?;
    }
    Ok(())
}

#[derive(Debug)]
struct SqliteSettings;

impl CustomizeConnection<DbConn, diesel::r2d2::Error> for SqliteSettings {
    fn on_acquire(&self, conn: &mut DbConn) -> Result<(), diesel::r2d2::Error> {
        configure(conn).map_err(diesel::r2d2::Error::QueryError)
    }
}

/// Runs blocking database work on a connection of `pool`, off the async threads.
pub async fn run_blocking<T, E, F>(pool: &DbPool, work: F) -> Result<T, E>
where
    T: Send + 'static,
    E: From<DbError> + Send + 'static,
    F: FnOnce(&mut DbConn) -> Result<T, E> + Send + 'static,
{
    let pool = pool.clone();
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut conn = connection(&pool)?;
        let done = work(&mut conn);
        crate::metrics::metrics().db_work(started.elapsed());
        done
    })
    .await
    .unwrap_or_else(|e| Err(DbError::Invalid(format!("database task failed: {e}")).into()))
}

/// Connects, applies pending migrations and returns a pool. Fails with a clear message when the
/// database cannot be reached.
pub fn open(url: &str, max_connections: u32) -> DbResult<DbPool> {
    // A first connection gives the real reason when the database is unreachable, which r2d2's
    // timeout would hide.
    let mut conn = connect(url)?;
    migrate(&mut conn)?;
    let backend = Backend::of_url(url);
    let manager = ConnectionManager::<DbConn>::new(match backend {
        Backend::Postgres => url,
        Backend::Sqlite => sqlite_path(url),
    });
    // An in-memory SQLite database exists once per connection: keep it to one.
    let size = if url.contains(":memory:") {
        1
    } else {
        max_connections.max(1)
    };
    Pool::builder()
        .max_size(size)
        .connection_timeout(Duration::from_secs(POOL_TIMEOUT_SECS))
        .connection_customizer(Box::new(SqliteSettings))
        .build(manager)
        .map_err(|e| DbError::Connect {
            url: redact(url),
            reason: e.to_string(),
        })
}

/// The first key of the PostgreSQL advisory lock that migrations run under (the second is the
/// schema's name hashed): "CLLM" in ASCII.
const MIGRATION_LOCK_KEY: i32 = 0x434c_4c4d;

/// Applies every pending migration of the connection's backend, once however many nodes start
/// at the same moment: on PostgreSQL under an advisory lock on the schema (the others wait for
/// it, then find nothing pending), on SQLite in one immediate transaction (which takes the file's
/// write lock before reading what is applied).
pub fn migrate(conn: &mut DbConn) -> DbResult<Vec<String>> {
    let failed = |e: Box<dyn std::error::Error + Send + Sync>| DbError::Migration(e.to_string());
    let applied = match conn {
        DbConn::Sqlite(c) => c.immediate_transaction(|c| {
            c.run_pending_migrations(SQLITE_MIGRATIONS)
                .map(|applied| applied.iter().map(|v| v.to_string()).collect())
                .map_err(failed)
        })?,
        DbConn::Postgres(c) => {
            let lock = format!(
                "SELECT pg_advisory_lock({MIGRATION_LOCK_KEY}, hashtext(coalesce(current_schema(), '')))"
            );
            c.batch_execute(&lock)
                .map_err(|e| DbError::Migration(format!("cannot take the migration lock: {e}")))?;
            let applied = c
                .run_pending_migrations(POSTGRES_MIGRATIONS)
                .map(|applied| applied.iter().map(|v| v.to_string()).collect())
                .map_err(failed);
            // The lock is the session's: closing the connection would also let it go.
            let unlock = lock.replace("pg_advisory_lock", "pg_advisory_unlock");
            if let Err(e) = c.batch_execute(&unlock) {
                tracing::warn!(error = %e, "cannot let go of the migration lock");
            }
            applied?
        }
    };
    Ok(applied)
}

/// Reverts every applied migration (used by the migration round-trip test).
pub fn revert_all(conn: &mut DbConn) -> DbResult<()> {
    match conn {
        DbConn::Sqlite(c) => c.revert_all_migrations(SQLITE_MIGRATIONS).map(drop),
        DbConn::Postgres(c) => c.revert_all_migrations(POSTGRES_MIGRATIONS).map(drop),
    }
    .map_err(|e| DbError::Migration(e.to_string()))
}

/// The URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Now, in UTC without a zone: how every timestamp is stored.
pub fn now() -> chrono::NaiveDateTime {
    chrono::Utc::now().naive_utc()
}

/// Sends `payload` to the PostgreSQL listeners of `channel` when the transaction commits (at
/// once outside one). Nothing on SQLite, which serves one node.
pub fn notify(conn: &mut DbConn, channel: &str, payload: &str) -> DbResult<()> {
    if let DbConn::Postgres(c) = conn {
        use diesel::RunQueryDsl;
        diesel::sql_query("SELECT pg_notify($1, $2)")
            .bind::<diesel::sql_types::Text, _>(channel)
            .bind::<diesel::sql_types::Text, _>(payload)
            .execute(c)?;
    }
    Ok(())
}

/// Makes this connection receive what is sent to `channel` (PostgreSQL only); false on SQLite.
pub fn listen(conn: &mut DbConn, channel: &str) -> DbResult<bool> {
    match conn {
        // `channel` is one of our names: nothing to escape.
        DbConn::Postgres(c) => c.batch_execute(&format!("LISTEN {channel}"))?,
        DbConn::Sqlite(_) => return Ok(false),
    }
    Ok(true)
}

/// Stops a connection's subscriptions (before it goes back to the pool).
pub fn unlisten(conn: &mut DbConn) -> DbResult<()> {
    if let DbConn::Postgres(c) = conn {
        c.batch_execute("UNLISTEN *")?;
    }
    Ok(())
}

/// The payloads received by a listening connection since the last call, without waiting.
pub fn notifications(conn: &mut DbConn) -> DbResult<Vec<String>> {
    let DbConn::Postgres(c) = conn else {
        return Ok(Vec::new());
    };
    c.notifications_iter().map(|n| Ok(n?.payload)).collect()
}

/// Runs `query`, which returns at most one row, on the connection's own backend: for statements
/// the multi-backend connection cannot express, such as `INSERT … ON CONFLICT`.
fn get_optional<'q, Q, T>(conn: &mut DbConn, query: Q) -> diesel::QueryResult<Option<T>>
where
    Q: diesel::query_dsl::LoadQuery<'q, PgConnection, T>
        + diesel::query_dsl::LoadQuery<'q, SqliteConnection, T>,
{
    use diesel::OptionalExtension;
    match conn {
        DbConn::Postgres(c) => query.get_result(c).optional(),
        DbConn::Sqlite(c) => query.get_result(c).optional(),
    }
}

/// Inserts a row that may already exist (a resent frame, a returning participant): `insert` is an
/// `INSERT … ON CONFLICT DO NOTHING … RETURNING`, which returns no row when a unique constraint
/// says the row is stored; the stored row is then returned instead, with `false`. The insert
/// never fails on a duplicate, so a transaction needs no savepoint around it (two round trips
/// fewer on PostgreSQL).
fn insert_once<'q, Q, T>(
    conn: &mut DbConn,
    insert: Q,
    existing: impl FnOnce(&mut DbConn) -> diesel::QueryResult<T>,
) -> DbResult<(T, bool)>
where
    Q: diesel::query_dsl::LoadQuery<'q, PgConnection, T>
        + diesel::query_dsl::LoadQuery<'q, SqliteConnection, T>,
{
    match get_optional(conn, insert)? {
        Some(row) => Ok((row, true)),
        None => Ok((existing(conn)?, false)),
    }
}

/// The row whose children get consecutive numbers (a session's messages, a version's draws):
/// numbering is serialised on it.
struct Parent {
    table: &'static str,
    id: i64,
}

/// Runs `insert`, which reads the highest number so far among the parent's children and inserts
/// the next, so that concurrent writers never take the same number.
fn next_number<T>(
    conn: &mut DbConn,
    parent: Parent,
    insert: impl FnOnce(&mut DbConn) -> diesel::QueryResult<T>,
) -> DbResult<T> {
    write_transaction(conn, |conn| {
        lock(conn, &parent)?;
        Ok(insert(conn)?)
    })
}

/// Locks `parent` until the end of the write transaction: its row lock on PostgreSQL (SQLite's
/// write transaction holds the whole database already).
fn lock(conn: &mut DbConn, parent: &Parent) -> diesel::QueryResult<()> {
    if let DbConn::Postgres(c) = conn {
        // `table` is one of our table names and `id` an integer: nothing to escape.
        c.batch_execute(&format!(
            "SELECT 1 FROM {} WHERE id = {} FOR UPDATE",
            parent.table, parent.id
        ))?;
    }
    Ok(())
}

thread_local! {
    /// Whether a write transaction is open on this thread: nested calls join it.
    static IN_WRITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread inside a write transaction until dropped (also when the work panics: the
/// thread may be reused).
struct InWrite;

impl InWrite {
    fn enter() -> Self {
        IN_WRITE.set(true);
        InWrite
    }
}

impl Drop for InWrite {
    fn drop(&mut self) {
        IN_WRITE.set(false);
    }
}

/// One SQLite write transaction at a time in this process. SQLite lets one writer in at a time
/// anyway; waiting here, woken as soon as the writer before is done, replaces waiting in
/// SQLite's busy handler, which sleeps in steps of up to 100 ms: under 200 participants the
/// slowest frames waited hundreds of milliseconds for nothing (`bench load`). Writers of other
/// processes still meet the busy timeout.
static SQLITE_WRITER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A transaction that will write; calls nest (the inner ones join the outer transaction, on
/// both backends: no savepoint round trips for what fails or succeeds as a whole anyway). SQLite
/// takes the write lock at the start (`BEGIN IMMEDIATE`): a deferred transaction that reads first
/// cannot wait for another writer and fails with "database is locked".
pub fn write_transaction<T, E>(
    conn: &mut DbConn,
    work: impl FnOnce(&mut DbConn) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<diesel::result::Error>,
{
    if IN_WRITE.get() {
        return work(conn);
    }
    let joined = |conn: &mut DbConn| {
        let _inside = InWrite::enter();
        work(conn)
    };
    if !matches!(conn, DbConn::Sqlite(_)) {
        return conn.transaction(joined);
    }
    let _writer = SQLITE_WRITER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    conn.batch_execute("BEGIN IMMEDIATE")?;
    let result = joined(conn);
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    match conn.batch_execute(end) {
        Ok(()) => result,
        Err(e) => {
            let _ = conn.batch_execute("ROLLBACK");
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("postgres://app:secret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/test"),
            "postgres://postgres@127.0.0.1/test"
        );
        assert_eq!(redact("data/studio.sqlite3"), "data/studio.sqlite3");
    }
}
