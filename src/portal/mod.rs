//! The admin portal: server-rendered pages (askama, auto-escaped), plain HTML forms, one
//! stylesheet served under a content-hashed URL, no script. Every response carries strict
//! security headers.

pub mod account;
pub mod admins;
pub mod alerts;
pub mod auth;
pub mod dashboard;
pub mod devices;
pub mod handshakes;
pub mod licenses;
pub mod settings;

use std::sync::OnceLock;

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use askama::Template;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use self::auth::{CsrfForm, PortalError, Post, Session};
use crate::licensing::handshake::{hash_password, verify_password};
use crate::server::{AppState, Passwords};
use crate::store::{admins as accounts, ops};

const CSS: &str = include_str!("../../static/keygate.css");

/// `/static/keygate-<hash>.css`: a new stylesheet gets a new URL, so it can be cached forever.
pub fn css_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let hash = data_encoding::HEXLOWER.encode(&Sha256::digest(CSS.as_bytes())[..6]);
        format!("/static/keygate-{hash}.css")
    })
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    // A form posted without one of its fields, or not as a form, and a link with a query it
    // cannot read, get the portal's page with the reason, not a plain-text 400.
    cfg.app_data(web::FormConfig::default().error_handler(|e, _req| {
        let why = match &e {
            actix_web::error::UrlencodedError::Payload(p) => crate::body_rate::refusal(p),
            _ => None,
        };
        PortalError::BadForm(why.map_or_else(
            || format!("The form could not be read ({e}); reload the page and try again."),
            |why| format!("The form could not be read: {why}."),
        ))
        .into()
    }))
    .app_data(web::QueryConfig::default().error_handler(|e, _req| {
        PortalError::BadForm(format!(
            "The link could not be read ({e}); go back and try again."
        ))
        .into()
    }))
    .route("/", web::get().to(dashboard::page))
    .route("/login", web::get().to(login_page))
    .route("/login", web::post().to(login))
    .route("/logout", web::post().to(logout))
    .route("/setup", web::get().to(setup_page))
    .route("/setup", web::post().to(setup))
    .route("/licenses", web::get().to(licenses::list))
    .route("/licenses", web::post().to(licenses::upload))
    .route(
        "/licenses/activation-request",
        web::get().to(licenses::activation_request),
    )
    .route("/licenses/items/{item_id}", web::get().to(licenses::item))
    .route("/alerts", web::get().to(alerts::page))
    .route("/alerts/recipients", web::post().to(alerts::set_recipients))
    .route("/alerts/smtp", web::post().to(alerts::smtp))
    .route("/audit", web::get().to(alerts::audit))
    .route("/handshakes", web::get().to(handshakes::page))
    .route("/handshakes/{action}", web::post().to(handshakes::act))
    .route("/settings", web::get().to(settings::page))
    .route(
        "/settings/certificate",
        web::post().to(settings::certificate),
    )
    .route("/settings/backup", web::post().to(settings::backup_now))
    .route(
        "/settings/backups/{name}",
        web::get().to(settings::download),
    )
    .route("/account", web::get().to(account::page))
    .route(
        "/account/password",
        web::post().to(account::change_password),
    )
    .route("/admins", web::get().to(admins::page))
    .route("/admins/{action}", web::post().to(admins::act))
    .route("/devices", web::get().to(devices::list))
    .route("/devices/remove-user", web::post().to(devices::remove_user))
    .route("/devices/{uuid}", web::get().to(devices::detail))
    .route("/devices/{uuid}/{action}", web::post().to(devices::act))
    .route("/static/{file}", web::get().to(stylesheet));
}

/// Paths that need no session: the client protocol, health and metrics, sign-in, setup,
/// the stylesheet.
fn is_public(path: &str) -> bool {
    ["/api/", "/static/"].iter().any(|p| path.starts_with(p))
        || [
            "/healthz",
            "/readyz",
            "/metrics",
            "/login",
            "/setup",
            "/favicon.ico",
        ]
        .contains(&path)
}

/// The portal's guard, in front of the handlers' own role checks: a portal page asked for
/// without a session cookie goes to sign-in before any handler runs.
pub async fn guard(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    if is_public(req.path()) || req.cookie(auth::COOKIE).is_some() {
        return next.call(req).await.map(|r| r.map_into_boxed_body());
    }
    let response = HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/login"))
        .finish();
    Ok(req.into_response(response))
}

/// Headers for every response of the appliance: no script, no framing, no referrer.
pub fn security_headers() -> actix_web::middleware::DefaultHeaders {
    actix_web::middleware::DefaultHeaders::new()
        .add((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ))
        .add((header::REFERRER_POLICY, "no-referrer"))
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::X_FRAME_OPTIONS, "DENY"))
        .add((header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"))
        // Pages show devices, admins and settings; a backup holds secrets: nothing is kept
        // in a browser's cache (the stylesheet sets its own caching).
        .add((header::CACHE_CONTROL, "no-store"))
}

/// What every page's layout shows: who is signed in, and the form token.
pub struct Page {
    pub name: String,
    pub role: &'static str,
    pub csrf: String,
    pub css: &'static str,
}

impl Page {
    pub fn of(session: &Session) -> Page {
        Page {
            name: session.name.clone(),
            role: session.role.as_str(),
            csrf: session.csrf.clone(),
            css: css_path(),
        }
    }
}

/// A page shown again after a refused form answers 400, otherwise 200.
pub fn render_form(template: &impl Template, refused: bool) -> HttpResponse {
    let mut response = render(template);
    if refused && response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::BAD_REQUEST;
    }
    response
}

pub fn render(template: &impl Template) -> HttpResponse {
    match template.render() {
        Ok(html) => HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .body(html),
        Err(e) => {
            tracing::error!(error = %e, "template failed");
            HttpResponse::InternalServerError().finish()
        }
    }
}

#[derive(Template)]
#[template(path = "portal/message.html")]
struct Message<'a> {
    css: &'a str,
    message: &'a str,
}

pub fn message_page(status: StatusCode, message: &str) -> HttpResponse {
    let html = Message {
        css: css_path(),
        message,
    }
    .render()
    .unwrap_or_default();
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .body(html)
}

async fn stylesheet(file: web::Path<String>) -> HttpResponse {
    if format!("/static/{file}") != css_path() {
        return HttpResponse::NotFound().finish();
    }
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "public, max-age=31536000, immutable"))
        .body(CSS)
}

/// The client's address, for the audit log and rate limits.
pub fn client_address(req: &HttpRequest) -> String {
    req.peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

/// Records an admin action that writes nothing else to the database (a backup, a file, a
/// test email) in a transaction of its own.
pub async fn audit_alone(
    state: &AppState,
    actor: &str,
    req: &HttpRequest,
    action: &'static str,
    target: String,
    detail: String,
) -> Result<(), PortalError> {
    let (actor, from, now) = (
        actor.to_string(),
        client_address(req),
        state.clock.now().unix_timestamp(),
    );
    state
        .store
        .write(move |conn| ops::audit(conn, now, &actor, action, &target, &detail, &from))
        .await?;
    Ok(())
}

/// The login and setup forms have no session yet: their CSRF token is a cookie of its own
/// that the form must repeat (double submit).
/// `__Host-` like the session cookie: a related host cannot plant a form token (login CSRF).
const FORM_COOKIE: &str = "__Host-keygate_form";

fn form_cookie(token: &str) -> actix_web::cookie::Cookie<'static> {
    actix_web::cookie::Cookie::build(FORM_COOKIE, token.to_string())
        .path("/")
        .secure(true)
        .http_only(true)
        .same_site(actix_web::cookie::SameSite::Strict)
        .finish()
}

/// The form token of this browser: the one it already has (another tab's sign-in or setup
/// form must keep working), or a new one.
fn form_token(req: &HttpRequest) -> String {
    req.cookie(FORM_COOKIE)
        .map(|c| c.value().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(auth::random_token)
}

fn form_cookie_matches(req: &HttpRequest, csrf: &str) -> bool {
    !csrf.is_empty()
        && req
            .cookie(FORM_COOKIE)
            .is_some_and(|c| crate::appliance::same_secret(c.value(), csrf))
}

#[derive(Template)]
#[template(path = "portal/login.html")]
struct LoginPage<'a> {
    css: &'a str,
    csrf: &'a str,
    name: &'a str,
    error: Option<&'a str>,
}

async fn login_page(req: HttpRequest) -> HttpResponse {
    let csrf = form_token(&req);
    let mut response = render(&LoginPage {
        css: css_path(),
        csrf: &csrf,
        name: "",
        error: None,
    });
    let _ = response.add_cookie(&form_cookie(&csrf));
    response
}

#[derive(Deserialize)]
struct LoginForm {
    name: String,
    password: String,
    csrf: String,
}

async fn login(
    state: web::Data<AppState>,
    req: HttpRequest,
    form: web::Form<LoginForm>,
) -> HttpResponse {
    let form = form.into_inner();
    let now = state.clock.now().unix_timestamp();
    // The form comes back with this browser's token: a sign-in open in another tab must
    // keep working after this one failed.
    let again = |error: &str| {
        let csrf = form_token(&req);
        let mut response = render(&LoginPage {
            css: css_path(),
            csrf: &csrf,
            name: &form.name,
            error: Some(error),
        });
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        let _ = response.add_cookie(&form_cookie(&csrf));
        response
    };
    if !form_cookie_matches(&req, &form.csrf) {
        return again("The form was out of date; please sign in again.");
    }
    // No admin has such a name: refused before any work or record (the audit log shows
    // names as typed, and one with bidirectional marks would garble its line).
    if !admin_name_ok(&form.name) || form.password.chars().count() > 256 {
        return again("Wrong name or password.");
    }
    // Each attempt is counted before Argon2 runs, so parallel attempts cannot all get past
    // the limit; only the first refusal of a window is audited (and looks the name up).
    // Per IPv4 address or IPv6 /64: a host picking new addresses in its /64 is one client.
    let client = crate::ratelimit::request_key(&req);
    let limited = state.sign_in_limits.attempt(&form.name, &client, now);
    const LIMITED: &str = "Too many failed sign-ins; wait a minute and try again.";
    if limited == Err(false) {
        return again(LIMITED);
    }
    let name = form.name.clone();
    let admin = match state
        .store
        .read(move |conn| accounts::admin_by_name(conn, &name))
        .await
    {
        Ok(admin) => admin,
        Err(e) => return PortalError::from(e).error_response(),
    };
    // A name no admin has is not written down: it is often a password typed in the wrong
    // box, and every role reads the audit log.
    let actor = if admin.is_some() {
        form.name.as_str()
    } else {
        UNKNOWN_NAME
    };
    let audit = |action| audit_alone(&state, actor, &req, action, String::new(), String::new());
    if limited.is_err() {
        let _ = audit("sign-in refused (rate limited)").await;
        return again(LIMITED);
    }
    let password = form.password.clone();
    let hash = admin.as_ref().map(|a| a.password_hash.clone());
    // Argon2 runs once even for an unknown name (against a hash made once), so timing does
    // not tell which names exist.
    let verified = state
        .argon2(Passwords::Portal, move || match hash {
            Some(hash) => verify_password(&hash, &password),
            None => {
                static NOBODY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
                let _ = verify_password(NOBODY.get_or_init(|| hash_password("nobody")), &password);
                false
            }
        })
        .await
        .unwrap_or(false);
    let signed_in = match admin.filter(|_| verified) {
        Some(admin) => match auth::sign_in(&state, &req, admin).await {
            Ok(cookie) => cookie,
            Err(e) => return e.error_response(),
        },
        None => None,
    };
    let Some(cookie) = signed_in else {
        let _ = audit("sign-in failed").await;
        return again("Wrong name or password.");
    };
    state.sign_in_limits.clear(&form.name, &client);
    let _ = audit("signed in").await;
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/"))
        .cookie(cookie)
        .finish()
}

#[derive(Deserialize)]
struct CsrfOnly {
    /// Missing is refused like a wrong one (403), not as an unreadable form.
    #[serde(default)]
    csrf: String,
}

impl CsrfForm for CsrfOnly {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

async fn logout(
    state: web::Data<AppState>,
    req: HttpRequest,
    post: Post<auth::AnyRole, CsrfOnly>,
) -> HttpResponse {
    if let Some(cookie) = req.cookie(auth::COOKIE) {
        let hash = auth::digest(cookie.value());
        let _ = state
            .store
            .write(move |conn| accounts::delete_session(conn, &hash))
            .await;
    }
    let _ = audit_alone(
        &state,
        &post.0.name,
        &req,
        "signed out",
        String::new(),
        String::new(),
    )
    .await;
    let mut gone = auth::session_cookie("");
    gone.make_removal();
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/login"))
        .cookie(gone)
        .finish()
}

#[derive(Template)]
#[template(path = "portal/setup.html")]
struct SetupPage<'a> {
    css: &'a str,
    csrf: &'a str,
    token: &'a str,
    name: &'a str,
    error: Option<&'a str>,
}

#[derive(Deserialize)]
struct SetupQuery {
    token: String,
}

async fn setup_page(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<SetupQuery>,
) -> HttpResponse {
    let token = query.into_inner().token;
    let now = state.clock.now().unix_timestamp();
    let hash = auth::digest(&token);
    match state
        .store
        .read(move |conn| accounts::setup_token_valid(conn, &hash, now))
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            return message_page(
                StatusCode::NOT_FOUND,
                "This setup link is not valid (used, expired or mistyped). Use `keygate admin create` at the console.",
            );
        }
        Err(e) => return PortalError::from(e).error_response(),
    }
    let csrf = form_token(&req);
    let mut response = render(&SetupPage {
        css: css_path(),
        csrf: &csrf,
        token: &token,
        name: "",
        error: None,
    });
    let _ = response.add_cookie(&form_cookie(&csrf));
    response
}

#[derive(Deserialize)]
struct SetupForm {
    token: String,
    name: String,
    password: String,
    confirm: String,
    csrf: String,
}

/// The audit log's actor for a sign-in with a name no admin has.
pub const UNKNOWN_NAME: &str = "(unknown name)";

/// Actors of the audit log that are not admins: the scheduled jobs and the console.
const RESERVED_NAMES: [&str; 2] = ["system", "cli"];

/// What makes an acceptable name and password for a new admin: those of
/// [`check_credentials`], and not a name the audit log gives its own actors (an admin so
/// named would read as them).
pub fn check_new_admin(name: &str, password: &str) -> Result<(), &'static str> {
    if RESERVED_NAMES.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Err(
            "The names system and cli are the audit log's own (the scheduled jobs, the \
             console); choose another.",
        );
    }
    check_credentials(name, password)
}

/// An admin's name: 1 to 64 characters, no space, control character or bidirectional mark.
fn admin_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= 64
        && !name
            .chars()
            .any(|c| crate::licensing::types::refused_in_text(c) || c.is_whitespace())
}

/// What makes an acceptable admin name and password.
pub fn check_credentials(name: &str, password: &str) -> Result<(), &'static str> {
    if !admin_name_ok(name) {
        return Err("The name must be 1 to 64 characters, without spaces.");
    }
    if password.chars().count() < 12 {
        return Err("The password must be at least 12 characters.");
    }
    if password.chars().count() > 256 {
        return Err("The password must be at most 256 characters.");
    }
    Ok(())
}

async fn setup(
    state: web::Data<AppState>,
    req: HttpRequest,
    form: web::Form<SetupForm>,
) -> HttpResponse {
    let form = form.into_inner();
    let again = |error: &str| {
        let csrf = form_token(&req);
        let mut response = render(&SetupPage {
            css: css_path(),
            csrf: &csrf,
            token: &form.token,
            name: &form.name,
            error: Some(error),
        });
        *response.status_mut() = StatusCode::BAD_REQUEST;
        let _ = response.add_cookie(&form_cookie(&csrf));
        response
    };
    if !form_cookie_matches(&req, &form.csrf) {
        return again("The form was out of date; please try again.");
    }
    if let Err(problem) = check_new_admin(&form.name, &form.password) {
        return again(problem);
    }
    if form.password != form.confirm {
        return again("The two passwords differ.");
    }
    let now = state.clock.now().unix_timestamp();
    let (token_hash, name, from) = (
        auth::digest(&form.token),
        form.name.clone(),
        client_address(&req),
    );
    // The link is checked before Argon2 runs (and again below, in the write that uses it).
    let link_valid = {
        let token_hash = token_hash.clone();
        state
            .store
            .read(move |conn| {
                Ok::<_, crate::store::StoreError>(
                    accounts::setup_token_valid(conn, &token_hash, now)?
                        && accounts::admin_count(conn)? == 0,
                )
            })
            .await
    };
    match link_valid {
        Ok(true) => {}
        Ok(false) => {
            return message_page(
                StatusCode::NOT_FOUND,
                "This setup link is not valid any more.",
            );
        }
        Err(e) => return PortalError::from(e).error_response(),
    }
    let password = form.password.clone();
    let Some(hash) = state
        .argon2(Passwords::Portal, move || hash_password(&password))
        .await
    else {
        return PortalError::Internal.error_response();
    };
    let created = state
        .store
        .write(move |conn| {
            if !accounts::setup_token_valid(conn, &token_hash, now)?
                || accounts::admin_count(conn)? > 0
            {
                return Ok(None);
            }
            let id = accounts::insert_admin(conn, &name, "owner", &hash, now)?;
            let admin = accounts::Admin {
                id,
                name: name.clone(),
                role: "owner".into(),
                password_hash: hash.clone(),
            };
            accounts::delete_setup_tokens(conn)?;
            ops::audit(
                conn,
                now,
                &name,
                "first admin created",
                &name,
                "owner",
                &from,
            )?;
            Ok::<_, crate::store::StoreError>(Some(admin))
        })
        .await;
    match created {
        Ok(Some(admin)) => match auth::sign_in(&state, &req, admin).await {
            Ok(Some(cookie)) => HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/"))
                .cookie(cookie)
                .finish(),
            // Changed in the instant since (another owner's reset): sign in as usual.
            Ok(None) => HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/login"))
                .finish(),
            Err(e) => e.error_response(),
        },
        Ok(None) => message_page(
            StatusCode::NOT_FOUND,
            "This setup link is not valid any more.",
        ),
        Err(e) => PortalError::from(e).error_response(),
    }
}

/// A time as the pages show it: `2026-06-01 12:00:00 UTC` (admins read the zone, not guess it).
pub fn utc(t: i64) -> String {
    let text = crate::licensing::rfc3339(crate::licensing::from_unix(t));
    format!("{} UTC", text.replace('T', " ").trim_end_matches('Z'))
}

/// Whether the signed-in admin may change things (for templates hiding forms).
pub fn can_manage(admin: &Session) -> bool {
    admin.role >= auth::Role::Manager
}
