//! Scheduled work: the one list of jobs, each a plain async function that tests call
//! directly. Every run is recorded (start, duration, outcome); a failed run is logged at
//! ERROR (which also emails the recipients) and the scheduler goes on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use actix_web::web;
use askama::Template;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_cron_scheduler::JobScheduler;

use crate::alerts::notices::{ErrorEvent, ErrorNotices, Notice};
use crate::alerts::{self, CertificateWarning, Crossing, mail};
use crate::clock::NEWEST_TIME;
use crate::licensing::models::{self, DAY, WINDOW_SECS};
use crate::server::AppState;
use crate::store::{self, StoreError, backup, ops, settings};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Mail(#[from] mail::MailError),
    #[error(transparent)]
    Backup(#[from] backup::BackupError),
    #[error("the {0} job is running already: this run is skipped")]
    Busy(&'static str),
    #[error("{0}")]
    Other(String),
}

/// The scheduled jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Job {
    Alerts,
    Backup,
    Housekeeping,
}

impl Job {
    pub const ALL: [Job; 3] = [Job::Alerts, Job::Backup, Job::Housekeeping];

    /// The name in the log, the job runs table and the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Job::Alerts => "alerts",
            Job::Backup => "backup",
            Job::Housekeeping => "housekeeping",
        }
    }

    /// What it is for, logged when it is scheduled.
    fn reason(self) -> &'static str {
        match self {
            Job::Alerts => {
                "email the recipients when a license item crosses a usage or expiry threshold"
            }
            Job::Backup => "an online backup of the database, checked, with retention",
            Job::Housekeeping => {
                "free lapsed seats, summarise old concurrency windows, drop expired passes"
            }
        }
    }

    /// Seconds between two runs.
    fn every(self, config: &crate::config::JobsConfig) -> u64 {
        match self {
            Job::Alerts => config.alerts_every_s,
            Job::Backup => config.backup_every_s,
            Job::Housekeeping => config.housekeeping_every_s,
        }
    }

    /// The job of that name.
    pub fn named(name: &str) -> Option<Job> {
        Job::ALL.into_iter().find(|job| job.name() == name)
    }
}

/// The jobs running now.
#[derive(Debug, Default)]
pub struct RunningJobs(Mutex<std::collections::HashSet<Job>>);

/// A job's mark in [`RunningJobs`], taken off when the run ends, however it ends.
struct Running<'a>(&'a RunningJobs, Job);

impl RunningJobs {
    /// Marks `job` running; `None` if it is already.
    fn start(&self, job: Job) -> Option<Running<'_>> {
        let mut running = self.0.lock().expect("running jobs lock");
        // Made only when inserted: a mark dropped here would take the lock held above.
        running.insert(job).then(|| Running(self, job))
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.0.lock().expect("running jobs lock").remove(&self.1);
    }
}

/// Runs a job's work, turning a panic (a bug) into a failure that is recorded and emailed
/// like any other: the panic's message is in the log.
async fn contained(
    work: impl std::future::Future<Output = Result<String, JobError>>,
) -> Result<String, JobError> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            Err(JobError::Other(
                "the job panicked (a bug: see the log)".into(),
            ))
        })
}

/// The settings key holding when this appliance first started.
const FIRST_START: &str = "jobs_first_start";

/// Remembers when this appliance first started (once): the reference of a job that never
/// ran, for [`next_due`].
pub fn remember_first_start(conn: &rusqlite::Connection, now: i64) -> Result<(), StoreError> {
    if settings::get(conn, FIRST_START)?.is_none() {
        settings::set(conn, FIRST_START, &now.to_string())?;
    }
    Ok(())
}

/// How long until each job is due: its interval after its last run (or, if it never ran,
/// after the appliance's first start), zero when that has passed. The scheduler counts
/// intervals from its own start, so an appliance restarted more often than a job's interval
/// (a daily reboot, package upgrades) would otherwise never run it, and one restarted just
/// before a job was due would put it off for a whole interval.
pub fn next_due(
    conn: &rusqlite::Connection,
    config: &crate::config::JobsConfig,
    now: i64,
) -> Result<Vec<(Job, Duration)>, StoreError> {
    let first_start = settings::get(conn, FIRST_START)?
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(now);
    let mut due = Vec::new();
    for job in Job::ALL {
        let last = ops::last_job_run(conn, job.name(), now)?.unwrap_or(first_start);
        let wait = (last.min(now) + job.every(config) as i64 - now).max(0) as u64;
        due.push((job, Duration::from_secs(wait)));
    }
    Ok(due)
}

/// Saves the newest time used, for the next start to check the clock against.
pub async fn save_newest_time(state: &AppState) -> Result<(), StoreError> {
    let newest = state.watermark.newest().to_string();
    state
        .store
        .write(move |conn| settings::set(conn, NEWEST_TIME, &newest))
        .await
}

/// Starts the scheduler and the error notifier; they run until the process ends. Each job
/// first runs when it is due (see [`next_due`]): at once if that has passed.
pub async fn start(
    state: web::Data<AppState>,
    errors: Option<UnboundedReceiver<ErrorEvent>>,
) -> Result<JobScheduler, JobError> {
    let (jobs, now) = (
        state.config.jobs.clone(),
        state.clock.now().unix_timestamp(),
    );
    let waits = state
        .store
        .read(move |conn| next_due(conn, &jobs, now))
        .await?;
    let started = Instant::now();
    let next: NextDue = Arc::new(Mutex::new(
        waits
            .into_iter()
            .map(|(job, wait)| (job, started + wait))
            .collect(),
    ));
    let scheduler = JobScheduler::new()
        .await
        .map_err(|e| JobError::Other(e.to_string()))?;
    for job in Job::ALL {
        let (every, reason) = (job.every(&state.config.jobs), job.reason());
        tracing::info!(job = job.name(), every_s = every, reason, "scheduled");
    }
    let ids = plan(&scheduler, &state, &next).await?;
    scheduler
        .start()
        .await
        .map_err(|e| JobError::Other(e.to_string()))?;
    actix_web::rt::spawn(watch_clock(scheduler.clone(), state.clone(), next, ids));
    if let Some(errors) = errors {
        actix_web::rt::spawn(notify_errors(state, errors));
    }
    Ok(scheduler)
}

/// When each job is next due, on the monotonic clock.
type NextDue = Arc<Mutex<HashMap<Job, Instant>>>;

fn spawn_run(state: &web::Data<AppState>, next: &NextDue, job: Job) {
    let state = state.clone();
    let every = Duration::from_secs(job.every(&state.config.jobs));
    next.lock()
        .expect("next due lock")
        .insert(job, Instant::now() + every);
    tokio::spawn(async move {
        let _ = run(&state, job).await;
    });
}

/// Adds the jobs to the scheduler, each first planned when it is due and then every
/// interval; a job due already runs at once. Returns their ids.
async fn plan(
    scheduler: &JobScheduler,
    state: &web::Data<AppState>,
    next: &NextDue,
) -> Result<Vec<uuid::Uuid>, JobError> {
    let scheduling = |e: tokio_cron_scheduler::JobSchedulerError| JobError::Other(e.to_string());
    let mut ids = Vec::new();
    for job in Job::ALL {
        let due = next.lock().expect("next due lock").get(&job).copied();
        let wait = due.map_or(Duration::ZERO, |at| {
            at.saturating_duration_since(Instant::now())
        });
        if wait.is_zero() {
            tracing::info!(job = job.name(), "due: running it now");
            spawn_run(state, next, job);
        }
        let (state, next) = (state.clone(), next.clone());
        let every = Duration::from_secs(job.every(&state.config.jobs));
        let mut planned = tokio_cron_scheduler::Job::new_repeated_async(every, move |_, _| {
            spawn_run(&state, &next, job);
            Box::pin(async {})
        })
        .map_err(scheduling)?;
        if !wait.is_zero() {
            // Its first run when it is due (the scheduler would plan it an interval away).
            let mut data = planned.job_data().map_err(scheduling)?;
            let first = SystemTime::now() + wait;
            data.next_tick = first
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |t| t.as_secs_f64().ceil() as u64);
            planned.set_job_data(data).map_err(scheduling)?;
        }
        ids.push(scheduler.add(planned).await.map_err(scheduling)?);
    }
    Ok(ids)
}

/// How often the wall clock is compared with the monotonic one, and the step that counts.
const CLOCK_WATCH: Duration = Duration::from_secs(5);
const CLOCK_STEP: Duration = Duration::from_secs(2);
/// How often the newest time used is saved besides each job run: a process killed (or a
/// power cut) loses at most this much of it, whatever the jobs' intervals.
const NEWEST_TIME_SAVED: Duration = Duration::from_secs(60);

/// How far the wall clock moved beyond the monotonic one between two readings, in seconds
/// (negative: stepped back).
fn clock_step(before: (Instant, SystemTime), after: (Instant, SystemTime)) -> f64 {
    let wall = match after.1.duration_since(before.1) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(back) => -back.duration().as_secs_f64(),
    };
    wall - after.0.duration_since(before.0).as_secs_f64()
}

/// How late a job may run, on the monotonic clock, before the jobs are planned again: the
/// scheduler looks every half second and plans in whole seconds.
const JOB_LATE: Duration = Duration::from_secs(10);

/// The job most overdue by more than [`JOB_LATE`] at `now`, and by how long.
fn overdue(next: &HashMap<Job, Instant>, now: Instant) -> Option<(Job, Duration)> {
    next.iter()
        .map(|(job, due)| (*job, now.saturating_duration_since(*due)))
        .filter(|(_, late)| *late > JOB_LATE)
        .max_by_key(|(_, late)| *late)
}

/// tokio-cron-scheduler (0.15) times a repeated job on the wall clock: its next run is the
/// previous planned one plus the interval, and it runs only while its last run is not later
/// than that. A clock stepped forward past a planned run (a resumed VM, NTP setting the time
/// at boot) stops the job for good, and so does a run later than the next planned one (the
/// process frozen, stopped by a signal or in a paused VM, for longer than an interval); one
/// stepped back holds every job for as long as the step. This watches for steps, and for a
/// job overdue on the monotonic clock, and then plans the jobs again from the current time,
/// each when it is due on the monotonic clock.
async fn watch_clock(
    scheduler: JobScheduler,
    state: web::Data<AppState>,
    next: NextDue,
    mut ids: Vec<uuid::Uuid>,
) {
    let mut tick = tokio::time::interval(CLOCK_WATCH);
    let mut before = (Instant::now(), SystemTime::now());
    let mut saved = Instant::now();
    loop {
        tick.tick().await;
        let now = (Instant::now(), SystemTime::now());
        if now.0.duration_since(saved) >= NEWEST_TIME_SAVED {
            saved = now.0;
            if let Err(e) = save_newest_time(&state).await {
                tracing::warn!(error = %e, "could not save the newest time used");
            }
        }
        let step = clock_step(before, now);
        before = now;
        if step.abs() >= CLOCK_STEP.as_secs_f64() {
            tracing::warn!(
                step_s = step.round() as i64,
                "the system clock was stepped: the scheduled jobs are planned again from now"
            );
        } else if let Some((job, late)) = overdue(&next.lock().expect("next due lock"), now.0) {
            tracing::warn!(
                job = job.name(),
                late_s = late.as_secs(),
                "a scheduled job is overdue (was keygate frozen?): the jobs are planned again \
                 from now"
            );
        } else {
            continue;
        }
        for id in ids.drain(..) {
            let _ = scheduler.remove(&id).await;
        }
        match plan(&scheduler, &state, &next).await {
            Ok(planned) => ids = planned,
            Err(e) => tracing::error!(kind = "job", error = %e, "planning the jobs again failed"),
        }
    }
}

/// Runs one job now and records the run.
pub async fn run(state: &AppState, job: Job) -> Result<String, JobError> {
    let name = job.name();
    let Some(_running) = state.running_jobs.start(job) else {
        tracing::info!(job = name, "job running already; this run is skipped");
        return Err(JobError::Busy(name));
    };
    let started = state.clock.now();
    // Jobs run whatever the clock; a clock set back is logged (and emailed) once.
    let _ = state.watermark.check(started.unix_timestamp());
    let clock = std::time::Instant::now();
    let result = contained(async {
        match job {
            Job::Alerts => send_alerts(state).await,
            Job::Backup => take_backup(state).await,
            Job::Housekeeping => housekeeping(state).await,
        }
    })
    .await;
    state.metrics.job_ran(job, result.is_ok());
    let (ok, detail) = match &result {
        Ok(detail) => (true, detail.clone()),
        Err(e) => {
            // A kind per job: a kind's notice tells its newest error only, and one job's
            // failure must not hide another's.
            let kind = format!("job {name}");
            tracing::error!(kind = kind.as_str(), job = name, error = %e, "scheduled job failed");
            (false, e.to_string())
        }
    };
    let ms = clock.elapsed().as_millis() as i64;
    let (at, newest) = (
        started.unix_timestamp(),
        state.watermark.newest().to_string(),
    );
    if let Err(e) = state
        .store
        .write(move |conn| {
            ops::record_job_run(conn, name, at, ms, ok, &detail)?;
            settings::set(conn, NEWEST_TIME, &newest)
        })
        .await
    {
        tracing::warn!(error = %e, "could not record a job run");
    }
    result
}

/// Where email links point: the configured public URL, else this host's HTTPS address (the
/// port it serves on, which `listen` may leave to the system).
fn portal_url(state: &AppState) -> String {
    portal_url_of(&state.config, state.port.get().copied())
}

/// The portal's address in emails: `public_url`, else this host on the port it serves on
/// (`None`: not listening, the configured one).
fn portal_url_of(config: &crate::config::Config, port: Option<u16>) -> String {
    config
        .public_url
        .as_deref()
        .map(|u| u.trim_end_matches('/').to_string())
        .unwrap_or_else(|| {
            format!(
                "https://{}:{}",
                crate::appliance::hostname(),
                port.unwrap_or(config.listen.port())
            )
        })
}

#[derive(Template)]
#[template(path = "email/alert.txt")]
struct AlertText<'a> {
    alert: Alert<'a>,
}

#[derive(Template)]
#[template(path = "email/alert.html")]
struct AlertHtml<'a> {
    alert: Alert<'a>,
}

/// What an alert email tells: license thresholds crossed and the served certificate's
/// nearest expiry warning.
struct Alert<'a> {
    appliance: &'a str,
    installation_id: &'a str,
    portal: &'a str,
    crossings: &'a [Crossing],
    certificate: Option<&'a CertificateWarning>,
}

impl Alert<'_> {
    fn subject(&self) -> String {
        let host = self.appliance;
        match (self.crossings.len(), self.certificate) {
            (n, None) => format!("keygate: {n} license threshold(s) crossed on {host}"),
            (0, Some(c)) => format!(
                "keygate: the TLS certificate of {host} expires in {} day(s) or less",
                c.days
            ),
            (n, Some(c)) => format!(
                "keygate: {n} license threshold(s) crossed on {host}; its TLS certificate expires in {} day(s) or less",
                c.days
            ),
        }
    }
}

/// How long the appliance's own emails (alerts, error notices) leave settings the SMTP
/// server refused for good (a wrong password, a sender not allowed) before trying them
/// again: a directory locks an account after a few failed sign-ins. Other settings, or a
/// portal test email that goes through, are tried at once.
const REFUSED_PAUSE: Duration = Duration::from_secs(3600);

/// The SMTP settings last refused for good, when, and why.
#[derive(Debug, Default)]
pub struct SmtpRefusal(Mutex<Option<(mail::SmtpSettings, Instant, String)>>);

impl SmtpRefusal {
    /// Why `settings` are not to be tried now, if they were refused less than
    /// [`REFUSED_PAUSE`] ago.
    fn holds(&self, settings: &mail::SmtpSettings) -> Option<mail::MailError> {
        let refusal = self.0.lock().unwrap_or_else(|e| e.into_inner());
        refusal
            .as_ref()
            .filter(|(refused, at, _)| refused == settings && at.elapsed() < REFUSED_PAUSE)
            .map(|(_, at, why)| mail::MailError::Paused {
                minutes_ago: at.elapsed().as_secs() / 60,
                why: why.clone(),
            })
    }

    /// Remembers how a delivery with `settings` ended: refused for good, or through (which
    /// lifts a pause of these very settings only).
    fn note<T>(&self, settings: &mail::SmtpSettings, result: &Result<T, mail::MailError>) {
        let mut refusal = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Err(mail::MailError::Refused(why)) => {
                *refusal = Some((settings.clone(), Instant::now(), why.clone()));
            }
            Ok(_)
                if refusal
                    .as_ref()
                    .is_some_and(|(refused, ..)| refused == settings) =>
            {
                *refusal = None;
            }
            _ => {}
        }
    }

    /// A portal test email went through with `settings`: if they are the paused ones, the
    /// appliance's own emails use them again at once. (A refused test records nothing: the
    /// settings tested may not be the ones saved.)
    pub fn tested<T>(&self, settings: &mail::SmtpSettings, result: &Result<T, mail::MailError>) {
        if result.is_ok() {
            self.note(settings, result);
        }
    }
}

/// Sends the appliance's own email: not with settings refused for good a moment ago
/// ([`REFUSED_PAUSE`]), else once or, with `quick_retries`, a few times (not after a
/// permanent refusal); a delivery still failing is retried by the next run.
async fn send_own(
    state: &AppState,
    settings: &mail::SmtpSettings,
    to: &[lettre::message::Mailbox],
    email: &mail::Email,
    quick_retries: bool,
) -> Result<String, mail::MailError> {
    if let Some(paused) = state.smtp_refusal.holds(settings) {
        return Err(paused);
    }
    let result = if quick_retries {
        deliver(settings, to, email).await
    } else {
        mail::send(settings, to, email).await
    };
    state.smtp_refusal.note(settings, &result);
    result
}

/// Sends with a few quick retries after a failure that may pass: not after a permanent
/// refusal (a wrong password tried again at once counts towards the account's lockout), nor
/// after no answer in time (the server may have taken the message: a retry would send it
/// again), nor settings that fail the same way each time.
async fn deliver(
    settings: &mail::SmtpSettings,
    to: &[lettre::message::Mailbox],
    email: &mail::Email,
) -> Result<String, mail::MailError> {
    let mut wait = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match mail::send(settings, to, email).await {
            Ok(answer) => return Ok(answer),
            // Only a failure that may pass (not a refusal, nor what the same settings
            // fail on again, nor no answer: the server may have taken the message).
            Err(e) if attempt < 3 && matches!(e, mail::MailError::Smtp(_)) => {
                tracing::warn!(attempt, error = %e, "email delivery failed; retrying");
                tokio::time::sleep(wait).await;
                wait *= 4;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The alerts job: every threshold newly crossed, and the served certificate's expiry
/// warnings, in one email to the recipients; marked sent only once the SMTP server accepted it.
pub async fn send_alerts(state: &AppState) -> Result<String, JobError> {
    let now = state.clock.now().unix_timestamp();
    // Seats whose time is up count no more: freed first (as the next request would), so
    // a per_active_device item is not reported full of seats that lapsed since. Failing
    // that, the alerts still go.
    if let Err(e) = free_lapsed_seats(state, now).await {
        tracing::warn!(error = %e, "could not free the lapsed seats before the alerts");
    }
    // Tokens of top-ups that started since they were imported pay the debts first, before
    // the alerts tell the balances (a tokens request does so too, before it buys a pass).
    state
        .store
        .write(move |conn| crate::licensing::import::settle_started(conn, now))
        .await?;
    let warnings = crate::tls::not_after(&state.certificate.current())
        .map(|t| alerts::certificate_warnings(t.unix_timestamp(), now))
        .unwrap_or_default();
    // The crossings found are written down before their email, in one transaction with
    // what was told: a crossing the figure leaves before the email could go is told still.
    let (tell, warn, smtp, recipients) = state
        .store
        .write(move |conn| {
            let mut tell: Vec<Crossing> = Vec::new();
            let items = store::licenses::all_items(conn)?;
            for item in items.iter().filter(|i| !i.withdrawn) {
                let mut crossed = alerts::crossed(item, now);
                if alerts::succeeded(item, &items) {
                    crossed.retain(|c| !c.key.starts_with("expiry:"));
                }
                let marks = ops::alert_marks(conn, &item.item_id)?;
                let plan = alerts::plan(&crossed, &marks, now);
                ops::apply_alert_plan(conn, &item.item_id, &plan, now)?;
                let marks = ops::alert_marks(conn, &item.item_id)?;
                tell.extend(alerts::to_tell(item, &marks, &crossed));
            }
            let (warn, unwarn) =
                alerts::certificate_plan(&warnings, &ops::certificate_marks(conn)?);
            for key in &unwarn {
                ops::clear_certificate_mark(conn, key)?;
            }
            let smtp = mail::load_settings(conn)?;
            let recipients = settings::get(conn, mail::RECIPIENTS)?.unwrap_or_default();
            Ok::<_, JobError>((tell, warn, smtp, recipients))
        })
        .await?;
    let count = tell.len() + warn.len();
    if count == 0 {
        return Ok("no new threshold crossed".into());
    }
    let to = mail::parse_recipients(&recipients)?;
    let Some(smtp) = smtp.filter(|_| !to.is_empty()) else {
        return Ok(format!(
            "{count} threshold(s) crossed; no recipients or SMTP server configured"
        ));
    };
    let host = crate::appliance::hostname();
    let portal = portal_url(state);
    let alert = || Alert {
        appliance: &host,
        installation_id: state.appliance.installation_id(),
        portal: &portal,
        crossings: &tell,
        certificate: warn.iter().min_by_key(|w| w.days),
    };
    let render = |e: askama::Error| JobError::Other(format!("email template: {e}"));
    let email = mail::Email {
        subject: alert().subject(),
        text: AlertText { alert: alert() }.render().map_err(render)?,
        html: AlertHtml { alert: alert() }.render().map_err(render)?,
    };
    let answer = send_own(state, &smtp, &to, &email, true).await?;
    state
        .store
        .write(move |conn| {
            for c in &tell {
                ops::set_alert_sent(conn, &c.item_id, &c.key, c.basis, now)?;
            }
            for w in &warn {
                ops::set_certificate_mark(conn, &w.key, w.expires_at)?;
            }
            Ok::<_, StoreError>(())
        })
        .await?;
    Ok(format!(
        "sent {count} threshold(s) to {} recipient(s): {answer}",
        to.len()
    ))
}

pub const LAST_BACKUP: &str = "last_backup";

/// The backup job: a checked online backup, then retention.
pub async fn take_backup(state: &AppState) -> Result<String, JobError> {
    let now = state.clock.now();
    let db = state.config.database_path();
    let dir = state.config.data_dir.join(backup::BACKUP_DIR);
    let (keep_last, keep_days) = (
        state.config.jobs.backup_keep_last,
        state.config.jobs.backup_keep_days,
    );
    // A clock set back names this backup in the past (see `backup::prune`).
    let set_back = state.watermark.check(now.unix_timestamp()).is_err();
    let (file, pruned) =
        web::block(move || backup::take_and_prune(&db, &dir, keep_last, keep_days, now, set_back))
            .await
            .map_err(|e| JobError::Other(e.to_string()))??;
    let at = now.unix_timestamp().to_string();
    state
        .store
        .write(move |conn| settings::set(conn, LAST_BACKUP, &at))
        .await?;
    Ok(format!(
        "{} ({} bytes); {pruned} old backup(s) removed",
        file.path.display(),
        file.size
    ))
}

/// Concurrency windows are kept in full for this long, then summarised per day.
pub const WINDOW_HORIZON_DAYS: i64 = 35;

/// Rows the housekeeping handles per transaction: protocol requests queued on the writer
/// meanwhile wait for one batch, not for the whole job.
const HOUSEKEEPING_BATCH: i64 = 2_000;

/// Setting: devices last used before this time (Unix seconds) have been removed.
const PURGE_HORIZON: &str = "housekeeping.purge_horizon";
/// Where a housekeeping run's removal of unused devices stops (`cutoff`: devices last used
/// before it go) and the horizon it keeps, given where the clock puts it (`due`), where the
/// last run left it and the job's interval: at most two intervals past the last (the daily
/// run's two days; a weekly run keeps up), and never back.
fn purge_cutoff(due: i64, last: Option<i64>, every: i64) -> (i64, i64) {
    let step = every.saturating_mul(2);
    let cutoff = last.map_or(due, |last| due.min(last.saturating_add(step)));
    (cutoff, last.map_or(cutoff, |last| last.max(cutoff)))
}

/// Frees the seats whose time is up (per_device unused for 365 days, per_active_device 90
/// days after the first authorization), a batch per transaction: a fleet authorized in one
/// week lapses in one day. Returns how many.
async fn free_lapsed_seats(state: &AppState, now: i64) -> Result<usize, JobError> {
    let items = state.store.read(store::licenses::all_items).await?;
    let mut freed = 0;
    for item in items {
        freed += in_batches(state, move |conn| {
            crate::licensing::authorize::free_lapsed(conn, &item, now, HOUSEKEEPING_BATCH)
        })
        .await?;
    }
    Ok(freed)
}

/// The daily housekeeping: frees lapsed seats (each in the audit log), summarises old
/// concurrency windows, removes expired token passes and devices unused for 365 days
/// (each in the audit log).
pub async fn housekeeping(state: &AppState) -> Result<String, JobError> {
    let now = state.clock.now().unix_timestamp();
    let freed = free_lapsed_seats(state, now).await?;
    let windows = state
        .store
        .write(move |conn| {
            let windows = ops::summarise_windows(
                conn,
                models::window_of(now - WINDOW_HORIZON_DAYS * DAY),
                WINDOW_SECS,
            )?;
            store::admins::delete_stale(
                conn,
                now - crate::portal::auth::IDLE_SECS,
                now - crate::portal::auth::ABSOLUTE_SECS,
                now,
            )?;
            Ok::<_, StoreError>(windows)
        })
        .await?;

    let passes = in_batches(state, move |conn| {
        ops::delete_expired_passes(conn, now, HOUSEKEEPING_BATCH)
    })
    .await?;

    // Devices unused for 365 days (the per_device rule) are removed; nothing scans all
    // devices at once: a batch of ids per transaction. The horizon moves at most twice the
    // job's interval a run: a clock set years ahead (a wrong time source) would otherwise
    // remove every device at once, with its usage totals and stream marks. It never moves
    // back (a clock set back removes nothing new meanwhile).
    let due = now - models::INACTIVE_SEAT_DAYS * DAY;
    let (kept, last_run) = state
        .store
        .read(move |conn| {
            let kept = settings::get(conn, PURGE_HORIZON)?;
            Ok::<_, StoreError>((
                kept,
                ops::last_job_run(conn, Job::Housekeeping.name(), now)?,
            ))
        })
        .await?;
    // A database from before the horizon was kept: the one its last housekeeping reached.
    let last = kept
        .and_then(|h| h.parse::<i64>().ok())
        .or_else(|| last_run.map(|t| t - models::INACTIVE_SEAT_DAYS * DAY));
    let every = i64::try_from(state.config.jobs.housekeeping_every_s).unwrap_or(i64::MAX);
    let (cutoff, horizon) = purge_cutoff(due, last, every);
    if cutoff < due {
        tracing::warn!(
            removes_unused_before = %crate::portal::utc(cutoff),
            by_the_clock = %crate::portal::utc(due),
            "the clock moved further than expected since the last housekeeping: devices \
             unused for a year are removed a step of at most twice the job's interval a \
             run (is the clock right?)"
        );
    }
    let (mut purged, mut after) = (0, 0);
    loop {
        let (removed, last) = state
            .store
            .write(move |conn| {
                let batch =
                    store::devices::unused_devices(conn, after, HOUSEKEEPING_BATCH, cutoff, now)?;
                for (id, uuid) in &batch.devices {
                    store::devices::purge_device(conn, *id)?;
                    ops::audit(
                        conn,
                        now,
                        "system",
                        "device removed",
                        uuid,
                        "unused for 365 days",
                        "",
                    )?;
                }
                Ok::<_, StoreError>((batch.devices.len(), batch.last_id))
            })
            .await?;
        purged += removed;
        match last {
            Some(last) => after = last,
            None => break,
        }
    }
    state
        .store
        .write(move |conn| settings::set(conn, PURGE_HORIZON, &horizon.to_string()))
        .await?;
    // The audit log keeps `jobs.audit_keep_days`, counted from the time the devices' removal
    // reached: a clock set years ahead does not empty it either.
    let keep_days = state.config.jobs.audit_keep_days;
    let before = cutoff.saturating_add((models::INACTIVE_SEAT_DAYS - keep_days) * DAY);
    let audited = in_batches(state, move |conn| {
        ops::delete_old_audit(conn, before, HOUSEKEEPING_BATCH)
    })
    .await?;
    Ok(format!(
        "freed {freed} seat(s), summarised {windows} concurrency window(s), removed {passes} expired pass(es), {purged} device(s) unused for 365 days and {audited} audit entries older than {keep_days} days"
    ))
}

/// Runs `batch` a transaction at a time until it handles fewer than [`HOUSEKEEPING_BATCH`]
/// rows. Returns how many it handled in all.
async fn in_batches<F>(state: &AppState, batch: F) -> Result<usize, JobError>
where
    F: Fn(&rusqlite::Connection) -> Result<usize, StoreError> + Clone + Send + 'static,
{
    let mut done = 0;
    loop {
        let handled = state.store.write(batch.clone()).await?;
        done += handled;
        if (handled as i64) < HOUSEKEEPING_BATCH {
            return Ok(done);
        }
    }
}

#[derive(Template)]
#[template(path = "email/error.txt")]
struct ErrorText<'a> {
    appliance: &'a str,
    installation_id: &'a str,
    portal: &'a str,
    notices: &'a [Notice],
}

#[derive(Template)]
#[template(path = "email/error.html")]
struct ErrorHtml<'a> {
    appliance: &'a str,
    installation_id: &'a str,
    portal: &'a str,
    notices: &'a [Notice],
}

/// Settings key: when each kind of error was last emailed (JSON object of Unix times).
const ERROR_NOTICES_SENT: &str = "error_notices_sent";

/// How often waiting error notices are sent (well inside the promised 30 seconds).
pub const NOTICE_TICK: Duration = Duration::from_secs(5);
/// The wait after a first failed delivery of error notices, doubled after each further one
/// up to the most.
const NOTICE_RETRY_FIRST: Duration = Duration::from_secs(30);
const NOTICE_RETRY_MOST: Duration = Duration::from_secs(600);

/// How long to wait before the next delivery after failed ones: [`NOTICE_RETRY_FIRST`],
/// twice as long after each further failure, at most [`NOTICE_RETRY_MOST`]; a delivery that
/// goes through starts again from the first.
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(NOTICE_RETRY_FIRST)
    }

    /// A delivery failed: the wait before the next attempt.
    fn failed(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(NOTICE_RETRY_MOST);
        wait
    }

    fn succeeded(&mut self) {
        self.0 = NOTICE_RETRY_FIRST;
    }
}

/// Emails server errors to the alert recipients as they come, rate limited per kind.
pub async fn notify_errors(state: web::Data<AppState>, mut errors: UnboundedReceiver<ErrorEvent>) {
    // The rate limit outlives the process: a service restarted again and again does not
    // email each time.
    let stored = state
        .store
        .read(|conn| settings::get(conn, ERROR_NOTICES_SENT))
        .await
        .map_err(|e| e.to_string())
        .and_then(|json| {
            json.map_or(Ok(Default::default()), |j| {
                serde_json::from_str(&j).map_err(|e| e.to_string())
            })
        });
    let sent = stored.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read when error notices were sent; starting afresh");
        Default::default()
    });
    let mut notices = ErrorNotices::resume(sent, state.clock.now().unix_timestamp());
    let mut tick = tokio::time::interval(NOTICE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // After a failed delivery the next attempt waits, twice as long each time: a wrong
    // password is not tried every 5 seconds (a directory would lock the account).
    let (mut backoff, mut retry_at) = (Backoff::new(), tokio::time::Instant::now());
    loop {
        tokio::select! {
            event = errors.recv() => match event {
                Some(event) => notices.record(event),
                None => return,
            },
            _ = tick.tick() => {
                if tokio::time::Instant::now() < retry_at {
                    continue;
                }
                let due = notices.due(state.clock.now().unix_timestamp());
                if due.is_empty() {
                    continue;
                }
                let sent = while_recording(send_notices(&state, &due), &mut errors, &mut notices);
                if let Err(e) = sent.await {
                    let retry_in = backoff.failed();
                    // WARN, not ERROR: a failing notice must not notify about itself.
                    tracing::warn!(
                        error = %e,
                        retry_in_s = retry_in.as_secs(),
                        "could not email the error notice; will retry"
                    );
                    for notice in due {
                        notices.put_back(notice);
                    }
                    retry_at = tokio::time::Instant::now() + retry_in;
                    continue;
                }
                backoff.succeeded();
                let sent = serde_json::to_string(&notices.recent(state.clock.now().unix_timestamp()))
                    .expect("a map of strings to numbers serializes");
                let recorded = state
                    .store
                    .write(move |conn| settings::set(conn, ERROR_NOTICES_SENT, &sent));
                if let Err(e) = while_recording(recorded, &mut errors, &mut notices).await {
                    tracing::warn!(error = %e, "could not record when error notices were sent");
                }
            }
        }
    }
}

/// Awaits `work` while still taking the error events as they come: an outage logs an error
/// per request (thousands a second), and a channel left unread for the 30 s of an SMTP
/// attempt held every one of them in memory. Taken, they are a count per kind.
async fn while_recording<T>(
    work: impl std::future::Future<Output = T>,
    errors: &mut UnboundedReceiver<ErrorEvent>,
    notices: &mut ErrorNotices,
) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            Some(event) = errors.recv() => notices.record(event),
        }
    }
}

/// The email of server error notices.
fn error_email(
    installation_id: &str,
    portal: &str,
    notices: &[Notice],
) -> Result<mail::Email, JobError> {
    let host = crate::appliance::hostname();
    let render = |e: askama::Error| JobError::Other(format!("email template: {e}"));
    Ok(mail::Email {
        subject: format!("keygate: server error on {host}"),
        text: ErrorText {
            appliance: &host,
            installation_id,
            portal,
            notices,
        }
        .render()
        .map_err(render)?,
        html: ErrorHtml {
            appliance: &host,
            installation_id,
            portal,
            notices,
        }
        .render()
        .map_err(render)?,
    })
}

/// Tells the alert recipients at once that `keygate serve` ends with an error. At start (a
/// port taken, a database that cannot be migrated, a certificate that does not load) no
/// notifier runs yet, and the service manager starts keygate again every 5 seconds: without
/// this nobody would know until devices ran out of their offline allowance. Limited like
/// every error notice (kind `serve`: one email per 10 minutes, across restarts). Best
/// effort, from the database as it is (not migrated); `Ok(false)`: nothing was sent.
pub fn tell_failed_serve(
    config: &crate::config::Config,
    reason: &str,
    now: i64,
) -> Result<bool, JobError> {
    let db = config.database_path();
    if !db.exists() {
        return Ok(false); // a new appliance: nobody to tell yet
    }
    let conn = rusqlite::Connection::open_with_flags(
        &db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(StoreError::from)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(StoreError::from)?;
    let Some((smtp, to)) = mail_destination(&conn)? else {
        return Ok(false);
    };
    let get = |key: &str| settings::get(&conn, key);
    let sent = get(ERROR_NOTICES_SENT)?
        .and_then(|json| serde_json::from_str(&json).ok())
        .unwrap_or_default();
    let mut notices = ErrorNotices::resume(sent, now);
    notices.record(ErrorEvent {
        kind: "serve".into(),
        message: reason.to_string(),
    });
    let due = notices.due(now);
    if due.is_empty() {
        return Ok(false);
    }
    let installation = get(backup::INSTALLATION)?.unwrap_or_else(|| "not known yet".into());
    let email = error_email(&installation, &portal_url_of(config, None), &due)?;
    // Marked before the attempt: a restart every 5 s must not sign in to the mail server
    // every 5 s when it refuses (a directory locks the account after a few failures).
    let recent = serde_json::to_string(&notices.recent(now))
        .expect("a map of strings to numbers serializes");
    settings::set(&conn, ERROR_NOTICES_SENT, &recent)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| JobError::Other(e.to_string()))?
        .block_on(mail::send(&smtp, &to, &email))?;
    Ok(true)
}

/// The SMTP server and the alert recipients, if both are set.
fn mail_destination(
    conn: &rusqlite::Connection,
) -> Result<Option<(mail::SmtpSettings, Vec<lettre::message::Mailbox>)>, JobError> {
    let to = mail::parse_recipients(&settings::get(conn, mail::RECIPIENTS)?.unwrap_or_default())?;
    Ok(mail::load_settings(conn)?
        .filter(|_| !to.is_empty())
        .map(|smtp| (smtp, to)))
}

async fn send_notices(state: &AppState, notices: &[Notice]) -> Result<(), JobError> {
    let Some((smtp, to)) = state.store.read(mail_destination).await? else {
        return Ok(()); // nobody to tell
    };
    let email = error_email(
        state.appliance.installation_id(),
        &portal_url(state),
        notices,
    )?;
    // Once: the notifier backs off between attempts itself.
    send_own(state, &smtp, &to, &email, false).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The removal of unused devices keeps up with the clock whatever the job's interval
    /// (a weekly run moves it a week), and one run moves it two intervals at most (a clock
    /// set years ahead: two days for the daily run, two hours for an hourly one), never
    /// back.
    #[test]
    fn the_purge_keeps_up_with_its_interval_and_no_further() {
        let last = 1_000 * DAY;
        let week = 7 * DAY;
        assert_eq!(
            purge_cutoff(last + week, Some(last), week),
            (last + week, last + week)
        );
        assert_eq!(
            purge_cutoff(last + DAY, Some(last), DAY),
            (last + DAY, last + DAY)
        );
        assert_eq!(
            purge_cutoff(last + 60, Some(last), 3_600),
            (last + 60, last + 60)
        );
        // Ahead by years: two days, or two intervals when they are longer.
        let ahead = last + 730 * DAY;
        assert_eq!(purge_cutoff(ahead, Some(last), DAY).0, last + 2 * DAY);
        assert_eq!(purge_cutoff(ahead, Some(last), 3_600).0, last + 7_200);
        assert_eq!(purge_cutoff(ahead, Some(last), 1).0, last + 2);
        assert_eq!(purge_cutoff(ahead, Some(last), week).0, last + 2 * week);
        // Set back: nothing new removed, the horizon kept.
        assert_eq!(purge_cutoff(0, Some(last), DAY), (0, last));
        // No horizon yet: the clock's.
        assert_eq!(purge_cutoff(ahead, None, DAY), (ahead, ahead));
    }

    /// The error events logged while a notice is being sent (an SMTP server slow to answer,
    /// during an outage that logs an error per request) are taken as they come, not held in
    /// the channel until the attempt ends.
    #[tokio::test]
    async fn errors_logged_while_a_notice_is_sent_are_taken_as_they_come() {
        let (events, mut errors) = tokio::sync::mpsc::unbounded_channel();
        let mut notices = ErrorNotices::default();
        let sending = async {
            for _ in 0..10_000 {
                let event = ErrorEvent {
                    kind: "db".into(),
                    message: "disk full".into(),
                };
                events.send(event).unwrap();
                tokio::task::yield_now().await;
            }
        };
        while_recording(sending, &mut errors, &mut notices).await;
        let waiting = errors.len();
        assert!(waiting < 10, "{waiting} events waited in the channel");
        let due = notices.due(0);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, 10_000 - waiting as u64);
    }

    #[test]
    fn failed_error_notices_wait_30_s_then_twice_as_long_up_to_10_minutes() {
        let mut backoff = Backoff::new();
        let waits: Vec<u64> = (0..7).map(|_| backoff.failed().as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 240, 480, 600, 600]);
        backoff.succeeded();
        assert_eq!(
            backoff.failed().as_secs(),
            30,
            "a delivery starts again from 30 s"
        );
    }

    /// A job later than its due time by more than the scheduler's own lateness is the one
    /// told (the most overdue first); one due now, or late by less, is not.
    #[test]
    fn a_job_is_overdue_past_the_schedulers_own_lateness() {
        let now = Instant::now() + Duration::from_secs(3_600);
        let due = |ago: u64| now - Duration::from_secs(ago);
        let mut next = HashMap::from([(Job::Alerts, due(10)), (Job::Backup, now)]);
        assert_eq!(overdue(&next, now), None);
        next.insert(Job::Housekeeping, now + Duration::from_secs(60));
        next.insert(Job::Alerts, due(11));
        assert_eq!(
            overdue(&next, now),
            Some((Job::Alerts, Duration::from_secs(11)))
        );
        next.insert(Job::Backup, due(600));
        assert_eq!(
            overdue(&next, now),
            Some((Job::Backup, Duration::from_secs(600)))
        );
    }

    /// Each job is due its interval after its last run (or the first start), at once when
    /// that has passed, and a whole interval away when its last run looks later than now (a
    /// clock set back since).
    #[test]
    fn a_job_is_due_an_interval_after_its_last_run() {
        let dir = tempfile::tempdir().unwrap();
        let conn = store::open(&dir.path().join("k.db")).unwrap();
        let config = crate::config::JobsConfig::default(); // 600, 720, 86_400 seconds
        let now = 1_000_000;
        remember_first_start(&conn, now - 100).unwrap();
        ops::record_job_run(&conn, "alerts", now - 601, 0, true, "").unwrap();
        ops::record_job_run(&conn, "backup", now + 50, 0, true, "").unwrap();
        let due: HashMap<_, _> = next_due(&conn, &config, now).unwrap().into_iter().collect();
        assert_eq!(due[&Job::Alerts], Duration::ZERO, "overdue: at once");
        assert_eq!(
            due[&Job::Backup],
            Duration::from_secs(720),
            "a run 'in the future'"
        );
        assert_eq!(
            due[&Job::Housekeeping],
            Duration::from_secs(86_400 - 100),
            "never ran: from the first start"
        );
    }

    #[test]
    fn a_run_stamped_by_a_clock_that_ran_ahead_does_not_put_the_job_off_after_it_is_corrected() {
        let dir = tempfile::tempdir().unwrap();
        let conn = store::open(&dir.path().join("k.db")).unwrap();
        let config = crate::config::JobsConfig::default();
        let now = 10_000_000;
        remember_first_start(&conn, now - 90 * 86_400).unwrap();
        // A month ahead, then the clock corrected and two runs at the real time since.
        ops::record_job_run(&conn, "housekeeping", now + 30 * 86_400, 0, true, "").unwrap();
        ops::record_job_run(&conn, "housekeeping", now - 2 * 86_400, 0, true, "").unwrap();
        ops::record_job_run(&conn, "housekeeping", now - 86_400 - 60, 0, true, "").unwrap();
        let due: HashMap<_, _> = next_due(&conn, &config, now).unwrap().into_iter().collect();
        assert_eq!(
            due[&Job::Housekeeping],
            Duration::ZERO,
            "a day since the last run at the real time: due at once"
        );
    }

    #[test]
    fn a_job_never_runs_twice_at_once() {
        let running = RunningJobs::default();
        let backup = running.start(Job::Backup).expect("nothing runs yet");
        assert!(
            running.start(Job::Backup).is_none(),
            "a second backup waits its turn"
        );
        assert!(
            running.start(Job::Alerts).is_some(),
            "another job runs alongside"
        );
        drop(backup);
        assert!(
            running.start(Job::Backup).is_some(),
            "the mark goes with the run"
        );
    }

    #[tokio::test]
    async fn a_panicking_job_is_a_failure_not_a_lost_run() {
        let result = contained(async { panic!("a bug") }).await;
        assert!(
            matches!(&result, Err(JobError::Other(m)) if m.contains("panicked")),
            "{result:?}"
        );
        assert_eq!(
            contained(async { Ok("done".to_string()) }).await.unwrap(),
            "done"
        );
    }
}
