//! The device-facing client protocol under `/api/v1`: parse each request into typed values,
//! run one domain operation on the database writer, sign, answer. Every failure is the
//! specification's JSON error and changes nothing.

use std::sync::Arc;
use std::time::Instant;

use actix_web::error::JsonPayloadError;
use actix_web::{HttpMessage, HttpRequest, HttpResponse, web};
use keygate_sdk::jws::Typ;
use keygate_sdk::wire::{
    ApplianceInfo, AuthorizeRequest, AuthorizeResponse, ErrorCode, REPORT_INTERVAL_S,
    ReleaseRequest, ReleaseResponse, UsageRequest, UsageResponse,
};

use crate::error::ApiError;
use crate::licensing::authorize::{self, AuthorizeError};
use crate::licensing::handshake::verify_password;
use crate::licensing::types::{self, Authorize, Usage};
use crate::licensing::usage;
use crate::metrics::Endpoint;
use crate::server::{AppState, Passwords};

/// Every route of the client protocol: (method, path). The OpenAPI document is checked
/// against this list.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/v1/appliance"),
    ("post", "/api/v1/authorize"),
    ("post", "/api/v1/usage"),
    ("post", "/api/v1/release"),
];

/// Body limits: an authorization request is small; a usage request carries a backlog of at
/// most `types::MAX_REPORTS` reports.
const AUTHORIZE_LIMIT: usize = 16 * 1024;
const USAGE_LIMIT: usize = 2 * 1024 * 1024;
const RELEASE_LIMIT: usize = 4 * 1024;

pub fn routes(cfg: &mut web::ServiceConfig) {
    // A method an endpoint does not take is HTTP's 405 with `Allow` (actix's answer, empty:
    // not a protocol error), `GET /appliance`'s included.
    cfg.service(
        web::scope("/api/v1")
            .service(
                web::resource("/appliance")
                    .route(web::get().to(appliance))
                    .route(web::head().to(appliance)),
            )
            .service(
                web::resource("/authorize")
                    .app_data(json_config(AUTHORIZE_LIMIT, Endpoint::Authorize))
                    .route(web::post().to(measured_authorize)),
            )
            .service(
                web::resource("/usage")
                    .app_data(json_config(USAGE_LIMIT, Endpoint::Usage))
                    .route(web::post().to(measured_usage)),
            )
            .service(
                web::resource("/release")
                    .app_data(json_config(RELEASE_LIMIT, Endpoint::Release))
                    .route(web::post().to(measured_release)),
            ),
    );
}

/// The body is read as UTF-8 JSON (RFC 8259): a request naming another charset is refused
/// rather than misread. actix has already checked the media type's subtype (`json`, or a
/// `+json` suffix) whatever its type: `text/json` is refused here.
fn utf8_json(http: &HttpRequest) -> Result<(), ApiError> {
    let Ok(Some(mime)) = http.mime_type() else {
        return Ok(());
    };
    if mime.type_() != actix_web::mime::APPLICATION {
        return Err(ApiError::bad_request(
            "send a JSON body with Content-Type: application/json",
        ));
    }
    match mime.get_param(actix_web::mime::CHARSET) {
        Some(charset)
            if !["utf-8", "utf8"]
                .iter()
                .any(|utf8| charset.as_str().eq_ignore_ascii_case(utf8)) =>
        {
            Err(ApiError::bad_request(format!(
                "the body must be UTF-8 JSON, not {charset}"
            )))
        }
        _ => Ok(()),
    }
}

/// Malformed or oversized bodies answer the specification's errors, not actix's defaults,
/// and are counted in the endpoint's outcomes (untimed: no handler ran).
fn json_config(limit: usize, endpoint: Endpoint) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .error_handler(move |err, req| {
            let refused = match &err {
                JsonPayloadError::Overflow { .. }
                | JsonPayloadError::OverflowKnownLength { .. }
                | JsonPayloadError::Payload(actix_web::error::PayloadError::Overflow) => {
                    ApiError::new(
                        ErrorCode::PayloadTooLarge,
                        format!("the request body is larger than {limit} bytes"),
                    )
                }
                JsonPayloadError::Payload(e) if crate::body_rate::too_slow(e) => {
                    return crate::body_rate::timed_out();
                }
                JsonPayloadError::Payload(e) if crate::body_rate::over_budget(e) => ApiError::new(
                    ErrorCode::RateLimited,
                    "the appliance is receiving too many request bodies at once: \
                         send it again later",
                ),
                JsonPayloadError::ContentType => {
                    ApiError::bad_request("send a JSON body with Content-Type: application/json")
                }
                JsonPayloadError::Deserialize(e) => {
                    ApiError::bad_request(format!("invalid request: {e}"))
                }
                other => ApiError::bad_request(format!("unreadable request body: {other}")),
            };
            if let Some(state) = req.app_data::<web::Data<AppState>>() {
                state.metrics.counted(endpoint, Some(refused.code));
            }
            if refused.code != ErrorCode::RateLimited {
                return refused.into();
            }
            // The rest of the body is unread: the connection ends with this answer.
            let mut response = actix_web::ResponseError::error_response(&refused);
            response
                .head_mut()
                .set_connection_type(actix_web::http::ConnectionType::Close);
            actix_web::error::InternalError::from_response(refused, response).into()
        })
}

/// Runs an endpoint's handler once its body is known to be UTF-8 JSON, then counts the
/// answer by outcome and times it.
async fn measure(
    state: &AppState,
    endpoint: Endpoint,
    http: &HttpRequest,
    handler: impl Future<Output = Result<HttpResponse, ApiError>>,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let result = match utf8_json(http) {
        Ok(()) => handler.await,
        Err(e) => Err(e),
    };
    let error = result.as_ref().err().map(|e| e.code);
    state.metrics.answered(endpoint, error, started.elapsed());
    result
}

async fn measured_authorize(
    state: web::Data<AppState>,
    http: HttpRequest,
    body: web::Json<AuthorizeRequest>,
) -> Result<HttpResponse, ApiError> {
    let handler = authorize(state.clone(), http.clone(), body);
    measure(&state, Endpoint::Authorize, &http, handler).await
}

async fn measured_usage(
    state: web::Data<AppState>,
    http: HttpRequest,
    body: web::Json<UsageRequest>,
) -> Result<HttpResponse, ApiError> {
    measure(&state, Endpoint::Usage, &http, usage(state.clone(), body)).await
}

async fn measured_release(
    state: web::Data<AppState>,
    http: HttpRequest,
    body: web::Json<ReleaseRequest>,
) -> Result<HttpResponse, ApiError> {
    measure(
        &state,
        Endpoint::Release,
        &http,
        release(state.clone(), body),
    )
    .await
}

fn bad(e: types::FieldError) -> ApiError {
    ApiError::bad_request(e.to_string())
}

/// `GET /api/v1/appliance`: who this appliance is and what time it has.
async fn appliance(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(ApplianceInfo {
        installation_id: state.appliance.installation_id().to_string(),
        public_key: state.appliance.public_key_b64().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        time: state.clock.now(),
    })
}

/// `POST /api/v1/authorize`
async fn authorize(
    state: web::Data<AppState>,
    http: HttpRequest,
    body: web::Json<AuthorizeRequest>,
) -> Result<HttpResponse, ApiError> {
    let req = Arc::new(Authorize::parse(body.into_inner()).map_err(bad)?);
    let now = state.clock.now().unix_timestamp();
    state.watermark.check(now)?;
    // At most twice: the second run finds the password verified in the cache.
    for _ in 0..2 {
        let (job_req, job_state) = (req.clone(), state.clone());
        let result = state
            .store
            .write_with_catalogue(
                move |conn, catalogue| {
                    authorize::authorize(
                        conn,
                        catalogue,
                        &job_req,
                        now,
                        job_state.appliance.installation_id(),
                        &job_state.passwords,
                    )
                },
                |grant| AuthorizeResponse {
                    authorization: state
                        .appliance
                        .sign(Typ::Authorization, &grant.authorization),
                    license: grant.license_jws,
                    refresh_after_s: REPORT_INTERVAL_S,
                },
            )
            .await;
        match result {
            Ok(answer) => return Ok(HttpResponse::Ok().json(answer)),
            Err(AuthorizeError::Refused(e)) => return Err(e),
            Err(AuthorizeError::CheckPassword { handshake_id, hash }) => {
                let limited = || {
                    ApiError::new(
                        ErrorCode::RateLimited,
                        "too many session password checks from this address; wait a minute",
                    )
                };
                // An address (or a code) that used up its checks is refused before it queues
                // for Argon2.
                // Keyed only here: most authorizations need no password check.
                let client = crate::ratelimit::request_key(&http);
                let code = handshake_id.to_string();
                if state.password_attempts.is_limited(&client, now)
                    || state.code_password_attempts.is_limited(&code, now)
                {
                    return Err(limited());
                }
                // Judged with an Argon2 permit held (two at a time for all devices): a request
                // that waited finds a password verified meanwhile in the cache, and every
                // check that runs is counted first, so guesses sent in parallel get no more
                // than the limit while right ones arriving together cost one check.
                let check = state.clone();
                let password = req.session_password.clone().unwrap_or_default();
                let verified = state
                    .argon2(Passwords::Devices, move || {
                        if check.passwords.is_verified(handshake_id, &hash, &password) {
                            return Some(true);
                        }
                        check.password_attempts.attempt(&client, now).ok()?;
                        check.code_password_attempts.attempt(&code, now).ok()?;
                        let right = verify_password(&hash, &password);
                        if right {
                            check.passwords.remember(handshake_id, &hash, &password);
                        }
                        Some(right)
                    })
                    .await
                    .ok_or_else(ApiError::internal)?;
                match verified {
                    None => return Err(limited()),
                    Some(false) => {
                        return Err(ApiError::new(
                            ErrorCode::SessionPasswordMismatch,
                            "the session password is wrong",
                        ));
                    }
                    Some(true) => {} // the next run finds it in the cache
                }
            }
        }
    }
    // An admin set the password again while it was checked: the device's password was
    // right for the old one; nothing broke, it asks again.
    Err(ApiError::new(
        ErrorCode::SessionPasswordMismatch,
        "the session password was changed while it was checked: authorize again",
    ))
}

/// `POST /api/v1/usage`
async fn usage(
    state: web::Data<AppState>,
    body: web::Json<UsageRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    // Too many reports is too large a request, as too many bytes is: send fewer per request.
    if body.reports.len() > types::MAX_REPORTS {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "at most {} reports per request; send the rest in another",
                types::MAX_REPORTS
            ),
        ));
    }
    let req = Usage::parse(body).map_err(bad)?;
    // Held by the writer's job until it has run, or is dropped unrun (its client gone): what
    // waits for the writer stays within the budget.
    let weight = req.reports.iter().fold(1u32, |w, r| {
        w.saturating_add(1)
            .saturating_add(u32::try_from(r.counters.len()).unwrap_or(u32::MAX))
    });
    let budget = state
        .usage_budget
        .clone()
        .try_acquire_many_owned(weight)
        .map_err(|_| {
            ApiError::new(
                ErrorCode::RateLimited,
                "the appliance is busy with many usage reports: send them again in a while",
            )
        })?;
    let device = req.device_uuid.clone();
    let now = state.clock.now().unix_timestamp();
    // Reports are recorded whatever the clock; only the renewal waits for it.
    let clock = state.watermark.check(now).map_err(ApiError::from);
    let job_state = state.clone();
    let (recorded, authorization) = state
        .store
        .write_with_catalogue(
            move |conn, catalogue| {
                let _budget = budget;
                usage::record(
                    conn,
                    catalogue,
                    &req,
                    now,
                    clock,
                    job_state.appliance.installation_id(),
                )
            },
            |recorded| {
                let signed = recorded
                    .renewal
                    .as_ref()
                    .ok()
                    .map(|auth| state.appliance.sign(Typ::Authorization, auth));
                (recorded, signed)
            },
        )
        .await?;
    state.metrics.usage_recorded(
        recorded.accepted,
        recorded.duplicates,
        recorded.renewal.is_err(),
    );
    let refused = &recorded.refused_counters;
    if !refused.is_empty() && state.metrics.counters_refused(refused.len() as u64, now) {
        const NAMED: usize = 8;
        tracing::warn!(
            device = %device,
            counters = %refused[..refused.len().min(NAMED)].join(", "),
            more = refused.len().saturating_sub(NAMED),
            limit = crate::store::devices::MAX_ITEM_COUNTERS,
            "usage of counter names past their item's limit not recorded (warned at most once \
             a minute: keygate_usage_counters_refused_total counts them all)"
        );
    }
    let renewal_error = recorded
        .renewal
        .err()
        .map(|e| keygate_sdk::wire::ErrorDetail {
            code: e.code,
            message: e.message,
        });
    Ok(HttpResponse::Ok().json(UsageResponse {
        accepted: recorded.accepted,
        duplicates: recorded.duplicates,
        acked_seq: recorded.acked_seq,
        authorization,
        renewal_error,
    }))
}

/// `POST /api/v1/release`
async fn release(
    state: web::Data<AppState>,
    body: web::Json<ReleaseRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let lease_id = types::uuid("lease_id", &body.lease_id).map_err(bad)?;
    let device_uuid = types::uuid("device_uuid", &body.device_uuid).map_err(bad)?;
    let now = state.clock.now().unix_timestamp();
    state
        .store
        .write_with_catalogue(
            move |conn, catalogue| usage::release(conn, catalogue, &lease_id, &device_uuid, now),
            |released| released,
        )
        .await?;
    Ok(HttpResponse::Ok().json(ReleaseResponse { released: true }))
}
