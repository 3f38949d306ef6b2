//! Admins (owners only): create, change role, reset password, delete. An owner cannot
//! delete or demote itself, and the last owner stays.

use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::auth::{CsrfForm, Owner, OwnerRole, PortalError, Post, Role, Session};
use super::{Page, check_credentials, check_new_admin, render_form};
use crate::licensing::handshake::hash_password;
use crate::server::{AppState, Passwords};
use crate::store::{StoreError, admins, ops};

#[derive(Template)]
#[template(path = "portal/admins.html")]
struct AdminsPage {
    page: Page,
    admins: Vec<admins::Admin>,
    notice: Option<String>,
    error: Option<String>,
    /// The name and role a refused "create" form held (never the password).
    typed: (String, String),
}

async fn show(
    state: &AppState,
    admin: &Session,
    notice: Option<String>,
    error: Option<(String, (String, String))>,
) -> Result<HttpResponse, PortalError> {
    let list = state.store.read(admins::list_admins).await?;
    let refused = error.is_some();
    let (error, typed) = error.map_or((None, Default::default()), |(e, t)| (Some(e), t));
    let response = render_form(
        &AdminsPage {
            page: Page::of(admin),
            admins: list,
            notice,
            error,
            typed,
        },
        refused,
    );
    Ok(response)
}

pub async fn page(state: web::Data<AppState>, admin: Owner) -> Result<HttpResponse, PortalError> {
    show(&state, &admin, None, None).await
}

#[derive(Deserialize)]
pub struct Form {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    password: String,
}

impl CsrfForm for Form {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /admins/{create|role|password|delete}`
pub async fn act(
    state: web::Data<AppState>,
    req: HttpRequest,
    action: web::Path<String>,
    Post(owner, form): Post<OwnerRole, Form>,
) -> Result<HttpResponse, PortalError> {
    let action = action.into_inner();
    // A refused "create" shows its name and role again.
    let typed = if action == "create" {
        (form.name.clone(), form.role.clone())
    } else {
        Default::default()
    };
    let (st, ow) = (&state, &owner);
    let refuse = move |message: &str| {
        let error = format!("{message}; nothing was changed.");
        show(st, ow, None, Some((error, typed)))
    };
    let name = form.name.trim().to_string();
    if matches!(action.as_str(), "create" | "role") && Role::parse(&form.role).is_none() {
        return refuse("Choose a role: owner, manager or auditor").await;
    }
    if name == owner.name && matches!(action.as_str(), "delete" | "role") {
        return refuse("You cannot delete or change your own account").await;
    }
    // With the current password, where the session goes on (a reset here signs this session
    // out behind a page that still looks signed in).
    if name == owner.name && action == "password" {
        return refuse("Please change your own password on Your account (/account)").await;
    }
    let hash = if matches!(action.as_str(), "create" | "password") {
        let checked = if action == "create" {
            check_new_admin(&name, &form.password)
        } else {
            check_credentials(&name, &form.password)
        };
        if let Err(problem) = checked {
            return refuse(problem.trim_end_matches('.')).await;
        }
        let password = form.password.clone();
        Some(
            state
                .argon2(Passwords::Portal, move || hash_password(&password))
                .await
                .ok_or(PortalError::Internal)?,
        )
    } else {
        None
    };
    let now = state.clock.now().unix_timestamp();
    let (session, actor, from, role) = (
        owner.0.clone(),
        owner.name.clone(),
        req.peer_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default(),
        form.role.clone(),
    );
    let outcome = state
        .store
        .write(move |conn| {
            if !session.still_holds(conn, Role::Owner)? {
                return Ok(Err(Role::NO_LONGER.to_string()));
            }
            let target = admins::admin_by_name(conn, &name)?;
            let last_owner = target.as_ref().is_some_and(|t| t.role == "owner")
                && admins::owner_count(conn)? <= 1;
            let done: Result<String, String> = match (action.as_str(), &target) {
                ("create", Some(_)) => Err(format!("An admin named {name} already exists")),
                ("create", None) => {
                    admins::insert_admin(
                        conn,
                        &name,
                        &role,
                        hash.as_deref().unwrap_or_default(),
                        now,
                    )?;
                    Ok(format!("Admin {name} created ({role})."))
                }
                (_, None) => Err(format!("No admin named {name}")),
                ("role", Some(_)) if last_owner && role != "owner" => {
                    Err("The last owner stays an owner".into())
                }
                ("role", Some(_)) => {
                    admins::set_role(conn, &name, &role)?;
                    Ok(format!("{name} is now {role}."))
                }
                ("password", Some(_)) => {
                    admins::set_password(conn, &name, hash.as_deref().unwrap_or_default())?;
                    Ok(format!(
                        "Password of {name} reset; its sessions are signed out."
                    ))
                }
                ("delete", Some(_)) if last_owner => Err("The last owner cannot be deleted".into()),
                ("delete", Some(_)) => {
                    admins::delete_admin(conn, &name)?;
                    Ok(format!("Admin {name} deleted."))
                }
                _ => Err("Unknown action".into()),
            };
            if let Ok(what) = &done {
                ops::audit(
                    conn,
                    now,
                    &actor,
                    &format!("admin {action}"),
                    &name,
                    what,
                    &from,
                )?;
            }
            Ok::<_, StoreError>(done)
        })
        .await?;
    match outcome {
        Ok(notice) => show(&state, &owner, Some(notice), None).await,
        Err(e) => refuse(&e).await,
    }
}
