//! Online backups with SQLite's backup API, retention, and restore.
//!
//! A backup is written to a temporary file, checked with `PRAGMA integrity_check`, fsynced,
//! then linked into `<data-dir>/backups/keygate-YYYYMMDDTHHMMSSZ.db` (`-2.db`, `-3.db`... for
//! more backups in the same second). It copies one consistent snapshot (WAL readers never
//! block the writer), so it holds every transaction committed before it began.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use time::OffsetDateTime;
use time::macros::format_description;

use super::{StoreError, side_file};

pub const BACKUP_DIR: &str = "backups";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    // Not a `source`: the message says the cause once, also where causes are listed.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0} is not a sound keygate database: {1}")]
    Unsound(PathBuf, String),
    #[error("keygate is running on this data directory: stop the service first")]
    Running,
    #[error(
        "another keygate command (import, trust, device, ...) is changing the database: \
         run the restore again when it has finished"
    )]
    ConsoleWriting,
    #[error(
        "a restore is replacing the database (`keygate restore`): run this command again \
         when it has finished"
    )]
    Restoring,
    #[error(
        "{path} belongs to another appliance: {evidence}, and this appliance is {ours}; to \
         move that appliance here, put its appliance.key in place of this one's first"
    )]
    OtherAppliance {
        path: PathBuf,
        /// What names the other appliance: the installation that served the database, or
        /// the one a license is bound to.
        evidence: String,
        ours: String,
    },
    #[error(transparent)]
    Dir(#[from] crate::appliance::ApplianceError),
    #[error(
        "not enough free space for a backup in {dir}: it needs about {needed_mib} MiB and \
         {HEADROOM_MIB} MiB more kept free for the database, and {available_mib} MiB is free; \
         free some space (older backups there can be deleted) or keep fewer backups \
         (backup_keep_last, backup_keep_days)"
    )]
    NoSpace {
        dir: PathBuf,
        needed_mib: u64,
        available_mib: u64,
    },
    #[error(
        "{path} stayed locked by another program for {waited_s} s (a database tool holding \
         it open?), so it could not be copied; stop that program and try again"
    )]
    Locked { path: PathBuf, waited_s: u64 },
}

/// Free space a backup leaves on the data directory's file system, for the database itself.
const HEADROOM_MIB: u64 = 64;
const MIB: u64 = 1024 * 1024;

/// Refuses a backup of `needed` bytes that would leave less than the headroom free: a disk
/// filled by a backup would fail the devices' requests until the backup gave up.
fn check_space(dir: &Path, needed: u64, available: u64) -> Result<(), BackupError> {
    if needed.saturating_add(HEADROOM_MIB * MIB) <= available {
        return Ok(());
    }
    Err(BackupError::NoSpace {
        dir: dir.to_path_buf(),
        needed_mib: needed.div_ceil(MIB),
        available_mib: available / MIB,
    })
}

/// The most a copy of `db` can take: the database file and its WAL.
fn copy_size(db: &Path) -> Result<u64, BackupError> {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len());
    let db_size = size(db).map_err(io(db))?;
    Ok(db_size + size(&side_file(db, "-wal")).unwrap_or(0))
}

impl From<rusqlite::Error> for BackupError {
    fn from(e: rusqlite::Error) -> Self {
        BackupError::Store(e.into())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |error| BackupError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// A backup file and when it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupFile {
    pub path: PathBuf,
    pub taken_at: OffsetDateTime,
    pub size: u64,
}

const NAME: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("keygate-[year][month][day]T[hour][minute][second]Z.db");

const STAMP: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year][month][day]T[hour][minute][second]Z");

/// Takes a backup of `db` into `dir` now. A backup that fails leaves nothing behind.
pub fn take(db: &Path, dir: &Path, now: OffsetDateTime) -> Result<BackupFile, BackupError> {
    take_as(
        db,
        dir,
        &now.format(NAME).expect("the name format is valid"),
        now,
    )
}

/// Before `db` is migrated from schema `version`: a backup retention does not list (so never
/// deletes), for going back to the release that wrote it. One is kept per schema version:
/// once the new one is written, earlier ones of the same version go (a start that failed
/// after its backup, restarted by the service manager again and again, must not fill the
/// disk with copies).
pub fn take_before_upgrade(
    db: &Path,
    version: i64,
    now: OffsetDateTime,
) -> Result<BackupFile, BackupError> {
    let dir = db.parent().unwrap_or(Path::new(".")).join(BACKUP_DIR);
    let prefix = format!("keygate-schema{version}-before-upgrade-");
    let stamp = now.format(STAMP).expect("the stamp format is valid");
    let earlier: Vec<PathBuf> = entries(&dir)?
        .into_iter()
        .filter(|e| {
            let name = file_name(&e.path());
            name.starts_with(&prefix) && name.ends_with(".db")
        })
        .map(|e| e.path())
        .collect();
    let file = take_as(db, &dir, &format!("{prefix}{stamp}.db"), now)?;
    // The new one is on disk; an earlier one that cannot go (another process starting at
    // the same time removed it first) is no reason not to start.
    for path in earlier.iter().filter(|p| **p != file.path) {
        if let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "could not remove an earlier backup");
        }
    }
    Ok(file)
}

fn take_as(
    db: &Path,
    dir: &Path,
    name: &str,
    now: OffsetDateTime,
) -> Result<BackupFile, BackupError> {
    crate::appliance::create_private_dir(dir)?;
    // Run as root (`keygate backup` at the console), what it makes stays the service's: a
    // backup directory or file of root's would fail the service's backups, downloads and
    // retention. Best effort: a backup directory mounted with another owner stays as it is.
    give_like(dir, db);
    // What a backup cut short left (best effort: this backup does not depend on it), before
    // the free space is measured. Untouched for a day: another process's backup of a large
    // database may spend many minutes checking its copy without writing to it.
    if let Err(e) = remove_unfinished(dir, UNFINISHED_AT_BACKUP) {
        tracing::warn!(error = %e, "cannot remove unfinished backups");
    }
    let available = fs4::available_space(dir).map_err(io(dir))?;
    check_space(dir, copy_size(db)?, available)?;
    // Unique: a backup taken from the portal in the same second as the scheduled one must
    // not write into the same temporary file. Owner-only from the start: it holds secrets.
    let tmp = crate::appliance::temporary_beside(&dir.join(name));
    crate::appliance::create_secret_file(&tmp).map_err(io(&tmp))?;
    give_like(&tmp, db);
    let written = copy_checked(db, &tmp, COPY_LOCKED_AT_MOST).and_then(|()| sync_file(&tmp));
    if let Err(e) = written {
        // A damaged database or a full disk: no half-written copy is left to fill the disk.
        remove_with_side_files(&tmp);
        return Err(e);
    }
    let path = match place(&tmp, dir, name) {
        Ok(path) => path,
        Err(e) => {
            remove_with_side_files(&tmp);
            return Err(e);
        }
    };
    sync_dir(dir)?;
    let size = std::fs::metadata(&path).map_err(io(&path))?.len();
    Ok(BackupFile {
        path,
        taken_at: now,
        size,
    })
}

/// Gives the finished copy `tmp` its name in `dir`: `name`, or `name` numbered `-2`, `-3`...
/// before its extension when a backup taken in the same second holds it (the CLI's beside
/// the service's). Never over another backup (see [`crate::appliance::place_new`]).
fn place(tmp: &Path, dir: &Path, name: &str) -> Result<PathBuf, BackupError> {
    place_with(tmp, dir, name, |from, to| std::fs::hard_link(from, to))
}

/// [`place`] with `link` making links (a test's file system without any).
fn place_with(
    tmp: &Path,
    dir: &Path,
    name: &str,
    link: impl Fn(&Path, &Path) -> std::io::Result<()>,
) -> Result<PathBuf, BackupError> {
    let (stem, extension) = name.rsplit_once('.').unwrap_or((name, ""));
    for n in 1.. {
        let path = match n {
            1 => dir.join(name),
            n => dir.join(format!("{stem}-{n}.{extension}")),
        };
        match crate::appliance::place_new_with(tmp, &path, &link) {
            Ok(()) => {
                // Linked: the temporary name goes (renamed: it is gone already).
                if let Err(e) = std::fs::remove_file(tmp)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    return Err(io(tmp)(e));
                }
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(&path)(e)),
        }
    }
    unreachable!("a free name is found before the numbers run out")
}

/// The files SQLite may keep beside a database.
const SIDE_FILES: [&str; 3] = ["-wal", "-shm", "-journal"];

/// Removes a database file that is not wanted and whatever SQLite kept beside it.
fn remove_with_side_files(path: &Path) {
    for suffix in std::iter::once("").chain(SIDE_FILES) {
        let _ = std::fs::remove_file(side_file(path, suffix));
    }
}

/// How long a backup waits for a database another program keeps locked (its own writer
/// never blocks it) before it fails, rather than hold the job (and every later backup) for
/// as long as that program runs.
const COPY_LOCKED_AT_MOST: Duration = Duration::from_secs(60);

/// Copies `db` into the empty database file `to` from one read snapshot, and checks the copy.
/// Fails once `db` has been locked for `locked_at_most`.
fn copy_checked(db: &Path, to: &Path, locked_at_most: Duration) -> Result<(), BackupError> {
    let src = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    src.busy_timeout(locked_at_most.min(Duration::from_secs(10)))?;
    let mut dst = Connection::open(to)?;
    // One step of all pages: the whole database from one read snapshot.
    let backup = rusqlite::backup::Backup::new(&src, &mut dst)?;
    let started = Instant::now();
    loop {
        match backup.step(-1)? {
            rusqlite::backup::StepResult::Done => break,
            rusqlite::backup::StepResult::More => {}
            // Busy or locked by another program.
            _ => {
                if started.elapsed() >= locked_at_most {
                    return Err(BackupError::Locked {
                        path: db.to_path_buf(),
                        waited_s: started.elapsed().as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    drop(backup);
    check(&dst, to)
}

/// Puts a file's contents on disk (opened for writing: Windows flushes no read-only handle).
fn sync_file(path: &Path) -> Result<(), BackupError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    crate::appliance::sync_dir(dir).map_err(io(dir))
}

/// Backups and restored databases hold the whole appliance state: owner only.
fn owner_only(path: &Path) -> Result<(), BackupError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io(path))?;
    }
    let _ = path;
    Ok(())
}

/// `PRAGMA integrity_check` and a schema this keygate knows.
fn check(conn: &Connection, path: &Path) -> Result<(), BackupError> {
    let unsound = |why: String| BackupError::Unsound(path.to_path_buf(), why);
    let result: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| unsound(e.to_string()))?;
    if result != "ok" {
        return Err(unsound(result));
    }
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| unsound(e.to_string()))?;
    if version == 0 || version > super::schema_version() {
        return Err(unsound(format!(
            "schema version {version} is not one this keygate reads"
        )));
    }
    Ok(())
}

/// The backups in `dir`, newest first.
pub fn list(dir: &Path) -> Result<Vec<BackupFile>, BackupError> {
    let mut files = Vec::new();
    for entry in entries(dir)? {
        let Some((taken_at, n)) = taken_at(&file_name(&entry.path())) else {
            continue;
        };
        // One removed meanwhile (retention of `keygate backup` beside the service) is gone.
        let size = match entry.metadata() {
            Ok(metadata) => metadata.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(dir)(e)),
        };
        let file = BackupFile {
            path: entry.path(),
            taken_at,
            size,
        };
        files.push((file, n));
    }
    files.sort_by_key(|(f, n)| std::cmp::Reverse((f.taken_at, *n)));
    Ok(files.into_iter().map(|(f, _)| f).collect())
}

/// When a backup named `name` was taken, and its number among the backups of that second
/// (1, then 2, 3... as [`place`] numbers them); `None` for another file.
fn taken_at(name: &str) -> Option<(OffsetDateTime, u32)> {
    let stem = name.strip_prefix("keygate-")?.strip_suffix(".db")?;
    let (stamp, n) = match stem.split_once('-') {
        Some((stamp, n)) => (stamp, n.parse().ok().filter(|n| *n >= 2)?),
        None => (stem, 1),
    };
    let taken = time::PrimitiveDateTime::parse(stamp, STAMP).ok()?;
    Some((taken.assume_utc(), n))
}

/// The entries of the backup directory: none before the first backup made it.
fn entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>, BackupError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.collect::<Result<_, _>>().map_err(io(dir)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(dir)(e)),
    }
}

/// How long a temporary backup file must have been left untouched for a start to remove it
/// ([`remove_unfinished`]), and for a backup to.
pub const UNFINISHED_AT_START: Duration = Duration::from_secs(600);
const UNFINISHED_AT_BACKUP: Duration = Duration::from_secs(86_400);

/// Removes the temporary files of backups that never finished (the process was killed while
/// copying, e.g. a service manager's start timeout during the backup before an upgrade), at
/// a start and before each backup: each is the size of the database. Only files untouched
/// for `idle` go: a backup being written (`keygate backup` beside the service) is not.
pub fn remove_unfinished(dir: &Path, idle: Duration) -> Result<usize, BackupError> {
    let mut removed = 0;
    for entry in entries(dir)? {
        let name = file_name(&entry.path());
        let idle = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|untouched| untouched >= idle);
        let temporary = SIDE_FILES
            .iter()
            .fold(name.as_str(), |n, suffix| {
                n.strip_suffix(suffix).unwrap_or(n)
            })
            .ends_with(".tmp");
        if name.starts_with('.') && temporary && idle {
            std::fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// At a start, before the database is opened: removes what writes cut short left in
/// `data_dir`'s backup directory (backups), in `data_dir` itself (the appliance key) and in
/// its `tls` directory (the certificate and its key), untouched for
/// [`UNFINISHED_AT_START`] (best effort: logged). A migration's backup cut short at the
/// last start left a copy the size of the database, which would fail this start's backup
/// for want of space; a key's left a second copy of a secret.
pub fn remove_unfinished_at_start(data_dir: &Path) {
    for dir in [
        data_dir.join(BACKUP_DIR),
        data_dir.to_path_buf(),
        data_dir.join("tls"),
    ] {
        match remove_unfinished(&dir, UNFINISHED_AT_START) {
            Ok(0) => {}
            Ok(n) => tracing::warn!(files = n, dir = %dir.display(), "removed unfinished writes"),
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot remove unfinished writes")
            }
        }
    }
}

/// Which backups retention keeps: the newest `keep_last`, and the newest of each of the last
/// `keep_days` days that have a backup (today's included). Returns the others (to delete).
/// `files` are newest first, as [`list`] gives them. Days with a backup, not days on the
/// calendar: a clock jumping a year ahead would otherwise have made every daily backup too
/// old at once. A backup named after a time still to come was taken while the clock ran
/// ahead: the ones taken since the clock was set right are newer, so it counts as the
/// oldest, and it keeps no day of its own.
pub fn to_prune(
    files: &[BackupFile],
    keep_last: usize,
    keep_days: i64,
    now: OffsetDateTime,
) -> Vec<BackupFile> {
    let mut days_kept = std::collections::HashSet::new();
    let days = usize::try_from(keep_days).unwrap_or(0);
    let (past, ahead): (Vec<&BackupFile>, Vec<&BackupFile>) =
        files.iter().partition(|f| f.taken_at <= now);
    past.into_iter()
        .chain(ahead)
        .enumerate()
        .filter(|(i, f)| {
            let newest_of_day =
                f.taken_at <= now && days_kept.len() < days && days_kept.insert(f.taken_at.date());
            !(*i < keep_last || newest_of_day)
        })
        .map(|(_, f)| f.clone())
        .collect()
}

/// Deletes what retention does not keep; returns how many. While the clock reads set back
/// (`set_back`), among the backups named at or before `now` only: the ones named after it,
/// taken before the clock was set back, would rank as the oldest and go; those taken since
/// still keep to the retention, so the disk does not fill.
pub fn prune(
    dir: &Path,
    keep_last: usize,
    keep_days: i64,
    now: OffsetDateTime,
    set_back: bool,
) -> Result<usize, BackupError> {
    let mut files = list(dir)?;
    if set_back {
        files.retain(|f| f.taken_at <= now);
    }
    delete(&to_prune(&files, keep_last, keep_days, now))
}

/// Deletes `files`; returns how many. One already gone (removed by hand meanwhile) is not a
/// failure.
fn delete(files: &[BackupFile]) -> Result<usize, BackupError> {
    for f in files {
        match std::fs::remove_file(&f.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&f.path)(e)),
            _ => {}
        }
    }
    Ok(files.len())
}

/// Takes a backup, then deletes what retention does not keep; returns the backup and how
/// many were deleted. A backup that does not fit runs retention first and is tried once
/// more, so the remedy its refusal names (keep fewer backups) works at the next run, without
/// deleting files by hand.
pub fn take_and_prune(
    db: &Path,
    dir: &Path,
    keep_last: usize,
    keep_days: i64,
    now: OffsetDateTime,
    set_back: bool,
) -> Result<(BackupFile, usize), BackupError> {
    let prune = || prune(dir, keep_last, keep_days, now, set_back);
    let mut pruned = 0;
    let file = match take(db, dir, now) {
        Err(e @ BackupError::NoSpace { .. }) => {
            pruned = prune()?;
            if pruned == 0 {
                return Err(e);
            }
            take(db, dir, now)?
        }
        taken => taken?,
    };
    pruned += prune()?;
    Ok((file, pruned))
}

/// How long `serve` and `restore` wait for the data directory's lock. A lock just released
/// can stay held a few milliseconds: a child process being started by the process that held
/// it keeps a copy of the lock's descriptor until it runs its program.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// The lock `serve` holds on its data directory for as long as it runs, waiting up to `wait`
/// for it.
pub fn lock_file(data_dir: &Path, wait: Duration) -> Result<std::fs::File, BackupError> {
    let path = data_dir.join("keygate.lock");
    let file = open_lock(&path, data_dir)?;
    match locked(&file, wait, std::fs::File::try_lock) {
        Ok(true) => Ok(file),
        Ok(false) => Err(BackupError::Running),
        Err(e) => Err(io(&path)(e)),
    }
}

/// The lock a console command holds shared for as long as it has the database open, and
/// `restore` exclusive while it replaces the database: a change made at the console lands
/// in the database the appliance goes on with, not in the one a restore puts aside.
/// `restore` waits [`LOCK_WAIT`] for the commands running, a command as long for a restore.
pub fn console_lock(data_dir: &Path, restoring: bool) -> Result<std::fs::File, BackupError> {
    let path = data_dir.join("keygate.console.lock");
    let file = open_lock(&path, data_dir)?;
    let lock = if restoring {
        std::fs::File::try_lock
    } else {
        std::fs::File::try_lock_shared
    };
    match locked(&file, LOCK_WAIT, lock) {
        Ok(true) => Ok(file),
        Ok(false) if restoring => Err(BackupError::ConsoleWriting),
        Ok(false) => Err(BackupError::Restoring),
        Err(e) => Err(io(&path)(e)),
    }
}

/// A lock file in `data_dir`, opened to read, which is all a lock needs. Opened by root (a
/// console command), it is given to the service's user, the database's owner (the data
/// directory's before there is one), which could not open one of root's (one an earlier
/// release left included).
fn open_lock(path: &Path, data_dir: &Path) -> Result<std::fs::File, BackupError> {
    let file = match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path),
        opened => opened,
    }
    .map_err(io(path))?;
    let db = data_dir.join("keygate.db");
    give_like(path, if db.exists() { &db } else { data_dir });
    Ok(file)
}

/// [`same_owner`], as far as this process may: a failure (not root, a file system without
/// owners) is logged, and what it made stays as it is.
fn give_like(path: &Path, like: &Path) {
    if let Err(e) = same_owner(path, like) {
        tracing::warn!(error = %e, "cannot give it the owner of {}", like.display());
    }
}

/// Takes `file`'s lock with `lock`, trying again for up to `wait`: whether it got it.
fn locked(
    file: &std::fs::File,
    wait: Duration,
    lock: fn(&std::fs::File) -> Result<(), std::fs::TryLockError>,
) -> std::io::Result<bool> {
    let deadline = Instant::now() + wait;
    loop {
        match lock(file) {
            Ok(()) => return Ok(true),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// What [`restore`] did.
#[derive(Debug)]
pub struct Restored {
    /// Where the replaced database is kept: `keygate.db.before-restore-<time>`.
    pub aside: PathBuf,
    /// What the restored database took from the replaced one, a line each: the licenses
    /// imported again, the vendor keys whose trust changed since the backup.
    pub handed_on: Vec<String>,
    /// What it could not take: licenses that failed to import again, or the replaced
    /// database too damaged to read.
    pub not_handed_on: Vec<String>,
}

/// Imports into the restored database a license the replaced one held (in a transaction of
/// the restore's): what it did, `None` when the restored one holds that version or a newer
/// one already, or why it failed.
pub type Reimport<'a> =
    dyn FnMut(&Connection, &super::licenses::SignedVersion) -> Result<Option<String>, String> + 'a;

/// Replaces the database with a backup (the service must be stopped). The current database
/// is kept aside as `keygate.db.before-restore-<time>`. What is not the appliance's to roll
/// back is handed on from it to the restored copy before that copy takes its place: the
/// newest time its clock used, the vendor keys it trusts, and its licenses newer than the
/// backup's (imported again by `reimport`; licenses do not go back).
pub fn restore(
    db: &Path,
    backup: &Path,
    installation_id: &str,
    now: OffsetDateTime,
    reimport: &mut Reimport<'_>,
) -> Result<Restored, BackupError> {
    let data_dir = db.parent().unwrap_or(Path::new("."));
    let _lock = lock_file(data_dir, LOCK_WAIT)?;
    let _console = console_lock(data_dir, true)?;
    let (newest_time, current) = handed_on(db);
    let stamp = now.format(STAMP).expect("the stamp format is valid");
    // A name no earlier restore used (two restores in one second keep both databases).
    let aside = (1..)
        .map(|n| match n {
            1 => db.with_file_name(format!("keygate.db.before-restore-{stamp}")),
            n => db.with_file_name(format!("keygate.db.before-restore-{stamp}-{n}")),
        })
        .find(|p| !p.exists() && !side_file(p, "-wal").exists())
        .expect("some name is free");
    // The replacement is complete and on disk before anything else moves; then the live
    // database is replaced by one rename, so a crash at any point leaves a whole database
    // (the old one or the restored one) at `db`, never none.
    let tmp = db.with_file_name("keygate.db.restoring");
    // What a restore killed before left here is not mixed into this one.
    remove_with_side_files(&tmp);
    // The backup is copied as it lies, with the WAL beside it if it has one (a database
    // kept aside by an earlier restore), and only the copy is opened: SQLite brings what the
    // WAL holds into it, and the backup's own place (a read-only medium) is not written to.
    // The copy is checked and must belong to this appliance.
    let mut copied = || {
        // A wrong path is named as the user gave it; a failure to write, by the copy's.
        let found = std::fs::File::open(backup)
            .and_then(|f| f.metadata())
            .map_err(io(backup))?;
        if !found.is_file() {
            return Err(BackupError::Unsound(
                backup.to_path_buf(),
                "it is not a file (name a backup file in it)".into(),
            ));
        }
        std::fs::copy(backup, &tmp).map_err(io(&tmp))?;
        owner_only(&tmp)?;
        let wal = side_file(backup, "-wal");
        if wal.exists() {
            let to = side_file(&tmp, "-wal");
            std::fs::copy(&wal, &to).map_err(io(&to))?;
        }
        let mut conn = Connection::open(&tmp)?;
        check(&conn, backup)?;
        bound_here(&conn, backup, installation_id)?;
        // Brought to this release's schema (the backup itself stays as it was, to go back
        // to the release that wrote it), for the licenses imported into it below.
        super::configure(&conn)?;
        super::migrate(&mut conn)?;
        // The newest time the appliance has used stays: the backup's older one would let a
        // clock set back in between go unnoticed (`clock::Watermark`). A backup from before
        // the time was kept (no job runs either) reads as no time.
        if let Some(newest) = newest_time
            && !crate::store::ops::newest_time(&conn).is_ok_and(|t| t >= newest)
        {
            super::settings::set(&conn, crate::clock::NEWEST_TIME, &newest.to_string())?;
        }
        // A backup is taken while the appliance runs: its mark of a running appliance is
        // not the restored one's (it would read as a run that did not stop cleanly).
        super::settings::delete(&conn, RUNNING)?;
        // The restored database tells its admins where it came from.
        let kept = if db.exists() {
            format!("the database it replaced is kept as {}", file_name(&aside))
        } else {
            String::new()
        };
        let at = now.unix_timestamp();
        let from = file_name(backup);
        crate::store::ops::audit(&conn, at, "cli", "backup restored", &from, &kept, "")?;
        let handed = hand_on(&conn, current.as_ref(), reimport, &aside)?;
        // All of it goes into the copy's own file, or the restore fails: closing the only
        // connection would fold the WAL in too, but SQLite's close ignores a checkpoint
        // that fails (a full disk), leaving the copy without what was written to it above.
        conn.wal_checkpoint_v2(
            Some(rusqlite::MAIN_DB),
            rusqlite::wal::CheckpointMode::TRUNCATE,
        )
        .map_err(|e| BackupError::Io {
            path: tmp.clone(),
            error: std::io::Error::other(format!("the restored copy was not completed: {e}")),
        })?;
        conn.close().map_err(|(_, e)| e)?;
        Ok::<_, BackupError>(handed)
    };
    let (handed_on, not_handed_on) = match copied() {
        Ok(done) => done,
        Err(e) => {
            remove_with_side_files(&tmp);
            return Err(e);
        }
    };
    owner_only(&tmp)?;
    // Run as root, the restored file must still be the service's to open.
    same_owner(&tmp, if db.exists() { db } else { data_dir })?;
    sync_file(&tmp)?;
    // The database is kept aside as it lies, with its WAL, before SQLite opens it: a
    // database too damaged to open (what a restore is often for) is kept too. Opened
    // again, the pair is the database as it was.
    for (from, to) in [
        (db.to_path_buf(), aside.clone()),
        (side_file(db, "-wal"), side_file(&aside, "-wal")),
    ] {
        if from.exists() {
            std::fs::hard_link(&from, &to)
                .or_else(|_| std::fs::copy(&from, &to).map(|_| ()))
                .map_err(io(&to))?;
        }
    }
    // Then what the WAL holds goes into the main file (a hard link: into the one kept aside
    // too, which stays whole), so that from here on that file alone is the whole database:
    // a crash between removing the WAL and the rename below leaves it complete at `db`,
    // not without its last commits. A database too damaged to open keeps its WAL aside.
    fold_wal(db);
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(side_file(db, suffix));
    }
    // A WAL left beside the restored file would be read as its own: SQLite would replay
    // the replaced database's last commits onto it.
    let wal = side_file(db, "-wal");
    if wal.exists() {
        // Nothing was restored: no copy, nor a database kept aside (`db` still is it).
        remove_with_side_files(&tmp);
        remove_with_side_files(&aside);
        return Err(BackupError::Io {
            error: std::io::Error::other("it could not be removed (is it open?)"),
            path: wal,
        });
    }
    std::fs::rename(&tmp, db).map_err(io(db))?;
    sync_dir(data_dir)?;
    Ok(Restored {
        aside,
        handed_on,
        not_handed_on,
    })
}

/// Hands on to the restored database `conn` what the replaced one (`current`, `None` when
/// it could not be read; kept as `aside`) says is not the appliance's to roll back: trust
/// is the admin's decision (a key untrusted since the backup, leaked say, is not trusted
/// again), and licenses never go back (each newer one imported again, in a transaction of
/// its own). Returns what was handed on and what could not be, a line each.
fn hand_on(
    conn: &Connection,
    current: Option<&Current>,
    reimport: &mut Reimport<'_>,
    aside: &Path,
) -> Result<(Vec<String>, Vec<String>), BackupError> {
    let Some(current) = current else {
        let why = format!(
            "the replaced database could not be read for its licenses and trusted vendor keys \
             ({} is kept as it was)",
            file_name(aside)
        );
        return Ok((Vec::new(), vec![why]));
    };
    let mut handed = hand_on_trust(conn, current)?;
    let mut not_handed = Vec::new();
    for license in &current.licenses {
        let (id, version) = (&license.license_id, license.version);
        let tx = conn.unchecked_transaction()?;
        match reimport(&tx, license) {
            Ok(None) => {}
            Ok(Some(done)) => {
                tx.commit()?;
                handed.push(format!(
                    "license {id} version {version}, newer than the backup's, imported again: \
                     {done}"
                ));
            }
            Err(why) => not_handed.push(format!("license {id} version {version}: {why}")),
        }
    }
    Ok((handed, not_handed))
}

/// Checkpoints a database's WAL into its main file (and removes it), if it has one and
/// SQLite can open it; a database too damaged for that keeps its WAL.
fn fold_wal(db: &Path) {
    if !side_file(db, "-wal").exists() {
        return;
    }
    if let Ok(conn) = Connection::open(db) {
        let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        let _ = conn.close();
    }
}

/// A path's last component, for messages.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What the database about to be replaced hands on to the restored one when it can be read.
#[derive(Default)]
struct Current {
    trusted_keys: Vec<super::licenses::TrustedKey>,
    /// The vendor keys its audit log says were untrusted (by `keygate untrust`).
    untrusted: std::collections::HashSet<String>,
    licenses: Vec<super::licenses::SignedVersion>,
}

/// What the database at `db`, about to be replaced, hands on to the restored one: the newest
/// time its appliance used (`None` when unknown), and its trusted vendor keys and the newest
/// version of each license (`None` when it cannot be read: a database too damaged to open).
/// No database hands on no time, no key and no license.
fn handed_on(db: &Path) -> (Option<i64>, Option<Current>) {
    if !db.exists() {
        return (None, Some(Current::default()));
    }
    let Ok(conn) = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return (None, None);
    };
    let newest_time = crate::store::ops::newest_time(&conn)
        .ok()
        .filter(|t| *t != i64::MIN);
    let untrusted = conn
        .prepare("SELECT DISTINCT target FROM audit_log WHERE action = 'vendor key untrusted'")
        .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect())
        .unwrap_or_default();
    let current = super::licenses::trusted_keys(&conn)
        .and_then(|trusted_keys| {
            Ok(Current {
                trusted_keys,
                untrusted,
                licenses: super::licenses::newest_versions(&conn)?,
            })
        })
        .ok();
    (newest_time, current)
}

/// Makes the restored database (`conn`) trust what the replaced one trusted: its keys are
/// trusted, and a key of the backup's it no longer trusts is not, when its audit log says
/// an admin untrusted it (a database made since, by a first start on new hardware, trusts
/// nothing and untrusted nothing). Returns a line for each key whose trust this changed
/// from the backup's.
fn hand_on_trust(conn: &Connection, current: &Current) -> Result<Vec<String>, BackupError> {
    let trusted = &current.trusted_keys;
    let mut changed = Vec::new();
    for key in super::licenses::trusted_keys(conn)? {
        if !trusted.iter().any(|k| k.kid == key.kid) && current.untrusted.contains(&key.kid) {
            super::licenses::delete_trusted_key(conn, &key.kid)?;
            changed.push(format!(
                "vendor key {} ({}), untrusted since the backup, stays untrusted",
                key.kid, key.name
            ));
        }
    }
    for key in trusted {
        if super::licenses::insert_trusted_key(conn, key)? {
            changed.push(format!(
                "vendor key {} ({}), trusted since the backup, stays trusted",
                key.kid, key.name
            ));
        }
    }
    Ok(changed)
}

/// The settings key naming the installation that serves the database (written at every
/// start), so that a restore tells another appliance's backup even before any license.
pub const INSTALLATION: &str = "installation_id";

/// The settings key a serving appliance holds (since when it serves), removed when it
/// stops cleanly: found at a start, the previous run did not. A restore removes the one a
/// backup (taken while serving) carries.
pub const RUNNING: &str = "running_since";

/// The appliance key of `data_dir`, made there if it has none, for the database at `db`
/// (when there is one): a database another appliance served or licensed (moved here
/// without its appliance.key, or the key lost) is refused, since every device would refuse
/// what this key signs, and a key just made for it goes again.
pub fn appliance_for(
    data_dir: &Path,
    db: &Path,
) -> Result<crate::appliance::Appliance, BackupError> {
    let key_file = data_dir.join(crate::appliance::KEY_FILE);
    let new_key = !key_file.exists();
    let appliance = crate::appliance::Appliance::load_or_create(data_dir)?;
    if db.exists() {
        let checked = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(BackupError::from)
            .and_then(|conn| {
                // A file SQLite has not written a schema into yet is nobody's.
                let schema: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
                match schema {
                    0 => Ok(()),
                    _ => bound_here(&conn, db, appliance.installation_id()),
                }
            });
        if let Err(e) = checked {
            if new_key {
                let _ = std::fs::remove_file(&key_file);
            }
            return Err(e);
        }
    }
    Ok(appliance)
}

/// Refuses a database another appliance served, or whose licenses are bound to another
/// appliance key: restored, every
/// device would refuse the authorizations it gets (their licenses name another appliance).
pub(crate) fn bound_here(conn: &Connection, path: &Path, ours: &str) -> Result<(), BackupError> {
    let unsound = |why: String| BackupError::Unsound(path.to_path_buf(), why);
    let other = |evidence: String| BackupError::OtherAppliance {
        path: path.to_path_buf(),
        evidence,
        ours: ours.to_string(),
    };
    // A database an appliance served names it, licensed or not (older ones do not).
    if let Some(served) = super::settings::get(conn, INSTALLATION)?
        && served != ours
    {
        return Err(other(format!("it was served by installation {served}")));
    }
    let mut stmt = conn.prepare("SELECT license_id, jws FROM licenses")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let (license_id, jws): (String, String) = (row.get(0)?, row.get(1)?);
        let license: keygate_sdk::wire::License = keygate_sdk::jws::Token::decode(&jws)
            .and_then(|token| token.payload_as())
            .map_err(|e| unsound(format!("license {license_id}: {e}")))?;
        if license.appliance.installation_id != ours {
            return Err(other(format!(
                "its license {license_id} is bound to installation {}",
                license.appliance.installation_id
            )));
        }
    }
    Ok(())
}

/// Gives `path` the owner and group of `like` when they differ (a restore run as root).
#[cfg(unix)]
fn same_owner(path: &Path, like: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(like).map_err(io(like))?;
    let have = std::fs::metadata(path).map_err(io(path))?;
    if (have.uid(), have.gid()) != (want.uid(), want.gid()) {
        std::os::unix::fs::chown(path, Some(want.uid()), Some(want.gid())).map_err(io(path))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn same_owner(_path: &Path, _like: &Path) -> Result<(), BackupError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn a_backup_must_leave_the_headroom_free() {
        let dir = Path::new("/var/lib/keygate/backups");
        let headroom = HEADROOM_MIB * MIB;
        assert!(check_space(dir, 500 * MIB, 500 * MIB + headroom).is_ok());
        let err = check_space(dir, 500 * MIB, 500 * MIB + headroom - 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "not enough free space for a backup in /var/lib/keygate/backups: it needs about \
             500 MiB and 64 MiB more kept free for the database, and 563 MiB is free; free \
             some space (older backups there can be deleted) or keep fewer backups \
             (backup_keep_last, backup_keep_days)"
        );
        assert!(check_space(dir, u64::MAX, u64::MAX - 1).is_err());
    }

    fn file(t: OffsetDateTime) -> BackupFile {
        BackupFile {
            path: PathBuf::from(format!("{t}")),
            taken_at: t,
            size: 1,
        }
    }

    /// A backup that does not fit runs retention first and is tried once more (lowering
    /// backup_keep_last makes room at the next run); with nothing to delete it is refused
    /// and nothing is written. Five older copies of a 4 MiB database fill an 80 MiB disk
    /// past a copy and the 64 MiB kept free for the database.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_backup_that_does_not_fit_makes_room_by_retention_first() {
        let test = "store::backup::tests::a_backup_that_does_not_fit_makes_room_by_retention_first";
        let Some(dir) = super::super::on_a_small_disk(test, "80m") else {
            return;
        };
        let db = dir.join("keygate.db");
        let backups = dir.join("backups");
        let conn = super::super::open(&db).unwrap();
        let value = "x".repeat(4_000);
        for i in 0..1_000 {
            super::super::settings::set(&conn, &format!("k{i}"), &value).unwrap();
        }
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        drop(conn);
        std::fs::create_dir(&backups).unwrap();
        let older: Vec<PathBuf> = (25..30)
            .map(|day| backups.join(format!("keygate-202606{day}T120000Z.db")))
            .collect();
        for copy in &older {
            std::fs::copy(&db, copy).unwrap();
        }
        let now = datetime!(2026-06-30 12:00 UTC);

        let refused = take_and_prune(&db, &backups, 10, 14, now, false).unwrap_err();
        assert!(matches!(refused, BackupError::NoSpace { .. }), "{refused}");
        assert_eq!(
            files_in(&backups).len(),
            5,
            "nothing written, nothing deleted"
        );

        let (file, pruned) = take_and_prune(&db, &backups, 1, 0, now, false).unwrap();
        assert_eq!(
            pruned, 5,
            "four to make room, the fifth once the new one is kept"
        );
        assert_eq!(list(&backups).unwrap(), std::slice::from_ref(&file));
        let copy = Connection::open(&file.path).unwrap();
        let rows: i64 = copy
            .query_row(
                "SELECT count(*) FROM settings WHERE key LIKE 'k%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rows, 1_000);
    }

    /// Restores import no license again here (the CLI's tests do).
    fn keep_the_backups(
        _: &Connection,
        _: &super::super::licenses::SignedVersion,
    ) -> Result<Option<String>, String> {
        Ok(None)
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn unfinished_backups_left_by_a_killed_process_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let backups = dir.path().join("backups");
        std::fs::create_dir(&backups).unwrap();
        let now = datetime!(2026-06-30 12:00 UTC);
        let db = dir.path().join("keygate.db");
        drop(super::super::open(&db).unwrap());
        let kept = take(&db, &backups, now).unwrap();
        let (killed, writing) = (backups.join(".a.db.1.tmp"), backups.join(".b.db.2.tmp"));
        std::fs::write(&killed, b"half a copy").unwrap();
        std::fs::write(&writing, b"being written").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&killed)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(660))
            .unwrap();
        assert_eq!(remove_unfinished(&backups, UNFINISHED_AT_START).unwrap(), 1);
        assert!(!killed.exists() && writing.exists() && kept.path.exists());
        assert_eq!(
            remove_unfinished(&dir.path().join("none"), UNFINISHED_AT_START).unwrap(),
            0
        );
        // The next backup removes those left a day (the service may run for months between
        // starts), not one another process may still be checking.
        let age = |path: &Path, secs: u64| {
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(secs))
                .unwrap()
        };
        let checking = backups.join(".c.db.3.tmp");
        std::fs::write(&checking, b"being checked").unwrap();
        age(&writing, 86_460);
        age(&checking, 3_600);
        take(&db, &backups, now + time::Duration::minutes(12)).unwrap();
        assert!(!writing.exists() && checking.exists());
    }

    #[test]
    fn a_failed_backup_leaves_nothing_and_a_good_one_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let backups = dir.path().join("backups");
        let now = datetime!(2026-06-30 12:00 UTC);
        let damaged = dir.path().join("damaged.db");
        std::fs::write(&damaged, vec![7u8; 64 * 1024]).unwrap();
        assert!(take(&damaged, &backups, now).is_err());
        assert!(files_in(&backups).is_empty(), "{:?}", files_in(&backups));

        let db = dir.path().join("keygate.db");
        drop(super::super::open(&db).unwrap());
        let file = take(&db, &backups, now).unwrap();
        assert_eq!(files_in(&backups), ["keygate-20260630T120000Z.db"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&file.path), 0o600);
            assert_eq!(mode(&backups), 0o700);
        }
    }

    /// Where links are not to be had, backups of one second are renamed into place, each
    /// to a name of its own.
    #[test]
    fn backups_are_placed_without_links_where_the_file_system_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let no_links = |_: &Path, _: &Path| -> std::io::Result<()> {
            Err(std::io::ErrorKind::PermissionDenied.into())
        };
        let mut placed = Vec::new();
        for i in 0..3 {
            let tmp = dir.path().join(format!(".copy{i}.tmp"));
            std::fs::write(&tmp, format!("copy {i}")).unwrap();
            let path =
                place_with(&tmp, dir.path(), "keygate-20260630T120000Z.db", no_links).unwrap();
            assert!(!tmp.exists());
            placed.push(file_name(&path));
        }
        assert_eq!(
            placed,
            [
                "keygate-20260630T120000Z.db",
                "keygate-20260630T120000Z-2.db",
                "keygate-20260630T120000Z-3.db"
            ]
        );
        let first = dir.path().join("keygate-20260630T120000Z.db");
        assert_eq!(std::fs::read_to_string(first).unwrap(), "copy 0");
    }

    /// The CLI's backup beside the service's in the same second: neither replaces the other,
    /// both are listed (the later first) and retention counts both.
    #[test]
    fn backups_taken_in_one_second_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        let backups = dir.path().join("backups");
        let db = dir.path().join("keygate.db");
        drop(super::super::open(&db).unwrap());
        let now = datetime!(2026-06-30 12:00 UTC);
        let taken: Vec<PathBuf> = (0..11)
            .map(|_| take(&db, &backups, now).unwrap().path)
            .collect();
        assert_eq!(file_name(&taken[0]), "keygate-20260630T120000Z.db");
        assert_eq!(file_name(&taken[1]), "keygate-20260630T120000Z-2.db");
        assert_eq!(file_name(&taken[10]), "keygate-20260630T120000Z-11.db");
        let listed: Vec<PathBuf> = list(&backups)
            .unwrap()
            .into_iter()
            .map(|f| f.path)
            .collect();
        assert_eq!(listed, taken.iter().rev().cloned().collect::<Vec<_>>());
        assert_eq!(prune(&backups, 10, 14, now, false).unwrap(), 1);
        assert!(!taken[0].exists() && taken[1].exists());
        // A backup before an upgrade is not one of them, whatever its name ends with.
        take_before_upgrade(&db, 3, now).unwrap();
        take_before_upgrade(&db, 3, now).unwrap();
        assert_eq!(list(&backups).unwrap().len(), 10);
        assert_eq!(
            files_in(&backups)
                .iter()
                .filter(|n| n.starts_with("keygate-schema3-before-upgrade-"))
                .count(),
            1
        );
    }

    #[test]
    fn a_backup_of_a_database_another_program_keeps_locked_fails_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keygate.db");
        drop(super::super::open(&db).unwrap());
        // A program holding the database in exclusive locking mode: no one else may read.
        let other = Connection::open(&db).unwrap();
        other
            .execute_batch("PRAGMA locking_mode = EXCLUSIVE; UPDATE settings SET value = value;")
            .unwrap();
        let copy = dir.path().join("copy.db");
        let started = Instant::now();
        let failed = copy_checked(&db, &copy, Duration::from_millis(300));
        assert!(
            matches!(failed, Err(BackupError::Locked { .. })),
            "{failed:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        // Once it lets go, the copy is made.
        drop(other);
        copy_checked(
            &db,
            &dir.path().join("copy2.db"),
            Duration::from_millis(300),
        )
        .unwrap();
    }

    #[test]
    fn the_data_directory_lock_is_waited_for_a_moment_only() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_file(dir.path(), Duration::ZERO).unwrap();
        assert!(matches!(
            lock_file(dir.path(), Duration::from_millis(50)),
            Err(BackupError::Running)
        ));
        // A copy of the descriptor, as a child process being started holds until it runs its
        // program, keeps the lock a moment after the server let go of it.
        let copy = held.try_clone().unwrap();
        drop(held);
        let starting_child = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(copy);
        });
        lock_file(dir.path(), LOCK_WAIT).unwrap();
        starting_child.join().unwrap();
    }

    #[test]
    fn restore_replaces_a_database_too_damaged_to_open_and_keeps_it_aside() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keygate.db");
        drop(super::super::open(&db).unwrap());
        let now = datetime!(2026-06-30 12:00 UTC);
        let good = take(&db, &dir.path().join("backups"), now).unwrap();
        std::fs::write(&db, b"garbage where the database was").unwrap();
        let wal = dir.path().join("keygate.db-wal");
        std::fs::write(&wal, b"and a WAL of garbage").unwrap();

        let aside = restore(&db, &good.path, "ours", now, &mut keep_the_backups)
            .unwrap()
            .aside;
        let conn = Connection::open(&db).unwrap();
        check(&conn, &db).unwrap();
        assert_eq!(
            std::fs::read(&aside).unwrap(),
            b"garbage where the database was"
        );
        assert_eq!(
            std::fs::read(side_file(&aside, "-wal")).unwrap(),
            b"and a WAL of garbage"
        );
    }

    #[test]
    fn restore_reads_a_backup_with_the_wal_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keygate.db");
        drop(super::super::open(&db).unwrap());
        // A database whose last write is still in its WAL, copied as it lies on disk (as a
        // restore keeps the database it replaces).
        let (live, kept) = (dir.path().join("live.db"), dir.path().join("kept.db"));
        let conn = super::super::open(&live).unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        super::super::settings::set(&conn, "marker", "in the WAL").unwrap();
        for suffix in ["", "-wal"] {
            std::fs::copy(side_file(&live, suffix), side_file(&kept, suffix)).unwrap();
        }
        drop(conn);
        let now = datetime!(2026-06-30 12:00 UTC);
        restore(&db, &kept, "ours", now, &mut keep_the_backups).unwrap();
        let conn = Connection::open(&db).unwrap();
        assert_eq!(
            super::super::settings::get(&conn, "marker")
                .unwrap()
                .as_deref(),
            Some("in the WAL")
        );
        let audited: (String, String) = conn
            .query_row(
                "SELECT action, target FROM audit_log ORDER BY id DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(audited, ("backup restored".into(), "kept.db".into()));
        // Only the copy was opened: nothing new beside the backup, nothing of the copy left.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("kept") || n.contains("restoring"))
            .collect();
        names.sort();
        assert_eq!(names, ["kept.db", "kept.db-wal"]);
    }

    #[test]
    fn restores_in_one_second_keep_each_replaced_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keygate.db");
        let now = datetime!(2026-06-30 12:00 UTC);
        drop(super::super::open(&db).unwrap());
        let backup = take(&db, &dir.path().join("backups"), now).unwrap();
        let first = restore(&db, &backup.path, "ours", now, &mut keep_the_backups)
            .unwrap()
            .aside;
        let second = restore(&db, &backup.path, "ours", now, &mut keep_the_backups)
            .unwrap()
            .aside;
        let third = restore(&db, &backup.path, "ours", now, &mut keep_the_backups)
            .unwrap()
            .aside;
        assert_eq!(
            file_name(&first),
            "keygate.db.before-restore-20260630T120000Z"
        );
        assert_eq!(
            file_name(&second),
            "keygate.db.before-restore-20260630T120000Z-2"
        );
        assert_eq!(
            file_name(&third),
            "keygate.db.before-restore-20260630T120000Z-3"
        );
        assert!(first.exists() && second.exists());
    }

    #[test]
    fn a_database_of_another_appliance_is_refused_by_what_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keygate.db");
        let now = datetime!(2026-06-30 12:00 UTC);
        drop(super::super::open(&db).unwrap());
        let before = std::fs::read(&db).unwrap();
        // Served by another installation...
        let served = dir.path().join("served.db");
        let conn = super::super::open(&served).unwrap();
        super::super::settings::set(&conn, INSTALLATION, "OTHR-0000").unwrap();
        drop(conn);
        let err = restore(&db, &served, "ours", now, &mut keep_the_backups)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("it was served by installation OTHR-0000"),
            "{err}"
        );
        // ...or holding a license bound to another one (a backup older than the record).
        let licensed = dir.path().join("licensed.db");
        let conn = super::super::open(&licensed).unwrap();
        let payload = serde_json::json!({
            "v": 1, "license_id": "LIC-X", "version": 1, "vendor": "V", "organization_id": "1",
            "issued_at": "2026-01-01T00:00:00Z",
            "appliance": {"installation_id": "OTHR-0001", "public_key": "AA"}, "items": []
        });
        let key = keygate_sdk::keys::generate_signing_key();
        super::super::licenses::ensure_organization(&conn, "1", "V", 0).unwrap();
        let jws = keygate_sdk::jws::sign(keygate_sdk::jws::Typ::License, &payload, &key);
        conn.execute(
            "INSERT INTO licenses (license_id, version, vendor, organization_id, issued_at,
                 kid, jws, sha256, imported_at) VALUES ('LIC-X', 1, 'V', '1', 0, 'k', ?1, 's', 0)",
            [&jws],
        )
        .unwrap();
        drop(conn);
        let err = restore(&db, &licensed, "ours", now, &mut keep_the_backups)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("its license LIC-X is bound to installation OTHR-0001"),
            "{err}"
        );
        assert_eq!(std::fs::read(&db).unwrap(), before, "nothing replaced");
    }

    #[test]
    fn the_database_restore_replaces_is_whole_without_its_wal() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keygate.db");
        let now = datetime!(2026-06-30 12:00 UTC);
        drop(super::super::open(&db).unwrap());
        let backup = take(&db, &dir.path().join("backups"), now).unwrap();
        // The database as a killed service leaves it: its last commit in the WAL only.
        let live = dir.path().join("live.db");
        let conn = super::super::open(&live).unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        super::super::settings::set(&conn, "marker", "committed last").unwrap();
        for suffix in ["", "-wal"] {
            std::fs::copy(side_file(&live, suffix), side_file(&db, suffix)).unwrap();
        }
        drop(conn);
        let aside = restore(&db, &backup.path, "ours", now, &mut keep_the_backups)
            .unwrap()
            .aside;
        // The main file kept aside holds that commit by itself: so did `db` at every moment
        // before the rename that put the backup in its place.
        let alone = dir.path().join("alone.db");
        std::fs::copy(&aside, &alone).unwrap();
        let conn = Connection::open(&alone).unwrap();
        assert_eq!(
            super::super::settings::get(&conn, "marker")
                .unwrap()
                .as_deref(),
            Some("committed last")
        );
    }

    /// The replaced database's licenses are imported again into the restored copy before it
    /// takes its place (a restore cut short after the swap serves no superseded license):
    /// each in a transaction of its own, one that fails changing nothing and told.
    #[test]
    fn licenses_are_imported_again_into_the_copy_before_it_takes_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keygate.db");
        let conn = super::super::open(&db).unwrap();
        let now = datetime!(2026-06-30 12:00 UTC);
        let backup = take(&db, &dir.path().join("backups"), now).unwrap();
        conn.execute_batch(
            "INSERT INTO organizations VALUES ('org', 'Acme', 0);
             INSERT INTO licenses VALUES ('LIC-1', 2, 'Acme', 'org', 0, 'k', 'jws1', 'h1', 0),
                                         ('LIC-2', 3, 'Acme', 'org', 0, 'k', 'jws2', 'h2', 0);",
        )
        .unwrap();
        drop(conn);

        let mut offered = Vec::new();
        let restored = restore(&db, &backup.path, "ours", now, &mut |copy, license| {
            let live = Connection::open(&db).unwrap();
            let count = |c: &Connection| -> i64 {
                c.query_row("SELECT count(*) FROM licenses", [], |r| r.get(0))
                    .unwrap()
            };
            offered.push((license.license_id.clone(), count(&live), count(copy)));
            super::super::settings::set(copy, &license.license_id, &license.jws).unwrap();
            match license.license_id.as_str() {
                "LIC-1" => Ok(Some("imported".into())),
                _ => Err("refused".into()),
            }
        })
        .unwrap();
        offered.sort();
        assert_eq!(
            offered,
            [("LIC-1".into(), 2, 0), ("LIC-2".into(), 2, 0)],
            "offered with the copy while the live database was the replaced one"
        );
        assert_eq!(
            restored.handed_on,
            ["license LIC-1 version 2, newer than the backup's, imported again: imported"]
        );
        assert_eq!(restored.not_handed_on, ["license LIC-2 version 3: refused"]);
        let conn = Connection::open(&db).unwrap();
        let get = |key| super::super::settings::get(&conn, key).unwrap();
        assert_eq!(get("LIC-1").as_deref(), Some("jws1"));
        assert_eq!(
            get("LIC-2"),
            None,
            "the failed import's transaction rolled back"
        );
    }

    /// What the restore writes into its copy (the licenses handed on, its audit entry) is
    /// in the copy's own file before it takes the database's place, or the restore fails:
    /// here another program reading the copy keeps its WAL from being folded in.
    #[test]
    fn a_restore_whose_copy_keeps_its_wal_fails_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keygate.db");
        let conn = super::super::open(&db).unwrap();
        let now = datetime!(2026-06-30 12:00 UTC);
        let backup = take(&db, &dir.path().join("backups"), now).unwrap();
        conn.execute_batch(
            "INSERT INTO organizations VALUES ('org', 'Acme', 0);
             INSERT INTO licenses VALUES ('LIC-1', 2, 'Acme', 'org', 0, 'k', 'jws1', 'h1', 0);",
        )
        .unwrap();
        drop(conn);

        let mut reader = None;
        let failed = restore(&db, &backup.path, "ours", now, &mut |copy, license| {
            super::super::settings::set(copy, &license.license_id, &license.jws).unwrap();
            let other = Connection::open(dir.path().join("keygate.db.restoring")).unwrap();
            other
                .execute_batch("BEGIN; SELECT count(*) FROM settings;")
                .unwrap();
            reader = Some(other);
            Ok(Some("imported".into()))
        });
        drop(reader);
        let failed = failed.unwrap_err().to_string();
        assert!(
            failed.contains("the restored copy was not completed"),
            "{failed}"
        );
        let conn = Connection::open(&db).unwrap();
        let licenses: i64 = conn
            .query_row("SELECT count(*) FROM licenses", [], |r| r.get(0))
            .unwrap();
        assert_eq!(licenses, 1, "the database is the one that was there");
        assert!(!dir.path().join("keygate.db.restoring").exists());
    }

    #[test]
    fn restore_keeps_the_newest_time_the_appliance_has_used() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keygate.db");
        let newest = |conn: &Connection| crate::store::ops::newest_time(conn).unwrap();
        let set = |t: i64| {
            let conn = super::super::open(&db).unwrap();
            super::super::settings::set(&conn, crate::clock::NEWEST_TIME, &t.to_string()).unwrap();
        };
        let now = datetime!(2026-06-30 12:00 UTC);
        set(1_000);
        let older = take(&db, &dir.path().join("backups"), now).unwrap();
        set(5_000);
        let newer = take(&dir.path().join("keygate.db"), &dir.path().join("b2"), now).unwrap();

        // An older backup: the live database's newer time stays.
        restore(&db, &older.path, "ours", now, &mut keep_the_backups).unwrap();
        let conn = Connection::open(&db).unwrap();
        assert_eq!(newest(&conn), 5_000);
        drop(conn);
        // A backup newer than the live database keeps its own.
        set(3_000);
        restore(
            &db,
            &newer.path,
            "ours",
            now + Duration::from_secs(1),
            &mut keep_the_backups,
        )
        .unwrap();
        assert_eq!(newest(&Connection::open(&db).unwrap()), 5_000);
        // Nothing of the restore's own copy is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.contains("restoring"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn backups_taken_while_the_clock_ran_ahead_count_as_the_oldest() {
        let now = datetime!(2026-06-30 12:00 UTC);
        // Twelve taken a day ahead, every 12 minutes, newest first; then the clock was set
        // right and three more were taken.
        let ahead =
            (0..12).map(|i| file(now + time::Duration::days(1) - time::Duration::minutes(12 * i)));
        let since = (0..3).map(|i| file(now - time::Duration::minutes(12 * i)));
        let files: Vec<_> = ahead.chain(since).collect();
        for keep_days in [0, 14] {
            let doomed = to_prune(&files, 10, keep_days, now);
            assert_eq!(doomed.len(), 5, "keep_days {keep_days}");
            assert!(
                doomed.iter().all(|f| f.taken_at > now),
                "the three taken since are kept"
            );
        }
    }

    /// Retention run by two processes at once (`keygate backup` beside the service) does not
    /// fail on a file the other removed first.
    #[test]
    fn a_backup_removed_meanwhile_is_no_failure_for_retention() {
        let dir = tempfile::tempdir().unwrap();
        let now = datetime!(2026-06-30 12:00 UTC);
        for minutes in [0, 12, 24] {
            let at = now - time::Duration::minutes(minutes);
            std::fs::write(
                dir.path()
                    .join(format!("keygate-{}.db", at.format(STAMP).unwrap())),
                b"x",
            )
            .unwrap();
        }
        let listed = list(dir.path()).unwrap();
        let doomed = to_prune(&listed, 1, 0, now);
        assert_eq!(doomed.len(), 2);
        std::fs::remove_file(&doomed[0].path).unwrap();
        assert_eq!(delete(&doomed).unwrap(), 2);
        assert_eq!(list(dir.path()).unwrap(), listed[..1]);
    }

    /// A clock jumping a year ahead (a board's clock reset, a bad time source) does not
    /// make the two weeks of daily backups "old": the days kept are the last days that have
    /// a backup, so the daily ones stay until that many days with backups have come since.
    #[test]
    fn a_clock_jumping_ahead_keeps_the_daily_backups() {
        let before = datetime!(2026-06-30 12:00 UTC);
        let jumped = before + time::Duration::days(365);
        // One backup every 12 minutes for 20 days, then one after the jump, newest first.
        let files: Vec<_> = std::iter::once(file(jumped))
            .chain((0..20 * 120).map(|i| file(before - time::Duration::minutes(12 * i))))
            .collect();
        let doomed = to_prune(&files, 10, 14, jumped);
        let kept: Vec<_> = files.iter().filter(|f| !doomed.contains(f)).collect();
        let days: std::collections::BTreeSet<_> = kept.iter().map(|f| f.taken_at.date()).collect();
        assert_eq!(
            days.len(),
            14,
            "the jump's day and 13 days before it: {days:?}"
        );
        assert_eq!(
            kept.len(),
            10 + 12,
            "the newest 10, and the newest of 12 more days"
        );
    }

    #[test]
    fn retention_keeps_the_last_ten_and_one_a_day_for_fourteen_days() {
        let now = datetime!(2026-06-30 12:00 UTC);
        // One backup every 12 minutes for 20 days, newest first.
        let files: Vec<_> = (0..20 * 120)
            .map(|i| file(now - time::Duration::minutes(12 * i)))
            .collect();
        let doomed = to_prune(&files, 10, 14, now);
        let kept: Vec<_> = files.iter().filter(|f| !doomed.contains(f)).collect();
        assert_eq!(
            kept.len(),
            10 + 13,
            "the newest 10 (today) and one for each of the 13 days before"
        );
        assert!(kept[..10].iter().all(|f| f.taken_at >= files[9].taken_at));
        let days: std::collections::BTreeSet<_> =
            kept[10..].iter().map(|f| f.taken_at.date()).collect();
        assert_eq!(days.len(), 13, "one a day, each on its own day: {days:?}");
        assert_eq!(
            kept[22].taken_at.date(),
            now.date() - time::Duration::days(13),
            "the oldest kept goes back two weeks, today's included"
        );
        // Days without a backup (the appliance was off) do not count.
        let gaps: Vec<_> = files
            .iter()
            .filter(|f| f.taken_at.day() % 2 == 0)
            .cloned()
            .collect();
        let doomed = to_prune(&gaps, 1, 3, now);
        let kept: Vec<_> = gaps
            .iter()
            .filter(|f| !doomed.contains(f))
            .map(|f| f.taken_at.date())
            .collect();
        assert_eq!(
            kept,
            [
                now.date(),
                datetime!(2026-06-28 0:00 UTC).date(),
                datetime!(2026-06-26 0:00 UTC).date()
            ]
        );
    }
}
