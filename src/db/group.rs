//! Group commit for SQLite: the write transactions of concurrent frames share one commit.
//!
//! SQLite lets one writer in at a time, and with `synchronous = FULL` every commit waits for the
//! disk. Under a study's bursts (every participant's reply arriving, everyone saving at once) the
//! frames queued behind one another for a commit each. One writer thread instead takes every
//! write queued at that moment, runs each in a savepoint of one transaction (a write that fails is
//! rolled back alone) and commits once; nobody hears of their write before that commit, so an
//! acknowledged frame still survives a power cut. An idle writer commits a lone write at once:
//! nothing waits for company. PostgreSQL runs concurrent transactions itself: there a write is
//! one transaction on a pooled connection, and writes that all take one lock (the ledger of
//! draws) go one at a time per node, waiting without a connection.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

use diesel::connection::SimpleConnection;
use tokio::sync::oneshot;

use super::{run_blocking, Backend, DbConn, DbError, DbPool, SQLITE_WRITER};

/// Most writes one transaction carries, so that one batch cannot grow without bound.
const MAX_BATCH: usize = 256;

/// Writes of the database, each in a write transaction: committed in groups on SQLite.
pub struct Writer {
    pool: DbPool,
    /// The queue of the SQLite writer thread; none on PostgreSQL.
    queue: Option<mpsc::Sender<Box<dyn Job>>>,
    /// The turn of [`Writer::write_in_turn`].
    turn: tokio::sync::Semaphore,
}

impl Writer {
    /// The writer of `pool`'s database; starts the writer thread on SQLite. The thread ends when
    /// the writer is dropped.
    pub fn new(pool: DbPool, backend: Backend) -> Result<Self, DbError> {
        let turn = tokio::sync::Semaphore::new(1);
        if backend != Backend::Sqlite {
            return Ok(Self {
                pool,
                queue: None,
                turn,
            });
        }
        let (queue, jobs) = mpsc::channel::<Box<dyn Job>>();
        let batch_pool = pool.clone();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run_batches(&batch_pool, &jobs))
            .map_err(|e| DbError::Invalid(format!("cannot start the database writer: {e}")))?;
        Ok(Self {
            pool,
            queue: Some(queue),
            turn,
        })
    }

    /// [`Writer::write`] for work that takes a lock every such write takes (the ledger of draws).
    /// On PostgreSQL these go one at a time per node: in a burst of arrivals the others wait here
    /// instead of each holding a pooled connection while they wait for the lock, and the frames
    /// of sessions already running keep getting connections. SQLite's writer runs every write in
    /// turn already (and groups them).
    pub async fn write_in_turn<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + From<diesel::result::Error> + Send + 'static,
        F: FnOnce(&mut DbConn) -> Result<T, E> + Send + 'static,
    {
        let _turn = match self.queue {
            Some(_) => None,
            None => Some(
                self.turn
                    .acquire()
                    .await
                    .map_err(|_| DbError::Invalid("the database writer has stopped".into()))?,
            ),
        };
        self.write(work).await
    }

    /// Runs `work` in a write transaction and returns its result once that transaction is
    /// committed. An error of `work` rolls back its own writes only; a failed commit is every
    /// write's error.
    pub async fn write<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + From<diesel::result::Error> + Send + 'static,
        F: FnOnce(&mut DbConn) -> Result<T, E> + Send + 'static,
    {
        let Some(queue) = &self.queue else {
            return run_blocking(&self.pool, |conn| super::write_transaction(conn, work)).await;
        };
        let (reply, result) = oneshot::channel();
        let job = Queued {
            queued_at: std::time::Instant::now(),
            work: Some(work),
            result: None,
            reply,
        };
        if queue.send(Box::new(job)).is_err() {
            return Err(DbError::Invalid("the database writer has stopped".into()).into());
        }
        result.await.unwrap_or_else(|_| {
            Err(DbError::Invalid("the database writer dropped a write".into()).into())
        })
    }
}

/// One write waiting in the queue.
trait Job: Send {
    /// Runs the write on the writer's connection; false when it failed (it is then rolled back).
    fn run(&mut self, conn: &mut DbConn) -> bool;
    /// Hands the result over once the transaction has committed, or failed with `failed`.
    fn finish(self: Box<Self>, failed: Option<&str>);
}

struct Queued<T, E, F> {
    queued_at: std::time::Instant,
    work: Option<F>,
    result: Option<Result<T, E>>,
    reply: oneshot::Sender<Result<T, E>>,
}

impl<T, E, F> Job for Queued<T, E, F>
where
    T: Send,
    E: From<DbError> + Send,
    F: FnOnce(&mut DbConn) -> Result<T, E> + Send,
{
    fn run(&mut self, conn: &mut DbConn) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| work(conn)))
            .unwrap_or_else(|_| Err(DbError::Invalid("a database write panicked".into()).into()));
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, failed: Option<&str>) {
        // Like any unit of database work: from asking to the answer, waiting and commit included.
        crate::metrics::metrics().db_work(self.queued_at.elapsed());
        let result = match (self.result, failed) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(_)), Some(reason)) | (None, Some(reason)) => {
                Err(DbError::Invalid(format!("the database could not commit: {reason}")).into())
            }
            (Some(Ok(value)), None) => Ok(value),
            (None, None) => Err(DbError::Invalid("a database write did not run".into()).into()),
        };
        // The caller may have gone (its socket closed): the write stands all the same.
        let _ = self.reply.send(result);
    }
}

/// The writer thread: each turn takes every queued write (up to [`MAX_BATCH`]) into one
/// transaction, on a pooled connection (an in-memory database has only one).
fn run_batches(pool: &DbPool, jobs: &mpsc::Receiver<Box<dyn Job>>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let failed = match super::connection(pool) {
            Ok(mut conn) => run_batch(&mut conn, &mut batch).err(),
            Err(e) => Some(e.to_string()),
        };
        match &failed {
            Some(reason) => {
                tracing::error!(writes = batch.len(), error = %reason, "a group of writes failed");
            }
            None => crate::metrics::metrics().db_commit(batch.len()),
        }
        for job in batch {
            job.finish(failed.as_deref());
        }
    }
}

/// Runs the batch in one transaction, each write in a savepoint of its own, and commits.
fn run_batch(conn: &mut DbConn, batch: &mut [Box<dyn Job>]) -> Result<(), String> {
    let _writer = SQLITE_WRITER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    conn.batch_execute("BEGIN IMMEDIATE")
        .map_err(|e| e.to_string())?;
    let inside = super::InWrite::enter();
    let ran = batch.iter_mut().try_for_each(|job| {
        conn.batch_execute("SAVEPOINT write")?;
        let end = if job.run(conn) {
            "RELEASE write"
        } else {
            "ROLLBACK TO write; RELEASE write"
        };
        conn.batch_execute(end)
    });
    drop(inside);
    let committed = ran.and_then(|()| conn.batch_execute("COMMIT"));
    committed.map_err(|e| {
        let _ = conn.batch_execute("ROLLBACK");
        e.to_string()
    })
}
