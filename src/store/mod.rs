//! All SQL lives here. One SQLite file in WAL mode; numbered migrations tracked with
//! `PRAGMA user_version`; a single writer thread that commits many requests in one
//! transaction (group commit) and a small pool of read connections.
//!
//! Query functions take a `&Connection` so the same code runs inside the writer's batch, on
//! a read connection, or in a one-shot command-line transaction.

pub mod admins;
pub mod backup;
pub mod catalogue;
pub mod devices;
pub mod licenses;
pub mod ops;
pub mod settings;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use rusqlite::wal::CheckpointMode;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tokio::sync::oneshot;

/// The schema, one migration per entry, applied in order; entry N brings the database to
/// `user_version` N + 1.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_protocol.sql"),
    include_str!("migrations/0003_operations.sql"),
    include_str!("migrations/0004_portal.sql"),
    include_str!("migrations/0005_catalogue.sql"),
    include_str!("migrations/0006_housekeeping.sql"),
    include_str!("migrations/0007_alert_basis.sql"),
    include_str!("migrations/0008_item_counters.sql"),
    include_str!("migrations/0009_device_indexes.sql"),
    include_str!("migrations/0010_stream_bound.sql"),
    include_str!("migrations/0011_handshake_leases.sql"),
    include_str!("migrations/0012_alert_marks_pending.sql"),
    include_str!("migrations/0013_blocked_devices.sql"),
    include_str!("migrations/0014_audit_by_actor.sql"),
    include_str!("migrations/0015_unsettled_tokens.sql"),
];

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e)
    }
}

/// How many requests one transaction commits at most.
const MAX_BATCH: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not a `source`: the message tells it, and a chain printed whole (`{:#}`) would tell
    /// it again.
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    #[error(
        "the database has schema version {found}, newer than this keygate knows ({known}): \
         it was written by a newer release; downgrading is not supported, restore a backup \
         made by this release or install the newer one"
    )]
    TooNew { found: i64, known: i64 },
    #[error("the database writer has stopped")]
    WriterGone,
    #[error("a database task panicked")]
    Panicked,
    #[error("the database has no {0}: it is damaged")]
    Missing(&'static str),
    #[error("the database transaction failed to commit: {0}")]
    Commit(Arc<rusqlite::Error>),
    #[error("cannot open the database's WAL file: {0}")]
    Wal(String),
    #[error(
        "the disk holding {0} is full: what the last run left in the database's WAL must be \
         copied into the database file before keygate serves (after a failed sync it may be \
         in memory only); free some space on that disk, then start keygate again"
    )]
    NoRoomToStart(String),
    #[error(
        "cannot back the database up before migrating it to this release's schema, so it \
         is left as it is: {0}"
    )]
    BackupBeforeUpgrade(String),
}

/// Opens a connection with keygate's pragmas and brings the schema up to date. A new
/// database file is created owner-only (it holds the SMTP password and session tokens), and
/// SQLite gives its WAL the same mode.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    // An empty file is a new database to SQLite. An existing one is left as it is (the
    // refusal is ignored); any other failure shows when SQLite opens the path below.
    let _ = crate::appliance::create_secret_file(path);
    let mut conn = Connection::open(path)?;
    configure(&conn)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > 0 && version < schema_version() {
        // An upgrade: the database as the older release left it, to go back to.
        let file = backup::take_before_upgrade(path, version, time::OffsetDateTime::now_utc())
            .map_err(|e| StoreError::BackupBeforeUpgrade(e.to_string()))?;
        tracing::info!(backup = %file.path.display(), "backed up before migrating");
    }
    migrate(&mut conn)?;
    Ok(conn)
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk (fsync of the WAL) before it returns. The server's writer
    // then syncs on a thread of its own instead (`Store::start`), with the same guarantee
    // for every answer.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // No automatic checkpoint, which ignores its own failures (`checkpoint_or_stop`): the
    // service's writer checkpoints, a console command's connection only as it closes (a
    // failure there leaves the WAL as it is). A command run beside the service (`import`,
    // `device`, `backup`) no longer checkpoints under it.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // Savepoints (one per request in a batch) journal in memory, not in a temporary file.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // 64 MiB of page cache (the default is 2 MiB): the hot pages of devices, leases and seats.
    conn.pragma_update(None, "cache_size", -65_536)?;
    plan_once(conn)
}

/// Statements are cached, and each is planned once: with the query planner stability
/// guarantee, SQLite's plan no longer depends on bound values, so it never re-prepares a
/// cached statement because a new binding might deserve another plan (it did for every
/// join, every `ORDER BY` and every table with a partial index, at each execution).
fn plan_once(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_prepared_statement_cache_capacity(64);
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// The schema version this build brings databases to.
pub fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let known = schema_version();
    loop {
        // IMMEDIATE: two processes starting at once migrate one after the other.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if current > known {
            return Err(StoreError::TooNew {
                found: current,
                known,
            });
        }
        if current == known {
            return Ok(());
        }
        tx.execute_batch(MIGRATIONS[current as usize])?;
        tx.pragma_update(None, "user_version", current + 1)?;
        tx.commit()?;
        tracing::info!(version = current + 1, "applied database migration");
    }
}

/// Handle to the database for the server: cheap to clone, shared by all workers.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    jobs: mpsc::Sender<Box<dyn Job>>,
    readers: Mutex<Vec<Connection>>,
    catalogue: catalogue::CatalogueCache,
    commits: Arc<Commits>,
}

/// How far group commit has got: batches are numbered from 1 as the writer ends them
/// (committed, or failed and rolled back).
#[derive(Debug, Default)]
pub struct Commits {
    committed: AtomicU64,
    synced: AtomicU64,
    syncs: AtomicU64,
}

impl Commits {
    /// Batches the writer has ended (each one transaction of many requests).
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// Syncs of the WAL made (each covers every batch committed before it).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Acquire)
    }
}

impl Store {
    /// Opens (and migrates) the database and starts the writer and syncer threads.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = open(path)?;
        checkpoint_left_wal(path, &conn)?;
        let wal = open_wal(path)?;
        // The WAL's name is made durable as well as what the syncer writes into it.
        if let Some(dir) = path.parent() {
            crate::appliance::sync_dir(dir)
                .map_err(|e| StoreError::Wal(format!("{}: {e}", dir.display())))?;
        }
        Store::start(path, conn, move || wal.sync_data())
    }

    /// Starts the writer on `conn`, with `sync_wal` making the WAL's contents durable.
    fn start(
        path: &Path,
        conn: Connection,
        sync_wal: impl Fn() -> std::io::Result<()> + Send + 'static,
    ) -> Result<Store, StoreError> {
        // Commits no longer wait for the disk: the syncer thread syncs the WAL and only then
        // answers the batches it covers (see `syncer`).
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let mut conn = conn;
        let db: Arc<Path> = path.into();
        conn.wal_hook(Some({
            let db = db.clone();
            move |wal: &mut rusqlite::hooks::Wal, pages| checkpoint_or_stop(&db, wal, pages)
        }))?;
        let commits = Arc::new(Commits::default());
        let (jobs, queue) = mpsc::channel();
        let (committed, to_sync) = mpsc::channel();
        let writer_commits = commits.clone();
        std::thread::Builder::new()
            .name("keygate-db-writer".into())
            .spawn({
                let db = db.clone();
                move || {
                    stop_on_panic(&db, "writer", || {
                        writer(&db, conn, &queue, &committed, &writer_commits)
                    })
                }
            })
            .expect("the writer thread starts");
        let syncer_commits = commits.clone();
        std::thread::Builder::new()
            .name("keygate-db-syncer".into())
            .spawn(move || {
                stop_on_panic(&db, "syncer", || {
                    syncer(&db, sync_wal, &to_sync, &syncer_commits)
                })
            })
            .expect("the syncer thread starts");
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                jobs,
                readers: Mutex::new(Vec::new()),
                catalogue: Default::default(),
                commits,
            }),
        })
    }

    /// Group commit's progress (for `/metrics`).
    pub fn commits(&self) -> &Commits {
        &self.inner.commits
    }

    /// Runs `f` on the writer, inside a transaction shared with other requests. `f`'s changes
    /// are rolled back on its own if it returns an error; the result is delivered only once
    /// the transaction is durably committed.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.write_then(f, |out| out).await
    }

    /// [`Store::write`], with `then` turning `f`'s result into the answer (signing it) as
    /// soon as `f` has run: the caller's work overlaps the batch's commit and sync instead of
    /// following them. The answer is still delivered only once the transaction is durably
    /// committed, and dropped if it is not.
    pub async fn write_then<T, U, E, F, P>(&self, f: F, then: P) -> Result<U, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        P: FnOnce(T) -> U,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (ran, own) = oneshot::channel();
        let (committed, outcome) = oneshot::channel();
        let job = Box::new(WriteJob {
            f: Some(f),
            ran: Some(ran),
            committed,
        });
        self.inner
            .jobs
            .send(job)
            .map_err(|_| E::from(StoreError::WriterGone))?;
        // Nothing arrives here for a job its batch never ran (the batch failed before it).
        let own = own.await.ok().map(|out| out.map(then));
        match (outcome.await, own) {
            (Ok(Ok(())), Some(own)) => own,
            // The batch failed: nothing of it is written, so no job's own answer stands
            // (a refusal may rest on another job's rolled-back change: the seat it took).
            (Ok(Err(e)), _) => Err(E::from(e)),
            (Ok(Ok(())), None) | (Err(_), _) => Err(E::from(StoreError::WriterGone)),
        }
    }

    /// [`Store::write_then`], with the catalogue as the transaction sees it.
    pub async fn write_with_catalogue<T, U, E, F, P>(&self, f: F, then: P) -> Result<U, E>
    where
        F: FnOnce(&Connection, &catalogue::Catalogue) -> Result<T, E> + Send + 'static,
        P: FnOnce(T) -> U,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        self.write_then(
            move |conn| {
                let catalogue = inner.catalogue.current(conn)?;
                f(conn, &catalogue)
            },
            then,
        )
        .await
    }

    /// Runs `f` on a read-only connection from the pool, off the async threads.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = inner.take_reader()?;
            let result = f(&conn);
            let mut readers = inner.readers.lock().expect("reader pool lock");
            // Kept for the next reads; those opened for a burst beyond them are closed.
            if readers.len() < READERS_KEPT {
                readers.push(conn);
            }
            result
        })
        .await
        .map_err(|_| E::from(StoreError::Panicked))?
    }
}

/// Read connections kept open between reads (each with SQLite's default 2 MiB page cache):
/// the portal's pages and the jobs read; devices are served by the writer.
const READERS_KEPT: usize = 4;

impl Inner {
    fn take_reader(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.readers.lock().expect("reader pool lock").pop() {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        plan_once(&conn)?;
        Ok(conn)
    }
}

/// A request queued for the writer, with its result type erased.
trait Job: Send {
    /// Runs inside the batch's transaction, under a savepoint of its own, and hands its
    /// result to its requester (who waits for [`Job::finish`] before answering). Fails when
    /// its savepoint could not be ended: what it wrote may still be in the transaction.
    fn run(&mut self, conn: &Connection) -> Result<(), Arc<rusqlite::Error>>;
    /// Tells the requester its batch is committed and synced (`Ok`), or failed.
    fn finish(self: Box<Self>, committed: Result<(), StoreError>);
}

struct WriteJob<F, T, E> {
    f: Option<F>,
    ran: Option<oneshot::Sender<Result<T, E>>>,
    committed: oneshot::Sender<Result<(), StoreError>>,
}

impl<F, T, E> Job for WriteJob<F, T, E>
where
    F: FnOnce(&Connection) -> Result<T, E> + Send,
    T: Send,
    E: From<StoreError> + Send,
{
    fn run(&mut self, conn: &Connection) -> Result<(), Arc<rusqlite::Error>> {
        let f = self.f.take().expect("a job runs once");
        // Its requester gave up waiting (the client went away, a timeout): never answered,
        // it is not run either; the writer's time goes to requests still waiting.
        if self.ran.as_ref().is_some_and(|ran| ran.is_closed()) {
            return Ok(());
        }
        let (out, ended) = match exec(conn, "SAVEPOINT job") {
            Err(e) => (Err(E::from(e.into())), Ok(())),
            Ok(()) => {
                let out = std::panic::catch_unwind(AssertUnwindSafe(|| f(conn)))
                    .unwrap_or_else(|_| Err(E::from(StoreError::Panicked)));
                let end = if out.is_ok() {
                    exec(conn, "RELEASE job")
                } else {
                    exec(conn, "ROLLBACK TO job").and_then(|()| exec(conn, "RELEASE job"))
                };
                match end {
                    Ok(()) => (out, Ok(())),
                    Err(e) => {
                        let e = Arc::new(e);
                        (Err(E::from(StoreError::Commit(e.clone()))), Err(e))
                    }
                }
            }
        };
        // The requester may have gone away (client disconnected): nothing to tell then.
        if let Some(ran) = self.ran.take() {
            let _ = ran.send(out);
        }
        ended
    }

    fn finish(self: Box<Self>, committed: Result<(), StoreError>) {
        let _ = self.committed.send(committed);
    }
}

/// Runs a statement without parameters through the statement cache (the writer runs these
/// for every request; parsing them each time costs more than the request's own queries).
fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// A database's side file (`-wal`, `-shm`, `-journal`): its path with `suffix` appended.
pub(crate) fn side_file(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Copies what an earlier run left in the WAL (it stopped without closing the database:
/// kill -9, a power cut, a failed sync) into the database file, synced, and empties the WAL,
/// before anything is served. After a failed sync, pages of the WAL may live only in the
/// page cache, where SQLite would take them for durable; copied and synced now, they are.
/// A full disk stops the start (the service manager tries again): the WAL's pages would be
/// served from memory that a power cut loses, and every later commit after them with it.
fn checkpoint_left_wal(path: &Path, conn: &Connection) -> Result<(), StoreError> {
    match conn.wal_checkpoint_v2(Some(rusqlite::MAIN_DB), CheckpointMode::TRUNCATE) {
        Err(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::DiskFull => {
            Err(StoreError::NoRoomToStart(path.display().to_string()))
        }
        Err(e) if passable(&e) => Ok(()),
        result => Ok(result.map(drop)?),
    }
}

/// Whether a checkpoint's failure leaves every commit safe in the WAL, which SQLite reads
/// them from (logged, and checkpointed later): another connection was checkpointing or
/// reading (busy), or the database file could not grow (a full disk). Any other failure
/// may be a lost sync.
fn passable(e: &rusqlite::Error) -> bool {
    let passable = [
        rusqlite::ErrorCode::DatabaseBusy,
        rusqlite::ErrorCode::DiskFull,
    ]
    .into_iter()
    .any(|code| matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == code));
    if passable {
        tracing::warn!(error = %e, "the WAL could not be checkpointed now: it is later");
    }
    passable
}

/// The WAL file the writer's connection appends to, opened for syncing it. SQLite deletes
/// it only when the last connection closes (which takes an exclusive lock no other
/// connection lets it have) and otherwise keeps the same file, reset and truncated; the
/// writer's connection stays open for the life of the process. SQLite holds no lock on the
/// WAL itself (WAL locks live in the `-shm` file), so this handle cannot disturb them.
fn open_wal(path: &Path) -> Result<std::fs::File, StoreError> {
    let name = side_file(path, "-wal");
    // Written through: Windows flushes only a handle opened for writing.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&name)
        .map_err(|e| StoreError::Wal(format!("{}: {e}", name.display())))
}

/// The WAL's size, in pages, past which the writer checkpoints it (SQLite's default).
const CHECKPOINT_PAGES: i32 = 1000;

/// The writer's checkpoint, in place of SQLite's automatic one, which ignores its own
/// failures: a database file whose sync failed would look checkpointed, and the WAL then be
/// reused over the only durable copy of acknowledged commits. A failure stops keygate, as a
/// failed WAL sync does; the WAL still holds every commit, and the next start checkpoints it
/// (see `checkpoint_left_wal`).
fn checkpoint_or_stop(
    db: &Path,
    wal: &mut rusqlite::hooks::Wal,
    pages: i32,
) -> rusqlite::Result<()> {
    if pages < CHECKPOINT_PAGES {
        return Ok(());
    }
    match wal.checkpoint() {
        Err(e) if !passable(&e) => stop(db, &format!("checkpointing the database failed: {e}")),
        _ => Ok(()),
    }
}

/// The file beside the database that says why the last run stopped itself.
fn stop_file(db: &Path) -> PathBuf {
    side_file(db, "-stopped")
}

/// Stops keygate at a fault that makes going on unsafe (the service manager starts it
/// again): logged, and written beside the database (as far as the disk lets it) for the
/// next start to tell, by email too, with [`take_stop_reason`].
fn stop(db: &Path, reason: &str) -> ! {
    tracing::error!(reason, "stopping");
    record_stop(db, reason);
    std::process::exit(1);
}

/// Runs the writer's or the syncer's loop, `body`, and stops keygate if it panics (a
/// panic inside a job is the job's failure: see [`WriteJob`]). Without the thread, every
/// write would fail while the service looked alive; restarted, keygate serves again. The
/// loops borrow their channels, so a panic closes none: the other thread does not stop
/// keygate first for a reason less true ("the database syncer has stopped").
fn stop_on_panic(db: &Path, thread: &str, body: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(body)) {
        let message = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("no message");
        stop(db, &format!("the database {thread} panicked: {message}"));
    }
}

/// Writes why this run stops beside the database `db` (best effort: the disk may be failing).
pub fn record_stop(db: &Path, reason: &str) {
    let _ = std::fs::write(stop_file(db), reason);
}

/// Why the last run stopped itself, if it did (see [`stop`]); read once.
pub fn take_stop_reason(db: &Path) -> Option<String> {
    let file = stop_file(db);
    let reason = std::fs::read_to_string(&file).ok()?;
    let _ = std::fs::remove_file(&file);
    Some(reason)
}

/// A committed (or failed) batch on its way to the syncer, with its number.
type Batch = (u64, Vec<Box<dyn Job>>, Result<(), StoreError>);

fn writer(
    db: &Path,
    conn: Connection,
    queue: &mpsc::Receiver<Box<dyn Job>>,
    to_sync: &mpsc::Sender<Batch>,
    commits: &Commits,
) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let committed = match exec(&conn, "BEGIN IMMEDIATE") {
            Err(e) => Err(StoreError::Commit(Arc::new(e))),
            Ok(()) => {
                let mut ran = Ok(());
                for job in batch.iter_mut() {
                    // SQLite ends the whole transaction on some failures (a full disk, an I/O
                    // error): the jobs after it would each commit on their own and then be
                    // answered as failed with the batch. They do not run; the batch fails.
                    if conn.is_autocommit() {
                        tracing::error!(
                            "SQLite ended the batch's transaction; the rest of it fails"
                        );
                        break;
                    }
                    // A job whose savepoint did not end may have left a failed request's
                    // writes in the transaction: none of the batch is committed.
                    ran = job.run(&conn);
                    if ran.is_err() {
                        break;
                    }
                }
                ran.and_then(|()| exec(&conn, "COMMIT").map_err(Arc::new))
                    .map_err(|e| {
                        let _ = exec(&conn, "ROLLBACK");
                        StoreError::Commit(e)
                    })
            }
        };
        if let Err(e) = &committed {
            tracing::error!(error = %e, jobs = batch.len(), "database batch failed");
        }
        let number = commits.committed.fetch_add(1, Ordering::AcqRel) + 1;
        if to_sync.send((number, batch, committed)).is_err() {
            // Nothing could be answered any more, yet the service would look alive: stop,
            // so that the service manager starts keygate again.
            stop(db, "the database syncer has stopped");
        }
    }
}

/// Group commit's second half: syncs the WAL once for every batch committed since the last
/// sync, then answers their requests, so a request is answered only when its transaction is
/// on disk. The writer commits the next batches meanwhile (`synchronous = NORMAL`: its
/// commits write the WAL without waiting for the disk), so the cores work while the disk
/// syncs, and one sync covers every batch that queued behind a slow one.
fn syncer(
    db: &Path,
    sync_wal: impl Fn() -> std::io::Result<()>,
    committed: &mpsc::Receiver<Batch>,
    commits: &Commits,
) {
    while let Ok(first) = committed.recv() {
        let mut batches = vec![first];
        batches.extend(committed.try_iter());
        // The WAL is append-only between checkpoints, which sync it themselves before they
        // reuse it: syncing it now makes every frame written before this call durable.
        if let Err(e) = sync_wal() {
            // The outcome of these commits is unknown: nothing may be acknowledged, and
            // going on could acknowledge later commits that depend on them. The service
            // manager restarts keygate, which checkpoints the WAL first.
            stop(db, &format!("syncing the database's WAL failed: {e}"));
        }
        let newest = batches.last().map_or(0, |(number, ..)| *number);
        commits.synced.store(newest, Ordering::Release);
        commits.syncs.fetch_add(1, Ordering::AcqRel);
        for (_, batch, committed) in batches {
            for job in batch {
                let committed = match &committed {
                    Ok(()) => Ok(()),
                    Err(StoreError::Commit(e)) => Err(StoreError::Commit(e.clone())),
                    Err(_) => Err(StoreError::WriterGone),
                };
                job.finish(committed);
            }
        }
    }
}

/// Runs the test named `test` (its full path) again in a child process with a file system of
/// its own: a tmpfs of `size` (as `mount` takes it: `8m`) in a private mount namespace
/// (`unshare`, no privilege needed), so a test can fill a disk. Returns that file system's
/// directory in the child, and `None` in the parent once the child passed.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn on_a_small_disk(test: &str, size: &str) -> Option<PathBuf> {
    const CHILD: &str = "KEYGATE_TEST_SMALL_DISK";
    if let Some(dir) = std::env::var_os(CHILD) {
        return Some(dir.into());
    }
    let dir = tempfile::tempdir().unwrap();
    let child = std::process::Command::new("unshare")
        .args(["--map-root-user", "--mount", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size="$1" tmpfs "$2" && exec "$3" --exact "$4" --nocapture"#)
        .args(["sh", size])
        .arg(dir.path())
        .arg(std::env::current_exe().unwrap())
        .arg(test)
        .env(CHILD, dir.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&child.stdout);
    let err = String::from_utf8_lossy(&child.stderr);
    assert!(child.status.success(), "{out}\n{err}");
    assert!(out.contains("1 passed"), "the child ran the test: {out}");
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_new_database_and_its_wal_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let conn = open(&path).unwrap();
        for file in ["k.db", "k.db-wal"] {
            let mode = std::fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        drop(conn);
    }

    /// A device that grew past 4,096 usage streams before the bound keeps, after schema 10,
    /// its 4,096 streams with the most reports; the others keep all of theirs.
    #[test]
    fn schema_10_trims_a_device_past_the_stream_bound_to_its_busiest() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("k.db")).unwrap();
        conn.pragma_update(None, "foreign_keys", true).unwrap();
        for migration in &MIGRATIONS[..9] {
            conn.execute_batch(migration).unwrap();
        }
        conn.pragma_update(None, "user_version", 9).unwrap();
        let grown = devices::insert_device(&conn, "grown", "", "", 0).unwrap();
        let other = devices::insert_device(&conn, "other", "", "", 0).unwrap();
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 4100)
             INSERT INTO usage_streams (stream, device_id, high_seq)
             SELECT 'grown-' || i, ?1, i FROM n",
            [grown],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO usage_streams (stream, device_id, high_seq) VALUES ('other-1', ?1, 1)",
            [other],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let count = |device: i64| -> i64 {
            conn.query_row(
                "SELECT count(*) FROM usage_streams WHERE device_id = ?1",
                [device],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!((count(grown), count(other)), (4096, 1));
        let lowest: i64 = conn
            .query_row(
                "SELECT min(high_seq) FROM usage_streams WHERE device_id = ?1",
                [grown],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(lowest, 5, "the four with the fewest reports went");
    }

    /// Every table that references a device finds its rows by an index: removing a device
    /// (ON DELETE CASCADE) must not scan a table of a million rows once per device.
    #[test]
    fn a_devices_rows_are_found_by_index_in_every_table() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("k.db")).unwrap();
        // (table, column) of every foreign key to one of `parents`.
        let references_to = |parents: &str| -> Vec<(String, String)> {
            conn.prepare(&format!(
                "SELECT m.name, f.\"from\" FROM sqlite_master m,
                        pragma_foreign_key_list(m.name) f
                 WHERE m.type = 'table' AND f.\"table\" IN ({parents}) ORDER BY m.name"
            ))
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
        };
        let references = references_to("'devices'");
        let tables: Vec<&str> = references.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            tables,
            [
                "device_usage",
                "leases",
                "seats",
                "token_passes",
                "usage_streams"
            ]
        );
        // So are the rows of the other parents that are deleted (a handshake code, an admin).
        let others = references_to("'handshake_codes', 'admins'");
        for (table, column) in references.iter().chain(&others) {
            let plan: String = conn
                .query_row(
                    &format!("EXPLAIN QUERY PLAN SELECT 1 FROM {table} WHERE {column} = 1"),
                    [],
                    |r| r.get(3),
                )
                .unwrap();
            assert!(plan.starts_with("SEARCH"), "{table}: {plan}");
        }
    }

    #[test]
    fn migrations_apply_once_and_refuse_downgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        drop(open(&path).unwrap());
        let conn = open(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, schema_version());
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");

        conn.pragma_update(None, "user_version", schema_version() + 1)
            .unwrap();
        drop(conn);
        let err = open(&path).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { .. }));
        assert!(err.to_string().contains("downgrading is not supported"));
    }

    #[test]
    fn an_upgrade_backs_the_older_schema_up_first_out_of_retentions_reach() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.db");
        let older = schema_version() - 1;
        {
            let conn = Connection::open(&path).unwrap();
            for migration in &MIGRATIONS[..older as usize] {
                conn.execute_batch(migration).unwrap();
            }
            conn.pragma_update(None, "user_version", older).unwrap();
        }
        let conn = open(&path).unwrap();
        let version = |c: &Connection| -> i64 {
            c.pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap()
        };
        assert_eq!(version(&conn), schema_version());
        let backups = dir.path().join(backup::BACKUP_DIR);
        let names: Vec<String> = std::fs::read_dir(&backups)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let prefix = format!("keygate-schema{older}-before-upgrade-");
        assert!(names[0].starts_with(&prefix), "{names:?}");
        let copy = Connection::open(backups.join(&names[0])).unwrap();
        assert_eq!(version(&copy), older);
        drop(copy);
        assert!(
            backup::list(&backups).unwrap().is_empty(),
            "retention never sees it"
        );

        // Opened again at the current schema: no further backup.
        drop(open(&path).unwrap());
        assert_eq!(std::fs::read_dir(&backups).unwrap().count(), 1);

        // Starts that fail after the backup and come again keep one copy per schema.
        let later = time::OffsetDateTime::now_utc() + time::Duration::minutes(5);
        let again = backup::take_before_upgrade(&path, older, later).unwrap();
        let names: Vec<_> = std::fs::read_dir(&backups)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(names, [again.path]);
    }

    #[test]
    fn alert_marks_of_the_current_license_version_keep_counting_after_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.db");
        {
            let conn = Connection::open(&path).unwrap();
            for migration in &MIGRATIONS[..6] {
                conn.execute_batch(migration).unwrap();
            }
            conn.pragma_update(None, "user_version", 6).unwrap();
            conn.execute_batch(
                "INSERT INTO organizations VALUES ('o', 'v', 0);
                 INSERT INTO handshake_codes (id, code, organization_id, name, created_at)
                 VALUES (1, 'o-1', 'o', 'default', 0);
                 INSERT INTO licenses VALUES ('L1', 3, 'v', 'o', 0, 'k', 'j', 's', 0),
                                             ('L2', 1, 'v', 'o', 0, 'k', 'j', 's', 0);
                 INSERT INTO items (item_id, license_id, license_version, organization_id,
                     handshake_id, product, model, quota, starts_at, expires_at, offline_days,
                     features, max_exceptions)
                 VALUES ('SEATS', 'L1', 3, 'o', 1, 'p', 'per_device', 100, 0, 5000, 7, '[]', NULL),
                        ('CONC', 'L2', 1, 'o', 1, 'p', 'concurrent_device', 10, 0, 6000, 7, '[]', 4);
                 INSERT INTO alert_marks (item_id, threshold, license_version, sent_at)
                 VALUES ('SEATS', 'consumption:75', 3, 0), ('SEATS', 'expiry:30', 3, 0),
                        ('SEATS', 'consumption:90', 2, 0), ('CONC', 'consumption:50', 1, 0);",
            )
            .unwrap();
        }
        let conn = open(&path).unwrap();
        let marks: Vec<(String, String, i64)> = conn
            .prepare(
                "SELECT item_id, threshold, basis FROM alert_marks ORDER BY item_id, threshold",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mark = |i: &str, t: &str, b| (i.to_string(), t.to_string(), b);
        assert_eq!(
            marks,
            [
                mark("CONC", "consumption:50", 4),
                mark("SEATS", "consumption:75", 100),
                mark("SEATS", "consumption:90", -1),
                mark("SEATS", "expiry:30", 5000),
            ]
        );
    }

    /// A command's connection never checkpoints as it commits (SQLite's automatic
    /// checkpoint ignores its failures): what it writes stays in the WAL until it closes.
    #[test]
    fn a_commands_commit_does_not_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let conn = open(&path).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        // About 1,500 pages: past SQLite's automatic checkpoint at 1,000.
        settings::set(&conn, "large", &"x".repeat(6 << 20)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
        assert!(std::fs::metadata(side_file(&path, "-wal")).unwrap().len() > 6 << 20);
        drop(conn);
        assert!(
            std::fs::metadata(&path).unwrap().len() > 6 << 20,
            "checkpointed at close"
        );
    }

    /// A WAL left by a run that did not close the database (here, a connection never closed)
    /// is in the database file, and the WAL empty, once the store is open.
    #[test]
    fn a_wal_left_by_a_crash_is_checkpointed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let conn = open(&path).unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        settings::set(&conn, "left", "in the WAL").unwrap();
        std::mem::forget(conn); // no close, no checkpoint: as after kill -9
        let wal = side_file(&path, "-wal");
        assert!(std::fs::metadata(&wal).unwrap().len() > 0);

        let _store = Store::open(&path).unwrap();
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
        let file_only = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .unwrap();
        assert_eq!(
            settings::get(&file_only, "left").unwrap().as_deref(),
            Some("in the WAL")
        );
    }

    /// The writer checkpoints the WAL itself (SQLite's automatic checkpoint is replaced by
    /// one whose failure is not ignored): the WAL stays about a thousand pages long.
    #[tokio::test]
    async fn the_writer_keeps_the_wal_about_a_thousand_pages_long() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let store = Store::open(&path).unwrap();
        let value = "x".repeat(20_000); // about six pages a commit
        for i in 0..400 {
            let value = value.clone();
            store
                .write(move |conn| settings::set(conn, &format!("k{i}"), &value))
                .await
                .unwrap();
        }
        let frame = 4096 + 24;
        let wal = std::fs::metadata(side_file(&path, "-wal")).unwrap().len();
        assert!(wal > 100 * frame, "the writes went through the WAL");
        assert!(wal < 1_050 * frame, "{wal} bytes");
    }

    /// A checkpoint that fails for a reason that may have lost a sync (here the database file
    /// may not grow: the process's file size limit, EFBIG) stops keygate with the reason
    /// written beside the database, and the next start has every acknowledged write (they
    /// are in the WAL). The writer runs in a child process of this test under `prlimit`.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_failed_checkpoint_stops_keygate_and_loses_nothing_acknowledged() {
        use std::io::Write;
        const CHILD: &str = "KEYGATE_TEST_CHECKPOINT_DB";
        async fn write(store: &Store, i: usize) -> Result<(), StoreError> {
            let value = "x".repeat(20_000); // about six pages a commit
            store
                .write(move |conn| settings::set(conn, &format!("k{i}"), &value))
                .await
        }
        if let Ok(path) = std::env::var(CHILD) {
            // The child: writes until its checkpoint fails, saying which writes were answered.
            let store = Store::open(Path::new(&path)).unwrap();
            for i in 400..2_000 {
                write(&store, i).await.unwrap();
                writeln!(std::io::stdout(), "acked {i}").unwrap();
            }
            return; // never stopped: the parent fails
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        {
            let store = Store::open(&path).unwrap();
            for i in 0..400 {
                write(&store, i).await.unwrap();
            }
        }
        // Checkpointed: the database file holds the 400 writes; it may grow 16 pages more.
        open(&path)
            .unwrap()
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        let limit = std::fs::metadata(&path).unwrap().len() + 16 * 4096;
        let test = "store::tests::a_failed_checkpoint_stops_keygate_and_loses_nothing_acknowledged";
        let child = std::process::Command::new("sh")
            .arg("-c")
            // Ignored, SIGXFSZ does not kill the writer: its write fails with EFBIG instead.
            .arg(r#"trap '' XFSZ; exec prlimit --fsize="$1" "$2" --exact "$3" --nocapture"#)
            .args(["sh", &limit.to_string()])
            .arg(std::env::current_exe().unwrap())
            .arg(test)
            .env(CHILD, &path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&child.stdout);
        let acked: Vec<usize> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("acked ")?.parse().ok())
            .collect();
        assert_eq!(child.status.code(), Some(1), "{stdout}");
        assert!(
            acked.len() > 100,
            "the WAL filled before the stop: {acked:?}"
        );
        let reason = take_stop_reason(&path).unwrap();
        assert!(
            reason.starts_with("checkpointing the database failed"),
            "{reason}"
        );

        let store = Store::open(&path).unwrap();
        let missing = store
            .read(move |conn| {
                let mut missing = Vec::new();
                for i in (0..400).chain(acked) {
                    if settings::get(conn, &format!("k{i}"))?.is_none() {
                        missing.push(i);
                    }
                }
                Ok::<_, StoreError>(missing)
            })
            .await
            .unwrap();
        assert_eq!(missing, Vec::<usize>::new());
    }

    #[tokio::test]
    async fn a_failed_job_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("k.db")).unwrap();
        let set = |key: &'static str, fail: bool| {
            let store = store.clone();
            async move {
                store
                    .write(move |conn| {
                        settings::set(conn, key, "1")?;
                        if fail {
                            return Err(StoreError::Panicked);
                        }
                        Ok(())
                    })
                    .await
            }
        };
        let (a, b, c) = tokio::join!(set("a", false), set("b", true), set("c", false));
        assert!(a.is_ok() && b.is_err() && c.is_ok());
        let got: Vec<Option<String>> = store
            .read(|conn| {
                Ok::<_, StoreError>(vec![
                    settings::get(conn, "a")?,
                    settings::get(conn, "b")?,
                    settings::get(conn, "c")?,
                ])
            })
            .await
            .unwrap();
        assert_eq!(got, vec![Some("1".into()), None, Some("1".into())]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_is_answered_only_after_a_sync_begun_after_its_commit() {
        use std::sync::atomic::AtomicBool;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let conn = open(&path).unwrap();
        let wal = open_wal(&path).unwrap();
        // The WAL's sync, observed: at each sync's start, how many batches were committed
        // and how far the previous syncs answered (then the real sync). The first sync waits
        // until the test lets it go.
        let commits_slot = Arc::new(std::sync::OnceLock::<Arc<Commits>>::new());
        let began = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
        let (release, held) = mpsc::channel::<()>();
        let held = Mutex::new(Some(held));
        let (slot, began_in_sync) = (commits_slot.clone(), began.clone());
        let store = Store::start(&path, conn, move || {
            let at = slot
                .get()
                .map_or((0, 0), |c| (c.committed(), c.synced.load(Ordering::SeqCst)));
            began_in_sync.lock().unwrap().push(at);
            if let Some(held) = held.lock().unwrap().take() {
                let _ = held.recv();
            }
            wal.sync_data()
        })
        .unwrap();
        assert!(commits_slot.set(store.inner.commits.clone()).is_ok());

        let write = |i: usize, answered: Arc<AtomicBool>| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(move |conn| settings::set(conn, &format!("key{i}"), "v"))
                    .await
                    .unwrap();
                answered.store(true, Ordering::SeqCst);
            })
        };
        let first_answered = Arc::new(AtomicBool::new(false));
        let first = write(0, first_answered.clone());
        while began.lock().unwrap().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // The first batch is committed and its sync held: more batches commit meanwhile.
        let later: Vec<_> = (1..50)
            .map(|i| write(i, Arc::new(AtomicBool::new(false))))
            .collect();
        while store.commits().committed() < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !first_answered.load(Ordering::SeqCst),
            "answered before its sync returned"
        );
        release.send(()).unwrap();
        first.await.unwrap();
        for write in later {
            write.await.unwrap();
        }
        let commits = store.commits();
        let synced = commits.synced.load(Ordering::SeqCst);
        assert_eq!(synced, commits.committed());
        assert!((2..=commits.committed()).contains(&commits.syncs()));
        // Each sync answered only batches committed before it began: what the next sync
        // (or the end) finds answered is at most what was committed when it began.
        let mut syncs = began.lock().unwrap().clone();
        syncs.push((u64::MAX, synced));
        for pair in syncs.windows(2) {
            let ((committed_at_start, _), (_, answered_after)) = (pair[0], pair[1]);
            assert!(
                answered_after <= committed_at_start,
                "a sync begun at batch {committed_at_start} answered up to {answered_after}"
            );
        }
        let keys: i64 = Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT count(*) FROM settings WHERE key LIKE 'key%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(keys, 50);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_answer_is_made_while_its_batch_syncs_and_delivered_after() {
        use std::sync::atomic::AtomicBool;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let conn = open(&path).unwrap();
        let wal = open_wal(&path).unwrap();
        let (release, held) = mpsc::channel::<()>();
        let held = Mutex::new(held);
        let store = Store::start(&path, conn, move || {
            let _ = held.lock().unwrap().recv();
            wal.sync_data()
        })
        .unwrap();
        let (made, answered) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let write = {
            let (store, made, answered) = (store.clone(), made.clone(), answered.clone());
            tokio::spawn(async move {
                let answer = store
                    .write_then(
                        |conn| settings::set(conn, "k", "v").map(|()| 41),
                        |n| {
                            made.store(true, Ordering::SeqCst);
                            n + 1
                        },
                    )
                    .await;
                answered.store(true, Ordering::SeqCst);
                answer
            })
        };
        let making = async {
            while !made.load(Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), making)
            .await
            .expect("the answer is made while its batch's sync is held");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(store.commits().syncs(), 0);
        assert!(
            !answered.load(Ordering::SeqCst),
            "delivered before its sync"
        );
        release.send(()).unwrap();
        assert_eq!(write.await.unwrap().unwrap(), 42);
    }

    /// Holds the writer with a job that waits for the returned sender: the jobs queued
    /// meanwhile make the next batch, in the order they were queued.
    async fn hold_writer(
        store: &Store,
    ) -> (
        tokio::task::JoinHandle<Result<(), StoreError>>,
        mpsc::Sender<()>,
    ) {
        let (release, held) = mpsc::channel::<()>();
        let (started, running) = mpsc::channel::<()>();
        let store = store.clone();
        let first = tokio::spawn(async move {
            store
                .write(move |_| {
                    started.send(()).unwrap();
                    let _ = held.recv();
                    Ok(())
                })
                .await
        });
        tokio::task::spawn_blocking(move || running.recv())
            .await
            .unwrap()
            .unwrap();
        (first, release)
    }

    /// Polls a write once, which queues its job, and hands it back to await later.
    /// A job that sets `key`, raising `ran` when it runs.
    fn flagged(
        ran: &Arc<std::sync::atomic::AtomicBool>,
        key: &'static str,
    ) -> impl FnOnce(&Connection) -> Result<(), StoreError> + Send + 'static {
        let ran = ran.clone();
        move |conn| {
            ran.store(true, Ordering::SeqCst);
            settings::set(conn, key, "1")
        }
    }

    /// The setting `key` as committed.
    async fn stored(store: &Store, key: &'static str) -> Option<String> {
        store
            .read(move |conn| settings::get(conn, key))
            .await
            .unwrap()
    }

    async fn queue<W: Future + Unpin>(mut write: W) -> W {
        std::future::poll_fn(|cx| {
            assert!(std::pin::Pin::new(&mut write).poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await;
        write
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_made_for_a_batch_that_then_fails_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("k.db")).unwrap();
        // Two jobs in one batch: the first runs and has its answer made, the second ends
        // the transaction.
        let (first, release) = hold_writer(&store).await;
        let made = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let signed = queue(Box::pin(store.write_then(
            |conn| settings::set(conn, "signed", "1"),
            |()| made.store(true, Ordering::SeqCst),
        )))
        .await;
        let ended = queue(Box::pin(store.write(|conn| {
            exec(conn, "ROLLBACK")?;
            Err::<(), _>(StoreError::Panicked)
        })))
        .await;
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert!(ended.await.is_err());
        let err = signed.await.unwrap_err();
        assert!(matches!(err, StoreError::Commit(_)), "{err:?}");
        assert!(
            made.load(Ordering::SeqCst),
            "the answer was made, and dropped"
        );
        let stored = stored(&store, "signed").await;
        assert_eq!(stored, None);
    }

    /// A job whose savepoint cannot be ended (rolled back or released) may have left writes
    /// in the batch's transaction: the whole batch is rolled back and fails, instead of
    /// committing a failed request's changes with the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_whose_savepoint_cannot_end_fails_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("k.db")).unwrap();
        let (first, release) = hold_writer(&store).await;
        let before = queue(Box::pin(
            store.write(|conn| settings::set(conn, "before", "1")),
        ))
        .await;
        // It writes, ends its savepoint itself, then fails: `ROLLBACK TO job` finds none.
        let failed = queue(Box::pin(store.write(|conn| {
            settings::set(conn, "failed", "1")?;
            exec(conn, "RELEASE job")?;
            Err::<(), _>(StoreError::Panicked)
        })))
        .await;
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert!(failed.await.is_err());
        let err = before.await.unwrap_err();
        assert!(matches!(err, StoreError::Commit(_)), "{err:?}");
        assert_eq!(stored(&store, "failed").await, None);
        assert_eq!(stored(&store, "before").await, None);
        // The writer goes on.
        store
            .write(|conn| settings::set(conn, "after", "1"))
            .await
            .unwrap();
        assert_eq!(stored(&store, "after").await.as_deref(), Some("1"));
    }

    /// A request given up before its job ran (its client went away, a timeout): the job
    /// does not run. Nothing was answered, so nothing depends on it, and the writer's time
    /// (and the memory of the queue behind it) goes to requests still waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_given_up_before_it_ran_does_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("k.db")).unwrap();
        let (first, release) = hold_writer(&store).await;
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let given_up = queue(Box::pin(store.write(flagged(&ran, "given up")))).await;
        let waiting = queue(Box::pin(
            store.write(|conn| settings::set(conn, "waiting", "1")),
        ))
        .await;
        drop(given_up);
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        waiting.await.unwrap();
        assert!(!ran.load(Ordering::SeqCst));
        let stored = stored(&store, "given up").await;
        assert_eq!(stored, None);
    }

    /// A job refused because of another job's change (the seat it took) in a batch that then
    /// fails is answered with the batch's failure, to be tried again: the change it was
    /// refused for was never written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_in_a_batch_that_fails_is_answered_as_the_batchs_failure() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("k.db")).unwrap();
        let (first, release) = hold_writer(&store).await;
        let taken = queue(Box::pin(
            store.write(|conn| settings::set(conn, "seat", "taken")),
        ))
        .await;
        let refused = queue(Box::pin(store.write(|conn| {
            match settings::get(conn, "seat")? {
                Some(_) => Err(StoreError::Wal("no seat left".into())),
                None => settings::set(conn, "seat", "mine"),
            }
        })))
        .await;
        let ended = queue(Box::pin(store.write(|conn| {
            exec(conn, "ROLLBACK")?;
            Err::<(), _>(StoreError::Panicked)
        })))
        .await;
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert!(ended.await.is_err() && taken.await.is_err());
        let err = refused.await.unwrap_err();
        assert!(matches!(err, StoreError::Commit(_)), "{err:?}");
        let seat = stored(&store, "seat").await;
        assert_eq!(seat, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_whose_transaction_sqlite_ended_fails_whole_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("k.db")).unwrap();
        // Two jobs in one batch: the first ends the transaction.
        let (first, release) = hold_writer(&store).await;
        let ended = queue(Box::pin(store.write(|conn| {
            // As SQLite does on SQLITE_FULL or an I/O error.
            exec(conn, "ROLLBACK")?;
            Err::<(), _>(StoreError::Panicked)
        })))
        .await;
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let after = queue(Box::pin(store.write(flagged(&ran, "after")))).await;
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert!(ended.await.is_err());
        assert!(after.await.is_err(), "answered as failed");
        let stored = stored(&store, "after").await;
        assert_eq!(stored, None, "and so not written");
        assert!(!ran.load(Ordering::SeqCst), "it did not run at all");
        // The writer goes on.
        store
            .write(|conn| settings::set(conn, "next", "1"))
            .await
            .unwrap();
    }

    /// What stops keygate from below the requests: a failed sync of the WAL, a panic of the
    /// writer or of the syncer outside any job. Each ends the process (a child process here:
    /// this test binary again, running one scenario) with status 1, the write in flight not
    /// acknowledged, and leaves why beside the database for the next start.
    #[test]
    fn a_fault_of_the_writer_or_the_syncer_stops_keygate_and_says_why() {
        const SCENARIO: &str = "KEYGATE_TEST_STOP_SCENARIO";
        if let Ok(scenario) = std::env::var(SCENARIO) {
            let path = PathBuf::from(std::env::var_os("KEYGATE_TEST_STOP_DIR").unwrap());
            let conn = open(&path.join("k.db")).unwrap();
            let writer_panics = scenario == "writer panics";
            let store = Store::start(&path.join("k.db"), conn, move || match scenario.as_str() {
                "sync fails" => Err(std::io::Error::other("injected fault")),
                "syncer panics" => panic!("injected panic"),
                _ => Ok(()),
            })
            .unwrap();
            struct PanicsInTheWriter;
            impl Job for PanicsInTheWriter {
                fn run(&mut self, _: &Connection) -> Result<(), Arc<rusqlite::Error>> {
                    panic!("injected panic")
                }
                fn finish(self: Box<Self>, _: Result<(), StoreError>) {}
            }
            if writer_panics {
                store.inner.jobs.send(Box::new(PanicsInTheWriter)).unwrap();
            }
            let answer = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(store.write(|conn| settings::set(conn, "k", "v")));
            println!("answered: {answer:?}");
            // The panicking thread's unwinding may fail the write before it stops keygate.
            std::thread::sleep(std::time::Duration::from_secs(10));
            println!("still running");
            return;
        }
        let name = module_path!().trim_start_matches("keygate::").to_string()
            + "::a_fault_of_the_writer_or_the_syncer_stops_keygate_and_says_why";
        for (scenario, reason) in [
            (
                "sync fails",
                "syncing the database's WAL failed: injected fault",
            ),
            (
                "writer panics",
                "the database writer panicked: injected panic",
            ),
            (
                "syncer panics",
                "the database syncer panicked: injected panic",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let child = std::process::Command::new(std::env::current_exe().unwrap())
                .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
                .env(SCENARIO, scenario)
                .env("KEYGATE_TEST_STOP_DIR", dir.path())
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&child.stdout);
            assert_eq!(child.status.code(), Some(1), "{scenario}: {stdout}");
            assert!(
                !stdout.contains("answered: Ok") && !stdout.contains("still running"),
                "{scenario}: {stdout}"
            );
            assert_eq!(
                take_stop_reason(&dir.path().join("k.db")).as_deref(),
                Some(reason),
                "{scenario}"
            );
        }
    }

    #[tokio::test]
    async fn a_panicking_job_does_not_stop_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("k.db")).unwrap();
        let err = store
            .write(|_conn| -> Result<(), StoreError> { panic!("boom") })
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Panicked));
        store
            .write(|conn| settings::set(conn, "after", "ok"))
            .await
            .unwrap();
    }
}
