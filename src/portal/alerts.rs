//! Alerts: recipients, the SMTP server, a test email, and the scheduled jobs' recent runs
//! (failed deliveries show there). The audit log.

use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::auth::{CsrfForm, ManagerRole, PortalError, Post, Session, Viewer};
use super::{Page, render, render_form};
use crate::alerts::mail::{self, SmtpSettings, TlsMode};
use crate::server::AppState;
use crate::store::ops::{self, AuditEntry, JobRun};
use crate::store::{StoreError, settings};

/// What the forms show: stored values, or what the admin typed when it was refused.
#[derive(Default)]
pub struct AlertsForm {
    pub recipients: String,
    pub host: String,
    pub port: String,
    pub tls: String,
    pub user: String,
    pub has_password: bool,
    pub from: String,
    pub ca: String,
}

#[derive(Template)]
#[template(path = "portal/alerts.html")]
struct AlertsPage {
    page: Page,
    manage: bool,
    form: AlertsForm,
    runs: Vec<(JobRun, String)>,
    notice: Option<String>,
    error: Option<String>,
    error_field: &'static str,
}

async fn stored(state: &AppState) -> Result<(AlertsForm, Vec<JobRun>), PortalError> {
    Ok(state
        .store
        .read(|conn| {
            let smtp = mail::load_settings(conn)?;
            let form = AlertsForm {
                recipients: settings::get(conn, mail::RECIPIENTS)?.unwrap_or_default(),
                host: smtp.as_ref().map(|s| s.host.clone()).unwrap_or_default(),
                port: smtp
                    .as_ref()
                    .map(|s| s.port.to_string())
                    .unwrap_or_default(),
                tls: smtp
                    .as_ref()
                    .map_or("starttls", |s| s.tls.as_str())
                    .to_string(),
                user: smtp
                    .as_ref()
                    .and_then(|s| s.user.clone())
                    .unwrap_or_default(),
                has_password: smtp.as_ref().is_some_and(|s| s.password.is_some()),
                ca: smtp.as_ref().and_then(|s| s.ca.clone()).unwrap_or_default(),
                from: smtp.map(|s| s.from).unwrap_or_default(),
            };
            Ok::<_, StoreError>((form, ops::job_runs(conn, 30)?))
        })
        .await?)
}

fn show(
    admin: &Session,
    form: AlertsForm,
    runs: Vec<JobRun>,
    notice: Option<String>,
    error: Option<(&'static str, String)>,
) -> HttpResponse {
    let refused = error.is_some();
    let (error_field, error) = error.map_or(("", None), |(f, e)| (f, Some(e)));
    render_form(
        &AlertsPage {
            manage: super::can_manage(admin),
            page: Page::of(admin),
            form,
            runs: runs
                .into_iter()
                .map(|r| {
                    let at = super::utc(r.started_at);
                    (r, at)
                })
                .collect(),
            notice,
            error,
            error_field,
        },
        refused,
    )
}

pub async fn page(state: web::Data<AppState>, admin: Viewer) -> Result<HttpResponse, PortalError> {
    let (form, runs) = stored(&state).await?;
    Ok(show(&admin, form, runs, None, None))
}

#[derive(Deserialize)]
pub struct RecipientsForm {
    #[serde(default)]
    csrf: String,
    recipients: String,
}

impl CsrfForm for RecipientsForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /alerts/recipients`: a `;`-separated list, each address checked.
pub async fn set_recipients(
    state: web::Data<AppState>,
    req: HttpRequest,
    Post(admin, form): Post<ManagerRole, RecipientsForm>,
) -> Result<HttpResponse, PortalError> {
    let (mut shown, runs) = stored(&state).await?;
    let parsed = match mail::recipients_to_save(&form.recipients) {
        Ok(list) => list,
        Err(e) => {
            shown.recipients = form.recipients;
            return Ok(show(
                &admin,
                shown,
                runs,
                None,
                Some(("recipients", format!("{e}; nothing was saved."))),
            ));
        }
    };
    let list = parsed
        .iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>()
        .join(";");
    let now = state.clock.now().unix_timestamp();
    let (actor, from, saved) = (
        admin.name.clone(),
        super::client_address(&req),
        list.clone(),
    );
    state
        .store
        .write(move |conn| {
            settings::set(conn, mail::RECIPIENTS, &saved)?;
            ops::audit(conn, now, &actor, "alert recipients set", &saved, "", &from)
        })
        .await?;
    let (shown, runs) = stored(&state).await?;
    Ok(show(
        &admin,
        shown,
        runs,
        Some(format!("Alert recipients saved ({}).", parsed.len())),
        None,
    ))
}

#[derive(Deserialize)]
pub struct SmtpForm {
    #[serde(default)]
    csrf: String,
    host: String,
    #[serde(default)]
    port: String,
    tls: String,
    #[serde(default)]
    user: String,
    /// Empty keeps the stored password.
    #[serde(default)]
    password: String,
    #[serde(default)]
    from: String,
    /// A PEM CA certificate for the server's TLS certificate (empty: the public roots).
    #[serde(default)]
    ca: String,
    /// "save" or "test".
    #[serde(default)]
    action: String,
}

impl CsrfForm for SmtpForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /alerts/smtp`: saves the SMTP server, or sends a test email with the settings as
/// typed (not saved by the test).
pub async fn smtp(
    state: web::Data<AppState>,
    req: HttpRequest,
    Post(admin, form): Post<ManagerRole, SmtpForm>,
) -> Result<HttpResponse, PortalError> {
    let (stored_form, runs) = stored(&state).await?;
    let shown = AlertsForm {
        recipients: stored_form.recipients.clone(),
        host: form.host.clone(),
        port: form.port.clone(),
        tls: form.tls.clone(),
        user: form.user.clone(),
        has_password: stored_form.has_password,
        from: form.from.clone(),
        ca: form.ca.clone(),
    };
    let refuse = |field, message: &str| {
        Ok(show(
            &admin,
            shown_clone(&shown),
            runs.clone(),
            None,
            Some((field, format!("{message}; nothing was saved."))),
        ))
    };
    let host = form.host.trim();
    if let Err(e) = mail::check_host(host) {
        return refuse("host", e);
    }
    let Some(tls) = TlsMode::parse(&form.tls) else {
        return refuse("tls", "Choose STARTTLS, TLS or none");
    };
    let port = match form.port.trim() {
        "" => tls.default_port(),
        p => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return refuse("port", "The port must be a number from 1 to 65535"),
        },
    };
    let from = if form.from.trim().is_empty() {
        crate::alerts::mail::default_from()
    } else {
        form.from.trim().to_string()
    };
    let user = Some(form.user.trim().to_string()).filter(|u| !u.is_empty());
    let ca = crate::alerts::mail::ca_text(&form.ca);
    // A stored password is kept only for the server it was given for: changing where mail
    // goes (or how it is protected) without typing it again drops it, so nobody can send it
    // to a server of their own choosing.
    let stored_smtp = state.store.read(mail::load_settings).await?;
    let mut settings = SmtpSettings {
        host: host.to_string(),
        port,
        tls,
        user,
        password: None,
        from,
        ca,
    };
    let dropped = if form.password.is_empty() {
        let (kept, dropped) = mail::kept_password(stored_smtp.as_ref(), &settings);
        settings.password = kept;
        dropped
    } else {
        settings.password = Some(form.password.clone());
        false
    };
    if let Err((field, message)) = mail::check_settings(&settings) {
        return refuse(field, message);
    }
    if form.action == "test" {
        // The settings as typed, saved or not: an admin tries them before saving them.
        let unsaved = stored_smtp.as_ref() != Some(&settings);
        let result = async {
            let to = mail::parse_recipients(&stored_form.recipients)?;
            if to.is_empty() {
                return Err(mail::MailError::BadAddress("(no recipients set)".into()));
            }
            mail::send(&settings, &to, &mail::Email::test()).await
        }
        .await;
        // A test that goes through lets the appliance's own emails use them again at once.
        state.smtp_refusal.tested(&settings, &result);
        // Where the appliance was made to connect is on record, as a save would be.
        let outcome = match &result {
            Ok(_) => "accepted".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        super::audit_alone(
            &state,
            &admin.name,
            &req,
            "SMTP test email",
            format!("{}:{}", settings.host, settings.port),
            format!("{}, {outcome}", settings.tls.as_str()),
        )
        .await?;
        let not_saved = match (unsaved, dropped) {
            (_, true) => {
                " The stored password was not used (it is kept for the saved server only); \
                 these settings are not saved yet."
            }
            (true, false) => " These settings are not saved yet: save them to use them for alerts.",
            (false, false) => "",
        };
        return Ok(match result {
            Ok(answer) => show(
                &admin,
                shown,
                runs,
                Some(format!(
                    "The SMTP server accepted the test email: {answer}.{not_saved}"
                )),
                None,
            ),
            Err(e) => show(
                &admin,
                shown,
                runs,
                None,
                Some((
                    "smtp",
                    format!("The test email was not sent: {e}.{not_saved}"),
                )),
            ),
        });
    }
    let now = state.clock.now().unix_timestamp();
    let (actor, addr) = (admin.name.clone(), super::client_address(&req));
    let saved = state
        .store
        .write(move |conn| {
            mail::save_settings(conn, &settings)?;
            ops::audit(
                conn,
                now,
                &actor,
                "SMTP server set",
                &format!("{}:{}", settings.host, settings.port),
                settings.tls.as_str(),
                &addr,
            )?;
            Ok::<_, mail::MailError>(())
        })
        .await;
    match saved {
        Ok(()) => {
            let (shown, runs) = stored(&state).await?;
            Ok(show(
                &admin,
                shown,
                runs,
                Some(if dropped {
                    "SMTP server saved. The stored password was removed because the server \
                     changed: type it again if this server needs one."
                        .into()
                } else {
                    "SMTP server saved.".into()
                }),
                None,
            ))
        }
        Err(mail::MailError::Store(e)) => Err(e.into()),
        Err(e) => refuse("from", &e.to_string()),
    }
}

fn shown_clone(f: &AlertsForm) -> AlertsForm {
    AlertsForm {
        recipients: f.recipients.clone(),
        host: f.host.clone(),
        port: f.port.clone(),
        tls: f.tls.clone(),
        user: f.user.clone(),
        has_password: f.has_password,
        from: f.from.clone(),
        ca: f.ca.clone(),
    }
}

#[derive(Template)]
#[template(path = "portal/audit.html")]
struct AuditPage {
    page: Page,
    action: String,
    actor: String,
    entries: Vec<(AuditEntry, String)>,
    /// Where the next, older page starts, when there is one.
    older: Option<i64>,
    /// The search read its span of entries without filling the page.
    searched_part: bool,
    span: i64,
}

#[derive(Deserialize)]
pub struct AuditQuery {
    #[serde(default)]
    action: String,
    #[serde(default)]
    actor: String,
    before: Option<i64>,
}

/// Audit entries shown on one page.
const AUDIT_PAGE: usize = 200;

/// `GET /audit?action=...&actor=...&before=...`: the newest entries, a page at a time, those
/// whose action contains the text (any case) and of one actor if given.
pub async fn audit(
    state: web::Data<AppState>,
    admin: Viewer,
    query: web::Query<AuditQuery>,
) -> Result<HttpResponse, PortalError> {
    let AuditQuery {
        action,
        actor,
        before,
    } = query.into_inner();
    let (action, actor) = (action.trim().to_string(), actor.trim().to_string());
    let (a, b) = (action.clone(), actor.clone());
    let found = state
        .store
        .read(move |conn| {
            let filter = ops::AuditFilter {
                action: Some(a.as_str()).filter(|a| !a.is_empty()),
                actor: Some(b.as_str()).filter(|a| !a.is_empty()),
                before,
            };
            ops::audit_entries(conn, &filter, AUDIT_PAGE)
        })
        .await?;
    Ok(render(&AuditPage {
        page: Page::of(&admin),
        action,
        actor,
        entries: found
            .entries
            .into_iter()
            .map(|e| {
                let at = super::utc(e.at);
                (e, at)
            })
            .collect(),
        older: found.older,
        searched_part: found.searched_part,
        span: ops::AUDIT_SEARCH_SPAN,
    }))
}
