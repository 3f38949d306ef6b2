//! Settings: the TLS certificate (checked before it replaces the one in use, no restart),
//! backups (list, take one now, download for owners).

use actix_multipart::Multipart;
use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::auth::{CsrfForm, Manager, ManagerRole, Owner, PortalError, Post, Session, Viewer};
use super::{Page, render_form};
use crate::appliance::write_secret_file;
use crate::licensing::rfc3339;
use crate::server::AppState;
use crate::store::backup;
use crate::tls;

pub struct BackupView {
    pub name: String,
    pub taken: String,
    pub size: u64,
}

#[derive(Template)]
#[template(path = "portal/settings.html")]
struct SettingsPage {
    page: Page,
    manage: bool,
    owner: bool,
    certificate: String,
    configured: bool,
    backups: Vec<BackupView>,
    /// How often the backup job runs (`jobs.backup_every_s`), in words.
    backup_every: String,
    notice: Option<String>,
    error: Option<String>,
}

/// An interval in the largest whole unit: "12 minutes", "hour", "90 seconds".
fn interval(seconds: u64) -> String {
    let (n, unit) = [
        (86_400, "day"),
        (3_600, "hour"),
        (60, "minute"),
        (1, "second"),
    ]
    .into_iter()
    .find(|(size, _)| seconds.is_multiple_of(*size))
    .map(|(size, unit)| (seconds / size, unit))
    .expect("every number is whole seconds");
    match n {
        1 => unit.to_string(),
        n => format!("{n} {unit}s"),
    }
}

fn backups_dir(state: &AppState) -> std::path::PathBuf {
    state.config.data_dir.join(backup::BACKUP_DIR)
}

async fn show(
    state: &AppState,
    admin: &Session,
    notice: Option<String>,
    error: Option<String>,
) -> Result<HttpResponse, PortalError> {
    let dir = backups_dir(state);
    let files = web::block(move || backup::list(&dir))
        .await
        .map_err(|_| PortalError::Internal)?
        .map_err(|e| {
            tracing::error!(error = %e, "cannot list backups");
            PortalError::Internal
        })?;
    // What the certificate served now is, read from it (an upload replaces the self-signed
    // one in the same files).
    let origin = match (
        state.cert_source.self_signed,
        state.certificate.self_signed(),
    ) {
        (false, _) => " (named in the configuration file)",
        (true, Some(true)) => " (self-signed)",
        (true, Some(false)) => " (issued by a certificate authority, uploaded)",
        (true, None) => "",
    };
    let refused = error.is_some();
    let response = render_form(
        &SettingsPage {
            manage: super::can_manage(admin),
            owner: admin.role == super::auth::Role::Owner,
            page: Page::of(admin),
            certificate: format!("{}{origin}", state.cert_source.cert.display()),
            configured: !state.cert_source.self_signed,
            backup_every: interval(state.config.jobs.backup_every_s),
            backups: files
                .into_iter()
                .map(|f| BackupView {
                    name: crate::store::backup::file_name(&f.path),
                    taken: super::utc(f.taken_at.unix_timestamp()),
                    size: f.size,
                })
                .collect(),
            notice,
            error,
        },
        refused,
    );
    Ok(response)
}

pub async fn page(state: web::Data<AppState>, admin: Viewer) -> Result<HttpResponse, PortalError> {
    show(&state, &admin, None, None).await
}

/// `POST /settings/certificate` (multipart: csrf, cert, key): replaces the certificate.
pub async fn certificate(
    state: web::Data<AppState>,
    admin: Manager,
    req: HttpRequest,
    form: Multipart,
) -> Result<HttpResponse, PortalError> {
    let mut files = match super::licenses::read_files(form, &admin.csrf).await {
        Err(PortalError::BadForm(why)) => {
            let error = format!("The certificate was not installed: {why}. The current one stays.");
            return show(&state, &admin, None, Some(error)).await;
        }
        files => files?,
    };
    admin.recheck(&state).await?;
    if !state.cert_source.self_signed {
        return show(&state, &admin, None, Some("The configuration file names the certificate (tls.cert, tls.key): replace those files and restart.".into())).await;
    }
    let (cert, key) = (
        files.remove("cert").unwrap_or_default(),
        files.remove("key").unwrap_or_default(),
    );
    let now = state.clock.now();
    let checked = tls::certified_key(&cert, &key)
        .and_then(|certified| Ok((tls::check_serving(&certified, now)?, certified)));
    let (coverage, certified) = match checked {
        Ok(checked) => checked,
        Err(e) => {
            return show(
                &state,
                &admin,
                None,
                Some(format!(
                    "The certificate was not installed: {e}. The current one stays."
                )),
            )
            .await;
        }
    };
    let (source, served) = (state.cert_source.clone(), state.certificate.clone());
    let written = web::block(move || {
        // One replacement at a time, the pair served changed with the files: two uploads at
        // once would otherwise leave one's key beside the other's certificate.
        static REPLACING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = REPLACING.lock().unwrap_or_else(|e| e.into_inner());
        // New files beside the old ones, then renamed over them, key first; a crash in
        // between is finished at the next start (`CertSource::finish_replacement`). The
        // directory is synced: the new pair is the one in use after a power loss too.
        let (cert_tmp, key_tmp) = source.pending();
        let _ = std::fs::remove_file(&cert_tmp);
        let _ = std::fs::remove_file(&key_tmp);
        write_secret_file(&key_tmp, &key)?;
        write_secret_file(&cert_tmp, &cert)?;
        std::fs::rename(&key_tmp, &source.key)?;
        std::fs::rename(&cert_tmp, &source.cert)?;
        // Renamed: the new pair is the one on disk, so it is the one served (a failed sync
        // only risks the old pair coming back after a power loss).
        served.replace(certified);
        if let Some(dir) = source.cert.parent()
            && let Err(e) = crate::appliance::sync_dir(dir)
        {
            tracing::warn!(error = %e, "cannot sync the certificate's directory");
        }
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|_| PortalError::Internal)?;
    if let Err(e) = written {
        tracing::error!(error = %e, "cannot store the uploaded certificate");
        return Err(PortalError::Internal);
    }
    super::audit_alone(
        &state,
        &admin.name,
        &req,
        "certificate replaced",
        String::new(),
        String::new(),
    )
    .await?;
    let names = if coverage.names.is_empty() {
        " It names no DNS name: devices must reach the appliance by an IP address it names."
            .to_string()
    } else {
        format!(
            " It names {}; devices must reach the appliance by one of these.",
            coverage.names.join(", ")
        )
    };
    let soon = coverage.expires_soon.map_or(String::new(), |at| {
        format!(
            " It expires on {}: upload its successor before then.",
            rfc3339(at)
        )
    });
    show(
        &state,
        &admin,
        Some(format!(
            "The new certificate is in use (new connections get it now).{names}{soon}"
        )),
        None,
    )
    .await
}

#[derive(Deserialize)]
pub struct CsrfField {
    #[serde(default)]
    csrf: String,
}

impl CsrfForm for CsrfField {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /settings/backup`: takes a backup now (audited, like every admin action).
pub async fn backup_now(
    state: web::Data<AppState>,
    req: HttpRequest,
    Post(admin, _): Post<ManagerRole, CsrfField>,
) -> Result<HttpResponse, PortalError> {
    let (detail, notice, error) = match crate::jobs::run(&state, crate::jobs::Job::Backup).await {
        Ok(detail) => (
            detail.clone(),
            Some(format!("Backup taken: {detail}")),
            None,
        ),
        Err(crate::jobs::JobError::Busy(_)) => (
            "skipped: a backup was being taken".into(),
            Some(
                "A backup is being taken now (the scheduled one): it is listed below when it ends."
                    .into(),
            ),
            None,
        ),
        Err(e) => (
            format!("failed: {e}"),
            None,
            Some(format!("The backup failed: {e}")),
        ),
    };
    super::audit_alone(
        &state,
        &admin.name,
        &req,
        "backup taken",
        String::new(),
        detail,
    )
    .await?;
    show(&state, &admin, notice, error).await
}

/// `GET /settings/backups/{name}`: an owner downloads a backup.
pub async fn download(
    state: web::Data<AppState>,
    admin: Owner,
    req: HttpRequest,
    name: web::Path<String>,
) -> Result<HttpResponse, PortalError> {
    // A link on another site opens this with the owner's session (the cookie is
    // SameSite=Lax): a copy of every secret the database holds would be dropped into their
    // downloads, unasked. The browser says where the request came from; a client that says
    // nothing (an older browser, curl) is let in.
    if req
        .headers()
        .get("sec-fetch-site")
        .is_some_and(|site| !matches!(site.as_bytes(), b"same-origin" | b"none"))
    {
        return Ok(super::message_page(
            StatusCode::FORBIDDEN,
            "A backup is downloaded from this appliance's Settings page, not from a link on \
             another site.",
        ));
    }
    let name = name.into_inner();
    let dir = backups_dir(&state);
    let wanted = name.clone();
    let file = web::block(move || -> Result<_, String> {
        // Only a file the backup list knows: never a path from the request.
        let listed = backup::list(&dir).map_err(|e| e.to_string())?;
        let Some(file) = listed.into_iter().find(|f| {
            f.path
                .file_name()
                .is_some_and(|n| n.to_string_lossy() == wanted)
        }) else {
            return Ok(None);
        };
        match std::fs::File::open(&file.path) {
            Ok(opened) => Ok(Some((opened, file.size))),
            // Pruned since it was listed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", file.path.display())),
        }
    })
    .await
    .map_err(|_| PortalError::Internal)?
    .map_err(|e| {
        // Not "no such backup": the admin needs to know the backups cannot be read.
        tracing::error!(error = %e, "a backup could not be read for download");
        PortalError::Internal
    })?;
    let Some((file, size)) = file else {
        return Ok(super::message_page(
            StatusCode::NOT_FOUND,
            "No such backup.",
        ));
    };
    super::audit_alone(
        &state,
        &admin.name,
        &req,
        "backup downloaded",
        name.clone(),
        String::new(),
    )
    .await?;
    Ok(HttpResponse::Ok()
        .content_type("application/vnd.sqlite3")
        .insert_header((
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        ))
        .no_chunking(size)
        .streaming(file_chunks(file)))
}

/// A file read in 256 KiB chunks on the blocking pool: a backup of any size is sent without
/// holding it in memory.
fn file_chunks(
    file: std::fs::File,
) -> impl futures_util::Stream<Item = Result<web::Bytes, std::io::Error>> {
    futures_util::stream::try_unfold(file, |mut file| async move {
        let chunk = web::block(move || {
            use std::io::Read;
            let mut buf = vec![0; 256 * 1024];
            let n = file.read(&mut buf)?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((buf, file))
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(match chunk {
            (buf, _) if buf.is_empty() => None,
            (buf, file) => Some((web::Bytes::from(buf), file)),
        })
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn intervals_read_in_their_largest_whole_unit() {
        let read = |s: u64| super::interval(s);
        assert_eq!(read(720), "12 minutes");
        assert_eq!(read(3_600), "hour");
        assert_eq!(read(5_400), "90 minutes");
        assert_eq!(read(90), "90 seconds");
        assert_eq!(read(172_800), "2 days");
        assert_eq!(read(1), "second");
    }
}
