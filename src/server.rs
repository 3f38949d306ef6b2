//! The running appliance: shared state, the HTTPS server and its routes, shutdown.

use std::future::Future;
use std::sync::Arc;

use actix_web::{HttpResponse, web};
use time::OffsetDateTime;

use crate::appliance::{Appliance, ApplianceError};
use crate::clock::Clock;
use crate::config::Config;
use crate::licensing::handshake::PasswordCache;
use crate::protocol;
use crate::ratelimit::FailureLimiter;
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
}

/// Everything a request handler may need, shared by all workers.
pub struct AppState {
    pub config: Config,
    pub appliance: Appliance,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub certificate: Arc<CertResolver>,
    pub cert_source: CertSource,
    pub started_at: OffsetDateTime,
    /// Session passwords already verified (Argon2 runs once per code and password).
    pub passwords: PasswordCache,
    /// Bounds concurrent Argon2 verifications (each takes tens of milliseconds of CPU).
    pub password_checks: tokio::sync::Semaphore,
    /// Wrong session passwords per client address: 10 a minute, then `RATE_LIMITED`.
    pub password_failures: FailureLimiter,
}

impl AppState {
    /// Prepares the appliance from its configuration: data directory, appliance key,
    /// database (migrated), certificate. Creates what is missing on first start.
    pub fn open(config: Config, clock: Arc<dyn Clock>) -> Result<AppState, StartError> {
        let appliance = Appliance::load_or_create(&config.data_dir)?;
        let store = Store::open(&config.database_path())?;
        let now = clock.now();
        let cert_source = tls::ensure_certificate(&config, now)?;
        let certificate = Arc::new(CertResolver::new(tls::load(&cert_source)?));
        Ok(AppState {
            config,
            appliance,
            store,
            clock,
            certificate,
            cert_source,
            started_at: now,
            passwords: PasswordCache::default(),
            password_checks: tokio::sync::Semaphore::new(2),
            password_failures: FailureLimiter::new(10, 60),
        })
    }
}

/// Serves HTTPS on an already-bound listener until `shutdown` completes, then stops
/// gracefully (in-flight requests finish).
pub async fn serve(
    state: AppState,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + 'static,
) -> std::io::Result<()> {
    let tls = tls::server_config(state.certificate.clone());
    let state = web::Data::new(state);
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(state.clone())
            .wrap(
                actix_web::middleware::Logger::new("%a \"%r\" %s %b %Dms")
                    .log_target("keygate::http"),
            )
            .configure(protocol::routes)
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
    })
    .disable_signals()
    .listen_rustls_0_23(listener, tls)?
    .run();
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        shutdown.await;
        handle.stop(true).await;
    });
    server.await
}

/// The process is up.
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// The process can serve: the database answers.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let ready = state
        .store
        .read(|conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map_err(StoreError::from)
        })
        .await;
    match ready {
        Ok(_) => HttpResponse::Ok().json(serde_json::json!({"status": "ready"})),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            HttpResponse::ServiceUnavailable().json(serde_json::json!({"status": "unavailable"}))
        }
    }
}
