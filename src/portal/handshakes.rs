//! Handshake codes: create, rename, delete; which items each serves; session password;
//! validation fields; the public trial.

use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::auth::{CsrfForm, ManagerRole, PortalError, Post, Role, Session, Viewer};
use super::{Page, render_form};
use crate::licensing::handshake::{check_password, check_validation, hash_password};
use crate::licensing::is_identifier;
use crate::server::{AppState, Passwords};
use crate::store::catalogue::{self, PUBLIC_TRIAL};
use crate::store::licenses::{self, HandshakeCode, ItemRow};
use crate::store::{StoreError, ops, settings};

#[derive(Template)]
#[template(path = "portal/handshakes.html")]
struct HandshakesPage {
    page: Page,
    manage: bool,
    codes: Vec<(HandshakeCode, Vec<String>)>,
    items: Vec<(ItemRow, String)>,
    organizations: Vec<String>,
    trial: bool,
    notice: Option<String>,
    error: Option<String>,
    /// What a refused form held, shown again in it (`action` names the form).
    typed: Typed,
}

#[derive(Default)]
struct Typed {
    action: String,
    code: String,
    organization: String,
    name: String,
    domains: String,
    processes: String,
}

async fn show(
    state: &AppState,
    admin: &Session,
    notice: Option<String>,
    error: Option<(String, Typed)>,
) -> Result<HttpResponse, PortalError> {
    let (codes, items, trial) = state
        .store
        .read(|conn| {
            Ok::<_, StoreError>((
                licenses::handshake_codes(conn)?,
                licenses::all_items(conn)?,
                settings::get(conn, PUBLIC_TRIAL)?.as_deref() == Some("on"),
            ))
        })
        .await?;
    let code_of = |id: i64| {
        codes
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.code.clone())
            .unwrap_or_default()
    };
    let items: Vec<(ItemRow, String)> = items
        .into_iter()
        .filter(|i| !i.withdrawn)
        .map(|i| {
            let c = code_of(i.handshake_id);
            (i, c)
        })
        .collect();
    let mut organizations: Vec<String> = codes.iter().map(|c| c.organization_id.clone()).collect();
    organizations.dedup();
    let codes = codes
        .into_iter()
        .map(|c| {
            let served = items
                .iter()
                .filter(|(i, _)| i.handshake_id == c.id)
                .map(|(i, _)| i.item_id.clone())
                .collect();
            (c, served)
        })
        .collect();
    let refused = error.is_some();
    let (error, typed) = error.map_or((None, Typed::default()), |(e, t)| (Some(e), t));
    let response = render_form(
        &HandshakesPage {
            manage: super::can_manage(admin),
            page: Page::of(admin),
            codes,
            items,
            organizations,
            trial,
            notice,
            error,
            typed,
        },
        refused,
    );
    Ok(response)
}

pub async fn page(state: web::Data<AppState>, admin: Viewer) -> Result<HttpResponse, PortalError> {
    show(&state, &admin, None, None).await
}

#[derive(Deserialize)]
pub struct Form {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    code: String,
    #[serde(default)]
    organization: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    domains: String,
    #[serde(default)]
    processes: String,
    #[serde(default)]
    item: String,
    #[serde(default)]
    trial: String,
}

impl CsrfForm for Form {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// `POST /handshakes/{action}`: create, rename, delete, password, clear-password,
/// validation, assign, trial.
pub async fn act(
    state: web::Data<AppState>,
    req: HttpRequest,
    action: web::Path<String>,
    Post(admin, form): Post<ManagerRole, Form>,
) -> Result<HttpResponse, PortalError> {
    let action = action.into_inner();
    // A refusal shows the form again as it was typed.
    let typed = Typed {
        action: action.clone(),
        code: form.code.clone(),
        organization: form.organization.clone(),
        name: form.name.clone(),
        domains: form.domains.clone(),
        processes: form.processes.clone(),
    };
    let (st, ad) = (&state, &admin);
    let refuse = move |message: String| {
        let error = format!("{message}; nothing was changed.");
        show(st, ad, None, Some((error, typed)))
    };
    let code = form.code.trim().to_string();
    // Argon2 is slow on purpose: hash before taking the database writer.
    let hash = if action == "password" {
        if let Err(e) = check_password(&form.password) {
            return refuse(e.into()).await;
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
    let (domains, processes) = (lines(&form.domains), lines(&form.processes));
    if action == "validation"
        && let Err(e) = check_validation(&domains, &processes)
    {
        return refuse(e).await;
    }
    if action == "create" && !is_identifier(&code) {
        return refuse("A handshake code is 1 to 64 letters, digits, '.', '_' or '-'".into()).await;
    }
    if matches!(action.as_str(), "create" | "rename")
        && !crate::licensing::is_handshake_name(&form.name)
    {
        return refuse("A name is at most 100 characters, without control characters".into()).await;
    }
    let now = state.clock.now().unix_timestamp();
    let (session, actor, from) = (
        admin.0.clone(),
        admin.name.clone(),
        req.peer_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default(),
    );
    let (org, name, item, trial) = (
        form.organization.clone(),
        form.name.clone(),
        form.item.clone(),
        form.trial.clone(),
    );
    let outcome = state
        .store
        .write(move |conn| {
            if !session.still_holds(conn, Role::Manager)? {
                return Ok(Err(Role::NO_LONGER.to_string()));
            }
            let missing = || Ok(Err(format!("No handshake code {code:?}")));
            let done: Result<String, String> = match action.as_str() {
                "create" => {
                    if licenses::default_handshake(conn, &org)?.is_none() {
                        return Ok(Err(format!(
                            "Organization {org:?} has no license on this appliance"
                        )));
                    }
                    if licenses::handshake_by_code(conn, &code)?.is_some() {
                        return Ok(Err(format!("Handshake code {code} already exists")));
                    }
                    licenses::insert_handshake(conn, &code, &org, &name, false, now)?;
                    Ok(format!("Handshake code {code} created."))
                }
                "rename" => {
                    if !licenses::rename_handshake(conn, &code, &name)? {
                        return missing();
                    }
                    Ok(format!("Handshake code {code} renamed."))
                }
                "delete" => licenses::delete_handshake(conn, &code)?
                    .map(|()| format!("Handshake code {code} deleted."))
                    .map_err(|why| format!("Handshake code {code} was not deleted: {why}")),
                "password" => {
                    if !licenses::set_handshake_password(conn, &code, hash.as_deref())? {
                        return missing();
                    }
                    Ok(format!("Session password of {code} set."))
                }
                "clear-password" => {
                    if !licenses::set_handshake_password(conn, &code, None)? {
                        return missing();
                    }
                    Ok(format!("Session password of {code} removed."))
                }
                "validation" => {
                    if !licenses::set_handshake_validation(conn, &code, &domains, &processes)? {
                        return missing();
                    }
                    Ok(format!("Validation fields of {code} saved."))
                }
                "assign" => {
                    let Some(h) = licenses::handshake_by_code(conn, &code)? else {
                        return missing();
                    };
                    if !licenses::assign_item(conn, &item, h.id)? {
                        return Ok(Err(format!(
                            "Item {item:?} does not belong to organization {}",
                            h.organization_id
                        )));
                    }
                    Ok(format!("Item {item} is now served by {code}."))
                }
                "trial" => {
                    // The page's button sends `on` or `off`; anything else changes nothing.
                    let on = match trial.as_str() {
                        "on" => true,
                        "off" => false,
                        _ => return Ok(Err(format!("Unknown trial setting {trial:?}"))),
                    };
                    let state = if on { "on" } else { "off" };
                    if !catalogue::set_public_trial(conn, on)? {
                        // Nothing changed: nothing to audit.
                        return Ok(Ok(format!("The public trial is already {state}.")));
                    }
                    Ok(format!("The public trial is {state}."))
                }
                _ => Err("Unknown action".to_string()),
            };
            if let Ok(what) = &done {
                ops::audit(
                    conn,
                    now,
                    &actor,
                    &format!("handshake {action}"),
                    &code,
                    what,
                    &from,
                )?;
            }
            Ok::<_, StoreError>(done)
        })
        .await?;
    match outcome {
        Ok(notice) => show(&state, &admin, Some(notice), None).await,
        Err(e) => refuse(e).await,
    }
}
