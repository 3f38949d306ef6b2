//! The signed-in admin's own account: any role changes its own password, giving the current
//! one. The change signs out the admin's other sessions; this browser gets a new one.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::auth::{self, AnyRole, CsrfForm, PortalError, Post, Session, Viewer};
use super::{Page, audit_alone, check_credentials, client_address, render_form};
use crate::licensing::handshake::{hash_password, verify_password};
use crate::server::{AppState, Passwords};
use crate::store::{admins, ops};

#[derive(Template)]
#[template(path = "portal/account.html")]
struct AccountPage {
    page: Page,
    notice: Option<&'static str>,
    error: Option<String>,
}

fn show(admin: &Session, notice: Option<&'static str>, error: Option<String>) -> HttpResponse {
    let refused = error.is_some();
    render_form(
        &AccountPage {
            page: Page::of(admin),
            notice,
            error,
        },
        refused,
    )
}

#[derive(Deserialize)]
pub struct Shown {
    #[serde(default)]
    changed: Option<String>,
}

/// `GET /account`; `?changed` after a change (the post redirects here).
pub async fn page(admin: Viewer, shown: web::Query<Shown>) -> HttpResponse {
    let notice = shown.changed.is_some().then_some(
        "Your password was changed. Your other sessions were signed out; this one goes on.",
    );
    show(&admin, notice, None)
}

#[derive(Deserialize)]
pub struct PasswordForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    current: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    confirm: String,
}

impl CsrfForm for PasswordForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /account/password`. The current password is checked like a sign-in (the same rate
/// limits and audit), so a session left open cannot be used to guess it.
pub async fn change_password(
    state: web::Data<AppState>,
    req: HttpRequest,
    Post(admin, form): Post<AnyRole, PasswordForm>,
) -> Result<HttpResponse, PortalError> {
    let refuse = |message: &str| {
        Ok(show(
            &admin,
            None,
            Some(format!("{message} Nothing was changed.")),
        ))
    };
    if let Err(problem) = check_credentials(&admin.name, &form.password) {
        return refuse(problem);
    }
    if form.password != form.confirm {
        return refuse("The two new passwords differ.");
    }
    if form.current.chars().count() > 256 {
        return refuse("The current password is wrong.");
    }
    let now = state.clock.now().unix_timestamp();
    let client = crate::ratelimit::request_key(&req);
    if state
        .sign_in_limits
        .attempt(&admin.name, &client, now)
        .is_err()
    {
        return refuse("Too many wrong passwords; wait a minute and try again.");
    }
    let name = admin.name.clone();
    let stored = state
        .store
        .read(move |conn| admins::admin_by_name(conn, &name))
        .await?
        .ok_or(PortalError::SignIn)?;
    let (current, new, verified) = (
        form.current.clone(),
        form.password.clone(),
        stored.password_hash.clone(),
    );
    let hash = state
        .argon2(Passwords::Portal, move || {
            verify_password(&stored.password_hash, &current).then(|| hash_password(&new))
        })
        .await
        .ok_or(PortalError::Internal)?;
    let Some(hash) = hash else {
        audit_alone(
            &state,
            &admin.name,
            &req,
            "password change refused (wrong current password)",
            admin.name.clone(),
            String::new(),
        )
        .await?;
        return refuse("The current password is wrong.");
    };
    state.sign_in_limits.clear(&admin.name, &client);
    let (name, id, from) = (admin.name.clone(), admin.admin_id, client_address(&req));
    let session = req.cookie(auth::COOKIE).map(|c| auth::digest(c.value()));
    // Only over the password just verified, from a session still signed in: an owner's
    // reset, or the admin's removal, in between wins.
    let cookie = state
        .store
        .write(move |conn| {
            let signed_in = match &session {
                Some(token) => admins::session(conn, token)?.is_some(),
                None => false,
            };
            if !signed_in || !admins::change_password(conn, &name, &verified, &hash)? {
                return Ok(None);
            }
            ops::audit(conn, now, &name, "password changed", &name, "", &from)?;
            auth::start_session(conn, id, now, &from).map(Some)
        })
        .await?;
    let Some(cookie) = cookie else {
        return refuse(
            "Your account changed meanwhile (an owner reset its password, or you were signed out).",
        );
    };
    Ok(HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/account?changed"))
        .cookie(cookie)
        .finish())
}
