//! The running appliance: shared state, the HTTPS server and its routes, shutdown.

use std::future::Future;
use std::sync::Arc;

use actix_service::ServiceFactoryExt;
use actix_web::rt::net::TcpStream;
use actix_web::{HttpResponse, web};
use time::OffsetDateTime;

use crate::appliance::{Appliance, ApplianceError};
use crate::clock::Clock;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::alerts::notices::ErrorEvent;
use crate::config::Config;
use crate::connections::{ConnectionSlots, Counted};
use crate::head_deadline::HeadDeadline;
use crate::jobs;
use crate::licensing::handshake::PasswordCache;
use crate::protocol;
use crate::ratelimit::{AttemptLimiter, SignInLimits};
use crate::store::backup;
use crate::store::{Store, StoreError};
use crate::tls::{self, CertResolver, CertSource, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Appliance(#[from] ApplianceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Lock(#[from] backup::BackupError),
    #[error("metrics.token_file {path}: {message}")]
    MetricsToken { path: String, message: String },
}

/// Reports and counters the usage requests in the writer's queue may hold at once: about
/// 100 MiB parsed; a request of the largest backlog (5,000 reports of 64 counters) weighs
/// about a third of it, a heartbeat 1.
pub const USAGE_BUDGET: u32 = 1_000_000;

/// Everything a request handler may need, shared by all workers.
pub struct AppState {
    pub config: Config,
    pub appliance: Appliance,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub certificate: Arc<CertResolver>,
    pub cert_source: CertSource,
    pub started_at: OffsetDateTime,
    /// The newest time this appliance has used: nothing is signed while the clock is set
    /// back behind it.
    pub watermark: crate::clock::Watermark,
    /// Session passwords already verified (Argon2 runs once per code and password).
    pub passwords: PasswordCache,
    /// Bound concurrent Argon2 runs (each takes tens of milliseconds of CPU and 19 MiB):
    /// two for devices' session passwords, one for the portal's admins, so that a flood of
    /// either never delays the other.
    device_argon2: Arc<tokio::sync::Semaphore>,
    portal_argon2: Arc<tokio::sync::Semaphore>,
    /// What the usage requests on their way through the writer may hold, in reports and
    /// counters ([`USAGE_BUDGET`]): past it, `RATE_LIMITED` (send again later), not a queue
    /// that grows until memory runs out (a site's devices back from an outage, each with a
    /// large backlog).
    pub usage_budget: Arc<tokio::sync::Semaphore>,
    /// Session password checks per client address (IPv6: per /64): 10 a minute, then
    /// `RATE_LIMITED`.
    pub password_attempts: AttemptLimiter,
    /// Session password checks per handshake code, whatever the address: 100 a minute, so
    /// guesses spread over many addresses stay slow.
    pub code_password_attempts: AttemptLimiter,
    /// Portal sign-in attempts: 5 a minute per account and address, 20 per address, 100 per
    /// account over all addresses.
    pub sign_in_limits: SignInLimits,
    pub metrics: crate::metrics::Metrics,
    /// The connections each client host holds (`max_connections_per_address`).
    pub connections: Arc<ConnectionSlots>,
    /// The port serving HTTPS, once bound (`listen` may name port 0: any free one).
    pub port: std::sync::OnceLock<u16>,
    /// The bearer token `/metrics` asks for (`metrics.token_file`); without one it answers
    /// loopback clients only.
    metrics_token: Option<String>,
    /// ERROR events to email (taken by the notifier when serving starts).
    error_events: std::sync::Mutex<Option<UnboundedReceiver<ErrorEvent>>>,
    /// The jobs running now: a job is never run twice at once (a scheduled run and the
    /// portal's "take a backup now", or a run caught up after a clock step).
    pub running_jobs: crate::jobs::RunningJobs,
    /// The SMTP settings the server last refused for good (alerts and error notices wait
    /// before signing in with them again).
    pub smtp_refusal: crate::jobs::SmtpRefusal,
    /// Held while this appliance runs: `keygate restore` refuses to run under it.
    _lock: std::fs::File,
}

impl AppState {
    /// Prepares the appliance from its configuration: data directory, appliance key,
    /// database (migrated), certificate. Creates what is missing on first start.
    pub fn open(config: Config, clock: Arc<dyn Clock>) -> Result<AppState, StartError> {
        let metrics_token = config
            .metrics
            .token_file
            .as_deref()
            .map(read_metrics_token)
            .transpose()?;
        // A configured vendor key that cannot be used fails every import until it is fixed,
        // but the devices need none to work: told (logged as an error, so emailed), not a
        // reason to stop serving them.
        for path in &config.trusted_vendor_keys {
            if let Err(e) = crate::licensing::import::config_key(path) {
                tracing::error!(kind = "config", error = %e, "imports will fail: fix trusted_vendor_keys");
            }
        }
        let appliance = backup::appliance_for(&config.data_dir, &config.database_path())?;
        let lock = backup::lock_file(&config.data_dir, backup::LOCK_WAIT)?;
        backup::remove_unfinished_at_start(&config.data_dir);
        let conn = crate::store::open(&config.database_path())?;
        let store = Store::open(&config.database_path())?;
        let now = clock.now();
        crate::jobs::remember_first_start(&conn, now.unix_timestamp())?;
        if crate::store::settings::get(&conn, backup::INSTALLATION)?.as_deref()
            != Some(appliance.installation_id())
        {
            crate::store::settings::set(&conn, backup::INSTALLATION, appliance.installation_id())?;
        }
        // A run that did not stop cleanly (killed, crashed, the machine lost power, or it
        // stopped itself at a disk fault and wrote why) is told at ERROR, so emailed to the
        // alert recipients.
        let stopped_itself = crate::store::take_stop_reason(&config.database_path());
        let running = crate::store::settings::get(&conn, backup::RUNNING)?;
        if let Some(reason) = &stopped_itself {
            tracing::error!(
                kind = "unclean_stop",
                running_since = running.as_deref().unwrap_or("?"),
                reason = %reason,
                "the previous run of keygate did not stop cleanly: it stopped itself; what it \
                 acknowledged is on disk"
            );
        } else if let Some(since) = running {
            tracing::error!(
                kind = "unclean_stop",
                running_since = %since,
                "the previous run of keygate did not stop cleanly (killed, crashed, or the \
                 machine lost power); what it acknowledged is on disk, and its log may say why \
                 it stopped"
            );
        }
        let watermark =
            crate::clock::Watermark::new(crate::store::ops::newest_time(&conn)?, clock.clone());
        drop(conn);
        // A clock set back while the appliance was off is told at once (and emailed).
        let _ = watermark.check(now.unix_timestamp());
        let cert_source = tls::ensure_certificate(&config, now)?;
        let served = tls::load(&cert_source)?;
        // Served all the same (the portal is how it gets replaced), and told.
        match tls::check_serving(&served, now) {
            Err(e) => tracing::error!(
                kind = "certificate",
                certificate = %cert_source.cert.display(),
                "the TLS certificate cannot serve devices: {e}; replace it"
            ),
            Ok(tls::Coverage {
                expires_soon: Some(at),
                ..
            }) => tracing::warn!(
                certificate = %cert_source.cert.display(),
                "the TLS certificate expires on {}: replace it before then",
                crate::licensing::rfc3339(at)
            ),
            Ok(_) => {}
        }
        let certificate = Arc::new(CertResolver::new(served));
        let connections = ConnectionSlots::new(config.max_connections_per_address);
        Ok(AppState {
            config,
            appliance,
            store,
            clock,
            certificate,
            cert_source,
            started_at: now,
            watermark,
            passwords: PasswordCache::default(),
            device_argon2: Arc::new(tokio::sync::Semaphore::new(2)),
            portal_argon2: Arc::new(tokio::sync::Semaphore::new(1)),
            usage_budget: Arc::new(tokio::sync::Semaphore::new(USAGE_BUDGET as usize)),
            password_attempts: AttemptLimiter::new(10, 60),
            code_password_attempts: AttemptLimiter::new(100, 60),
            sign_in_limits: SignInLimits::default(),
            metrics: Default::default(),
            connections,
            port: Default::default(),
            metrics_token,
            error_events: std::sync::Mutex::new(None),
            running_jobs: Default::default(),
            smtp_refusal: Default::default(),
            _lock: lock,
        })
    }
}

/// Whose password an Argon2 run checks or hashes.
#[derive(Debug, Clone, Copy)]
pub enum Passwords {
    /// Devices' session passwords (the client protocol).
    Devices,
    /// The portal's: admins' passwords, and session passwords set in the portal.
    Portal,
}

impl AppState {
    /// Seconds since this process started serving, by the clock at `now` (0, not less, after
    /// the clock was set back).
    pub fn uptime_s(&self, now: i64) -> i64 {
        (now - self.started_at.unix_timestamp()).max(0)
    }

    /// Runs Argon2 (hashing or verifying a password) on the blocking pool, never on the
    /// database writer, in the slots of `whose` passwords: a flood of sign-ins or of session
    /// passwords queues instead of exhausting memory, and does not hold up the other kind.
    /// `None` if the blocking pool failed.
    pub async fn argon2<T: Send + 'static>(
        &self,
        whose: Passwords,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let slots = match whose {
            Passwords::Devices => &self.device_argon2,
            Passwords::Portal => &self.portal_argon2,
        };
        // The slot goes with the work: a request dropped meanwhile (its client gone) does not
        // stop a run already on the blocking pool, so its slot is not free until it ends.
        let permit = slots.clone().acquire_owned().await.ok()?;
        web::block(move || {
            let _permit = permit;
            work()
        })
        .await
        .ok()
    }

    /// Emails these ERROR events to the alert recipients while serving.
    pub fn with_error_events(self, events: UnboundedReceiver<ErrorEvent>) -> Self {
        *self.error_events.lock().expect("error events lock") = Some(events);
        self
    }
}

/// Serves HTTPS on an already-bound listener until `shutdown` completes, then stops
/// gracefully (in-flight requests finish).
pub async fn serve(
    state: web::Data<AppState>,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + 'static,
) -> std::io::Result<()> {
    let _ = state.port.set(listener.local_addr()?.port());
    let tls = tls::server_config(state.certificate.clone());
    let state_at_stop = state.clone();
    let errors = state.error_events.lock().expect("error events lock").take();
    let _scheduler = jobs::start(state.clone(), errors)
        .await
        .map_err(|e| std::io::Error::other(format!("cannot start the scheduler: {e}")))?;
    // The access log costs every request its formatting even when filtered out: it is only
    // installed when its target is enabled (`keygate::http=info`). It logs the path without
    // the query, which may carry a secret (the setup link's token).
    let access_log = tracing::enabled!(target: "keygate::http", tracing::Level::INFO);
    let counting = state.clone();
    let app = move || {
        actix_web::App::new()
            .app_data(state.clone())
            .wrap(actix_web::middleware::Condition::new(
                access_log,
                actix_web::middleware::Logger::new("%a \"%U\" %s %b %Dms")
                    .log_target("keygate::http"),
            ))
            .wrap(actix_web::middleware::from_fn(crate::body_rate::limit))
            .configure(protocol::routes)
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics))
            // The portal's guard and security headers cover the portal, not device traffic.
            .service(
                web::scope("")
                    .wrap(actix_web::middleware::from_fn(crate::portal::guard))
                    .wrap(crate::portal::security_headers())
                    .configure(crate::portal::routes),
            )
    };
    // What actix-web's `HttpServer::listen_rustls_0_23` builds, with each connection's
    // plaintext wrapped in a `HeadDeadline` (actix times only a connection's first head).
    // Handshakes in flight per worker: actix-tls's 256 let two hosts (two addresses at their
    // 256 each) take a 2-core appliance's all, and with them the accept loop. A handshake
    // waiting for its client costs a socket and a few KiB; the CPU it costs, once its client
    // sends, is bounded by the clients.
    actix_tls::accept::max_concurrent_tls_connect(TLS_HANDSHAKES_PER_WORKER);
    let builder = actix_server::Server::build().disable_signals();
    let stopping = builder.graceful_shutdown_signal();
    let server = builder.listen("keygate", listener, move || {
        let stopping = stopping.clone();
        let counting = counting.clone();
        let http = actix_http::HttpService::build()
            // As actix-web's server: an answer sent before the body was read (a 413, a 408)
            // lingers a second for the client to read it, rather than being reset away.
            .client_disconnect_timeout(std::time::Duration::from_secs(1))
            // Each request marks its connection's head deadline as it reaches the application
            // (`body_rate::limit`): only a request started stops the next head's clock.
            .on_connect_ext(
                |io: &HeadDeadline<TlsStream>, data: &mut actix_http::Extensions| {
                    data.insert(io.request_started());
                },
            )
            // Kept-alive connections close at once when the appliance stops.
            .graceful_shutdown_signal(move || {
                let stopping = stopping.clone();
                async move { stopping.notified().await }
            })
            // Nothing reads the application's host, scheme or address from its config (the
            // portal's cookies are `Secure` themselves), so the default serves.
            .finish(actix_service::map_config(
                actix_service::IntoServiceFactory::into_factory(app())
                    .map_err(|e| e.error_response()),
                |_| actix_web::dev::AppConfig::default(),
            ));
        let mut tls = actix_tls::accept::rustls_0_23::Acceptor::new(tls.clone());
        // actix's 3 s closes the connection of a client whose handshake meets a busy
        // appliance (or a slow link); a handshake that has not finished in 10 s is gone.
        tls.set_handshake_timeout(TLS_HANDSHAKE_TIMEOUT);
        // An address holding all its connections has the next closed before its handshake.
        actix_service::fn_service(move |io| std::future::ready(admit(&counting, io)))
            .and_then(
                tls.map_init_err(|_| ())
                    .map_err(|e| tracing::debug!(error = ?e, "TLS handshake failed")),
            )
            .and_then(|mut io: TlsStream| async move {
                io.get_mut().0.handshake_done();
                let peer = io.get_ref().0.peer_addr().ok();
                Ok((HeadDeadline::new(io), actix_http::Protocol::Http1, peer))
            })
            .and_then(http.map_err(|e| tracing::debug!(error = ?e, "connection ended")))
    })?;
    // Serving from here: a run that ends otherwise than by a stop leaves this mark (a
    // start that failed before serving leaves none). Recorded before the first request is
    // answered.
    let since = crate::licensing::rfc3339(state_at_stop.clock.now());
    running(&state_at_stop, Some(since)).await;
    let server = server.run();
    let handle = server.handle();
    let state_at_signal = state_at_stop.clone();
    actix_web::rt::spawn(async move {
        shutdown.await;
        // A stop asked for is a clean one, even if the machine does not wait for the open
        // connections to end (a Windows shutdown gives services a few seconds).
        running(&state_at_signal, None).await;
        handle.stop(true).await;
    });
    let served = server.await;
    if let Err(e) = jobs::save_newest_time(&state_at_stop).await {
        tracing::warn!(error = %e, "could not save the newest time used");
    }
    running(&state_at_stop, None).await;
    served
}

/// Records that the appliance serves (since when), or that it stopped cleanly.
async fn running(state: &AppState, since: Option<String>) {
    let recorded = state
        .store
        .write(move |conn| match &since {
            Some(since) => crate::store::settings::set(conn, backup::RUNNING, since),
            None => crate::store::settings::delete(conn, backup::RUNNING),
        })
        .await;
    if let Err(e) = recorded {
        tracing::warn!(error = %e, "could not record whether the appliance runs");
    }
}

/// A connection just accepted, with its address's slot; `Err` (closed at once, before its
/// TLS handshake) when the address holds `max_connections_per_address` connections or
/// `HANDSHAKES_PER_ADDRESS` handshakes already.
fn admit(state: &AppState, io: TcpStream) -> Result<Counted, ()> {
    // No address: it closed before it was accepted.
    let ip = io.peer_addr().map_err(|_| ())?.ip();
    if let Some(slot) = state.connections.take(ip) {
        return Ok(Counted::new(io, slot));
    }
    if state
        .metrics
        .connection_refused(state.clock.now().unix_timestamp())
    {
        tracing::warn!(
            client = %ip.to_canonical(),
            limit = state.config.max_connections_per_address,
            handshakes = crate::connections::HANDSHAKES_PER_ADDRESS,
            "connections refused: the client holds max_connections_per_address connections, \
             or that many TLS handshakes (a client leaking connections, a flood, or a NAT \
             gateway needing a higher limit)"
        );
    }
    Err(())
}

type TlsStream = actix_tls::accept::rustls_0_23::TlsStream<Counted>;

/// How long a client may take to finish its TLS handshake before its connection is closed.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// TLS handshakes one worker runs at once: an address's
/// [`crate::connections::HANDSHAKES_PER_ADDRESS`] is a sixty-fourth of it, an IPv6 /64's
/// [`crate::connections::HANDSHAKES_PER_NETWORK`] half. At 2,048, sixteen addresses
/// holding their 256 each took all of a 2-core appliance's, and with them the accept loop.
/// A handshake waiting for its client holds a socket and a few KiB.
const TLS_HANDSHAKES_PER_WORKER: usize = 16_384;

/// The process is up.
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// How long `/readyz` waits for the database writer to commit a transaction.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The process can serve: the database answers a read, and the writer commits (an empty
/// transaction, synced like every other), both within [`READY_WITHIN`]: a writer held up (the
/// database locked by another program, a disk that does not sync) leaves every
/// authorization and usage call waiting, so the appliance is not ready.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let read = state.store.read(|conn| {
        conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
            .map_err(StoreError::from)
    });
    let commit = state.store.write(|_| Ok::<_, StoreError>(()));
    let checks = async { tokio::join!(read, commit) };
    let unready = match tokio::time::timeout(READY_WITHIN, checks).await {
        Ok((Ok(_), Ok(()))) => None,
        Ok((Err(e), _) | (_, Err(e))) => Some(e.to_string()),
        Err(_) => Some(format!(
            "the database did not answer a read and a commit within {} s",
            READY_WITHIN.as_secs()
        )),
    };
    match unready {
        None => HttpResponse::Ok().json(serde_json::json!({"status": "ready"})),
        Some(e) => {
            tracing::warn!(error = %e, "not ready");
            HttpResponse::ServiceUnavailable().json(serde_json::json!({"status": "unavailable"}))
        }
    }
}

/// The token of `metrics.token_file`: its text without surrounding white space, long
/// enough not to be guessed.
fn read_metrics_token(path: &std::path::Path) -> Result<String, StartError> {
    let bad = |message: String| StartError::MetricsToken {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = text.trim();
    if token.len() < 16 || !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(bad(
            "the token must be at least 16 printable characters without spaces, e.g. the \
             output of `head -c 24 /dev/urandom | base64`"
                .into(),
        ));
    }
    Ok(token.to_string())
}

/// The refusal of a `/metrics` request that may not read. With a token configured, a request
/// reads if it presents it (compared in constant time); without one, if it comes from this
/// machine.
fn metrics_refusal(
    token: Option<&str>,
    peer: Option<std::net::IpAddr>,
    authorization: Option<&str>,
) -> Option<HttpResponse> {
    match token {
        Some(token) => {
            let presented = authorization
                .and_then(|h| h.strip_prefix("Bearer "))
                .unwrap_or_default();
            if crate::appliance::same_secret(presented, token) {
                None
            } else {
                Some(
                    HttpResponse::Unauthorized()
                        .insert_header(("WWW-Authenticate", "Bearer"))
                        .body(
                            "send the token of metrics.token_file: Authorization: Bearer TOKEN\n",
                        ),
                )
            }
        }
        // `::ffff:127.0.0.1` too: a local client of a listener on `[::]`.
        None if peer.is_some_and(|ip| ip.to_canonical().is_loopback()) => None,
        None => Some(HttpResponse::Forbidden().body(
            "/metrics answers this machine only; set metrics.token_file to scrape it from \
             another (operations.md, Monitoring)\n",
        )),
    }
}

/// Prometheus metrics: the in-memory counters and the database's gauges.
async fn metrics(state: web::Data<AppState>, req: actix_web::HttpRequest) -> HttpResponse {
    let authorization = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    let peer = req.peer_addr().map(|a| a.ip());
    if let Some(refused) = metrics_refusal(state.metrics_token.as_deref(), peer, authorization) {
        return refused;
    }
    let gauges = state
        .store
        .read(|conn| {
            let items = crate::store::licenses::all_items(conn)?;
            let last_backup = crate::store::settings::get(conn, jobs::LAST_BACKUP)?;
            Ok::<_, StoreError>((items, last_backup.and_then(|t| t.parse::<i64>().ok())))
        })
        .await;
    match gauges {
        Ok((items, last_backup)) => {
            let now = state.clock.now().unix_timestamp();
            let items: Vec<_> = items.into_iter().filter(|i| !i.withdrawn).collect();
            HttpResponse::Ok()
                .content_type("text/plain; version=0.0.4")
                .body(state.metrics.render(
                    &items,
                    state.store.commits(),
                    last_backup.map(|t| (now - t).max(0)),
                    state.uptime_s(now),
                ))
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read metrics");
            HttpResponse::ServiceUnavailable().finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_need_the_token_or_this_machine() {
        let here = Some("127.0.0.1".parse().unwrap());
        let here6 = Some("::1".parse().unwrap());
        let mapped = Some("::ffff:127.0.0.1".parse().unwrap());
        let lan = Some("10.0.0.9".parse().unwrap());
        let status = |r: Option<HttpResponse>| r.map_or(200, |e| e.status().as_u16());
        // No token: loopback only.
        assert_eq!(status(metrics_refusal(None, here, None)), 200);
        assert_eq!(status(metrics_refusal(None, here6, None)), 200);
        assert_eq!(status(metrics_refusal(None, mapped, None)), 200);
        assert_eq!(status(metrics_refusal(None, lan, None)), 403);
        assert_eq!(status(metrics_refusal(None, None, None)), 403);
        // A token: whoever presents it, and nobody else, this machine included.
        let token = Some("0123456789abcdef-token");
        let right = Some("Bearer 0123456789abcdef-token");
        assert_eq!(status(metrics_refusal(token, lan, right)), 200);
        assert_eq!(status(metrics_refusal(token, here, None)), 401);
        assert_eq!(
            status(metrics_refusal(token, lan, Some("Bearer 0123456789abcdef"))),
            401
        );
        assert_eq!(
            status(metrics_refusal(token, lan, Some("0123456789abcdef-token"))),
            401
        );
    }

    #[test]
    fn a_short_or_missing_metrics_token_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.token");
        let err = read_metrics_token(&path).unwrap_err().to_string();
        assert!(err.contains("metrics.token_file"), "{err}");
        std::fs::write(&path, "short\n").unwrap();
        let err = read_metrics_token(&path).unwrap_err().to_string();
        assert!(err.contains("at least 16"), "{err}");
        std::fs::write(&path, "  s3cret-0123456789abcdef\n").unwrap();
        assert_eq!(
            read_metrics_token(&path).unwrap(),
            "s3cret-0123456789abcdef"
        );
    }
}
