//! Portal access: sessions (cookie `__Host-keygate_session`: Secure, HttpOnly, SameSite=Lax;
//! only a SHA-256 of its token is stored), roles, CSRF, sign-in with rate limits, and the
//! first admin's one-time setup link.
//!
//! A handler states the role it needs in its signature: [`Viewer`] (any admin, auditors
//! included), [`Manager`] or [`Owner`]. Every form is posted through [`Post`], which checks
//! the session, the role and the form's CSRF token together.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use actix_web::cookie::{Cookie, SameSite};
use actix_web::dev::Payload;
use actix_web::http::{StatusCode, header};
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, web};
use data_encoding::{BASE64URL_NOPAD, HEXLOWER};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::appliance::same_secret;
use crate::server::AppState;
use crate::store::{StoreError, admins};

/// `__Host-`: the browser keeps it only if Secure, for path `/` and this host alone, so no
/// other host of the domain can set or shadow it.
pub const COOKIE: &str = "__Host-keygate_session";
/// A session ends after 30 minutes without a request, and after 12 hours in any case.
pub const IDLE_SECS: i64 = 30 * 60;
pub const ABSOLUTE_SECS: i64 = 12 * 3600;
/// The first admin's setup link is valid for 24 hours.
pub const SETUP_SECS: i64 = 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Auditor,
    Manager,
    Owner,
}

impl Role {
    /// What a request whose admin no longer holds its role is told.
    pub const NO_LONGER: &'static str = "Your account no longer has the role this needs";

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "auditor" => Some(Role::Auditor),
            "manager" => Some(Role::Manager),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Auditor => "auditor",
            Role::Manager => "manager",
            Role::Owner => "owner",
        }
    }
}

/// Why the portal refuses a request.
#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    #[error("sign in first")]
    SignIn,
    #[error("your role ({0}) may not do this")]
    Forbidden(&'static str),
    #[error("the form is out of date (CSRF check failed): reload the page and try again")]
    Csrf,
    #[error("{0}")]
    BadForm(String),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("internal error; the appliance logged the cause")]
    Internal,
}

impl From<StoreError> for PortalError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage failure in the portal");
        PortalError::Internal
    }
}

impl ResponseError for PortalError {
    fn status_code(&self) -> StatusCode {
        match self {
            PortalError::SignIn => StatusCode::SEE_OTHER,
            PortalError::Forbidden(_) | PortalError::Csrf => StatusCode::FORBIDDEN,
            PortalError::BadForm(_) => StatusCode::BAD_REQUEST,
            PortalError::NotFound(_) => StatusCode::NOT_FOUND,
            PortalError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let PortalError::SignIn = self {
            return HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/login"))
                .finish();
        }
        super::message_page(self.status_code(), &self.to_string())
    }
}

/// Random bytes as base64url.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source is available");
    BASE64URL_NOPAD.encode(&bytes)
}

pub fn digest(token: &str) -> String {
    HEXLOWER.encode(&Sha256::digest(token.as_bytes()))
}

/// A signed-in admin.
#[derive(Debug, Clone)]
pub struct Session {
    /// The SHA-256 of the session's token: the row that says it is still signed in.
    pub token_hash: String,
    pub admin_id: i64,
    pub name: String,
    pub role: Role,
    pub csrf: String,
}

impl Session {
    /// The role this session's admin holds now, or `None` once the session ended (signed out,
    /// its password reset, the admin deleted). Read inside a write, or after a wait the
    /// request spent (an Argon2 slot, a body the client sent slowly): another owner may have
    /// changed the account since the request was let in.
    pub fn role_now(&self, conn: &rusqlite::Connection) -> Result<Option<Role>, StoreError> {
        Ok(admins::session(conn, &self.token_hash)?
            .filter(|s| s.admin.id == self.admin_id)
            .and_then(|s| Role::parse(&s.admin.role)))
    }

    /// Whether this session still holds `role` or more (see [`Session::role_now`]).
    pub fn still_holds(&self, conn: &rusqlite::Connection, role: Role) -> Result<bool, StoreError> {
        Ok(self.role_now(conn)?.is_some_and(|held| held >= role))
    }
}

pub trait Requirement {
    const ROLE: Role;
}

pub struct AnyRole;
pub struct ManagerRole;
pub struct OwnerRole;

impl Requirement for AnyRole {
    const ROLE: Role = Role::Auditor;
}
impl Requirement for ManagerRole {
    const ROLE: Role = Role::Manager;
}
impl Requirement for OwnerRole {
    const ROLE: Role = Role::Owner;
}

/// A signed-in admin with at least the role `R` requires.
pub struct Signed<R>(pub Session, PhantomData<R>);
pub type Viewer = Signed<AnyRole>;
pub type Manager = Signed<ManagerRole>;
pub type Owner = Signed<OwnerRole>;

impl<R> std::ops::Deref for Signed<R> {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.0
    }
}

impl<R: Requirement> Signed<R> {
    /// Checks the session and its role again after a wait the client controls (the body of
    /// a form or an upload, sent as slowly as the body pace allows): an owner's change in
    /// between (a password reset, a lower role, the admin deleted) wins.
    pub async fn recheck(&self, state: &AppState) -> Result<(), PortalError> {
        let session = self.0.clone();
        match state.store.read(move |conn| session.role_now(conn)).await? {
            None => Err(PortalError::SignIn),
            Some(role) if role < R::ROLE => Err(PortalError::Forbidden(role.as_str())),
            Some(_) => Ok(()),
        }
    }
}

/// Looks up the session of a request's cookie, expiring it when idle or too old.
async fn session_of(req: &HttpRequest) -> Result<Session, PortalError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or(PortalError::Internal)?
        .clone();
    let token = req
        .cookie(COOKIE)
        .ok_or(PortalError::SignIn)?
        .value()
        .to_string();
    let hash = digest(&token);
    let now = state.clock.now().unix_timestamp();
    let found = state
        .store
        .read({
            let hash = hash.clone();
            move |conn| admins::session(conn, &hash)
        })
        .await?
        .ok_or(PortalError::SignIn)?;
    // Both writes are housekeeping: one that fails (a full disk) is logged, and the portal
    // stays readable for the admin who has to find out why. An expired session is refused
    // whether or not its row could be deleted.
    if now - found.last_seen >= IDLE_SECS || now - found.created_at >= ABSOLUTE_SECS {
        let deleted = state
            .store
            .write(move |conn| admins::delete_session(conn, &hash))
            .await;
        if let Err(e) = deleted {
            tracing::warn!(error = %e, "could not delete an expired portal session");
        }
        return Err(PortalError::SignIn);
    }
    if now - found.last_seen >= 60 {
        let touched = state
            .store
            .write({
                let hash = hash.clone();
                move |conn| admins::touch_session(conn, &hash, now)
            })
            .await;
        if let Err(e) = touched {
            tracing::warn!(error = %e, "could not record a portal session's activity");
        }
    }
    Ok(Session {
        token_hash: hash,
        admin_id: found.admin.id,
        role: Role::parse(&found.admin.role).ok_or(PortalError::Internal)?,
        name: found.admin.name,
        csrf: found.csrf,
    })
}

impl<R: Requirement + 'static> FromRequest for Signed<R> {
    type Error = PortalError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, PortalError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let session = session_of(&req).await?;
            if session.role < R::ROLE {
                return Err(PortalError::Forbidden(session.role.as_str()));
            }
            Ok(Signed(session, PhantomData))
        })
    }
}

/// A form that carries the session's CSRF token.
pub trait CsrfForm {
    fn csrf(&self) -> &str;
}

/// A posted form: a signed-in admin with the role `R` requires, and a form `F` whose CSRF
/// token matches the session's (compared in constant time).
pub struct Post<R, F>(pub Signed<R>, pub F);

impl<R: Requirement + 'static, F: CsrfForm + DeserializeOwned + 'static> FromRequest
    for Post<R, F>
{
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self, actix_web::Error>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let admin = Signed::<R>::from_request(req, &mut Payload::None);
        let form = web::Form::<F>::from_request(req, payload);
        let state = req.app_data::<web::Data<AppState>>().cloned();
        Box::pin(async move {
            let admin = admin.await?;
            // An unreadable form is answered by the portal's `FormConfig` handler.
            let form = form.await?.into_inner();
            if !same_secret(form.csrf(), &admin.csrf) {
                return Err(PortalError::Csrf.into());
            }
            admin
                .recheck(state.as_deref().ok_or(PortalError::Internal)?)
                .await?;
            Ok(Post(admin, form))
        })
    }
}

/// The session cookie for a new session. `Lax`, not `Strict`: a link to the portal followed
/// from another site (an alert email read in a webmail) opens the page for the signed-in
/// admin instead of the sign-in form. Cross-site requests that change anything are posts,
/// which a `Lax` cookie does not go with, and each also needs the session's CSRF token.
pub fn session_cookie(token: &str) -> Cookie<'static> {
    Cookie::build(COOKIE, token.to_string())
        .path("/")
        .secure(true)
        .http_only(true)
        .same_site(SameSite::Lax)
        .finish()
}

/// Starts a session for an admin inside a write; returns the cookie to set.
pub fn start_session(
    conn: &rusqlite::Connection,
    admin_id: i64,
    now: i64,
    address: &str,
) -> Result<Cookie<'static>, StoreError> {
    let token = random_token();
    admins::insert_session(
        conn,
        &digest(&token),
        admin_id,
        &random_token(),
        now,
        address,
    )?;
    Ok(session_cookie(&token))
}

/// Signs an admin in from this browser: a new session, and the one its cookie held before
/// (another admin's, or its own) ends at once rather than when idle. Only while the account
/// is the one whose password was checked (read again inside the write): a password reset or
/// the admin's removal while the check waited wins, and an id another admin took since
/// (SQLite reuses a deleted admin's) signs in no one. `None` when it changed.
pub async fn sign_in(
    state: &AppState,
    req: &HttpRequest,
    verified: admins::Admin,
) -> Result<Option<Cookie<'static>>, PortalError> {
    let before = req.cookie(COOKIE).map(|c| digest(c.value()));
    let address = super::client_address(req);
    let now = state.clock.now().unix_timestamp();
    Ok(state
        .store
        .write(move |conn| {
            let same = admins::admin_by_name(conn, &verified.name)?.is_some_and(|now| {
                now.id == verified.id && now.password_hash == verified.password_hash
            });
            if !same {
                return Ok(None);
            }
            if let Some(before) = before {
                admins::delete_session(conn, &before)?;
            }
            start_session(conn, verified.id, now, &address).map(Some)
        })
        .await?)
}

/// Makes a first-admin setup link if there is no admin yet; returns its path and token.
pub fn setup_link(conn: &rusqlite::Connection, now: i64) -> Result<Option<String>, StoreError> {
    if admins::admin_count(conn)? > 0 {
        return Ok(None);
    }
    let token = random_token();
    admins::insert_setup_token(conn, &digest(&token), now + SETUP_SECS)?;
    Ok(Some(format!("/setup?token={token}")))
}
