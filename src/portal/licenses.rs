//! Licenses: upload a license file (the checks and messages of `keygate import`), the list
//! with each license's version history, item details, the activation request, trusted
//! vendor keys.

use actix_multipart::Multipart;
use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use futures_util::StreamExt;

use super::auth::{Manager, PortalError, Session, Viewer};
use super::{Page, render, render_form};
use crate::appliance::same_secret;
use crate::licensing::import;
use crate::server::AppState;
use crate::store::licenses::{self, ItemRow, LicenseVersion};
use crate::store::{StoreError, ops};

/// License files and keys are small: anything larger is not one.
const UPLOAD_LIMIT: usize = 256 * 1024;

pub struct KeyView {
    pub kid: String,
    pub name: String,
    pub added: String,
}

#[derive(Template)]
#[template(path = "portal/licenses.html")]
struct LicensesPage {
    page: Page,
    manage: bool,
    versions: Vec<(LicenseVersion, String, String, bool)>,
    items: Vec<ItemRow>,
    keys: Vec<KeyView>,
    notice: Option<String>,
    error: Option<String>,
}

async fn page(
    state: &AppState,
    admin: &Session,
    notice: Option<String>,
    error: Option<String>,
) -> Result<HttpResponse, PortalError> {
    // The configuration's key files are read here too, off the async workers.
    let configured = state.config.trusted_vendor_keys.clone();
    let (versions, items, keys, configured) = state
        .store
        .read(move |conn| {
            Ok::<_, StoreError>((
                licenses::license_versions(conn)?,
                licenses::all_items(conn)?,
                licenses::trusted_keys(conn)?,
                configured
                    .iter()
                    .map(|path| config_key(path))
                    .collect::<Vec<_>>(),
            ))
        })
        .await?;
    let mut current = std::collections::HashSet::new();
    let versions = versions
        .into_iter()
        .map(|v| {
            let newest = current.insert(v.license_id.clone());
            let (issued, imported) = (super::utc(v.issued_at), super::utc(v.imported_at));
            (v, issued, imported, newest)
        })
        .collect();
    let refused = error.is_some();
    let response = render_form(
        &LicensesPage {
            manage: super::can_manage(admin),
            page: Page::of(admin),
            versions,
            items,
            keys: keys
                .into_iter()
                .map(|k| KeyView {
                    kid: k.kid,
                    name: k.name,
                    added: super::utc(k.added_at),
                })
                .chain(configured)
                .collect(),
            notice,
            error,
        },
        refused,
    );
    Ok(response)
}

/// A vendor key the configuration names, as the page lists it (one that cannot be read is
/// listed with why: imports fail until it is fixed).
fn config_key(path: &std::path::Path) -> KeyView {
    let (kid, name) = match import::config_key(path) {
        Ok(key) => (keygate_sdk::keys::kid(&key), path.display().to_string()),
        Err(why) => ("-".into(), why.to_string()),
    };
    KeyView {
        kid,
        name,
        added: "in the configuration".into(),
    }
}

pub async fn list(state: web::Data<AppState>, admin: Viewer) -> Result<HttpResponse, PortalError> {
    page(&state, &admin, None, None).await
}

/// Reads a multipart form of a CSRF token and one file, refusing oversized files.
async fn read_upload(form: Multipart, csrf: &str) -> Result<Vec<u8>, PortalError> {
    let mut files = read_files(form, csrf).await?;
    Ok(files.remove("file").unwrap_or_default())
}

/// Fields an upload form may have: the CSRF token and at most two files (a certificate and
/// its key).
const UPLOAD_FIELDS: usize = 3;

/// Why an upload could not be read, for the admin.
fn unreadable(e: actix_multipart::MultipartError) -> PortalError {
    let why = match &e {
        actix_multipart::MultipartError::Payload(p) => crate::body_rate::refusal(p),
        _ => None,
    };
    PortalError::BadForm(why.map_or_else(
        || format!("the upload could not be read: {e}"),
        str::to_string,
    ))
}

/// Reads a multipart form of a CSRF token and files (by field name), refusing oversized
/// files and forms with more fields than any portal form has (so that memory stays bounded
/// at `UPLOAD_FIELDS` × `UPLOAD_LIMIT` before the token is even checked).
pub async fn read_files(
    mut form: Multipart,
    csrf: &str,
) -> Result<std::collections::HashMap<String, Vec<u8>>, PortalError> {
    let (mut token, mut files) = (String::new(), std::collections::HashMap::new());
    let mut fields = 0;
    while let Some(field) = form.next().await {
        fields += 1;
        if fields > UPLOAD_FIELDS {
            return Err(PortalError::BadForm(
                "the form has more fields than expected".into(),
            ));
        }
        let mut field = field.map_err(unreadable)?;
        let name = field.name().unwrap_or("").to_string();
        let mut data = Vec::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(unreadable)?;
            if data.len() + chunk.len() > UPLOAD_LIMIT {
                return Err(PortalError::BadForm(format!(
                    "a file is larger than {} KiB, more than any license, certificate or key",
                    UPLOAD_LIMIT / 1024
                )));
            }
            data.extend_from_slice(&chunk);
        }
        if name == "csrf" {
            token = String::from_utf8_lossy(&data).into_owned();
        } else {
            files.insert(name, data);
        }
    }
    if !same_secret(&token, csrf) {
        return Err(PortalError::Csrf);
    }
    Ok(files)
}

/// `POST /licenses` (multipart: csrf, file): imports a license file.
pub async fn upload(
    state: web::Data<AppState>,
    admin: Manager,
    req: HttpRequest,
    form: Multipart,
) -> Result<HttpResponse, PortalError> {
    let file = match read_upload(form, &admin.csrf).await {
        Err(PortalError::BadForm(why)) => {
            let error = format!("The license was not imported: {why}.");
            return page(&state, &admin, None, Some(error)).await;
        }
        file => file?,
    };
    admin.recheck(&state).await?;
    let text = match String::from_utf8(file) {
        Ok(text) if !text.trim().is_empty() => text,
        refused => {
            let error = if refused.is_err() {
                "The license was not imported: the file is not UTF-8 text (a license file is \
                 one line of ASCII; was it saved in another encoding?)."
            } else {
                "Choose a license file (.lic) to upload."
            };
            return page(&state, &admin, None, Some(error.into())).await;
        }
    };
    let config_keys = state.config.trusted_vendor_keys.clone();
    let now = state.clock.now();
    let (actor, from) = (admin.name.clone(), super::client_address(&req));
    // Trusted keys, signature and content checks, then the import, in one transaction (a
    // key untrusted meanwhile is not trusted for it): the first refusal is the page's
    // message and nothing is changed.
    let appliance_key = *state.appliance.public_key();
    let outcome = state
        .store
        .write(move |conn| {
            let trusted = import::trusted_keys(conn, &config_keys)?;
            let verified = import::verify(&text, &trusted, &appliance_key)?;
            let outcome = import::apply(conn, &verified, now, None)?;
            let note = import::serving_note(&verified.license, now);
            if outcome.changed() {
                ops::audit(
                    conn,
                    now.unix_timestamp(),
                    &actor,
                    "license imported",
                    &verified.license.license_id,
                    &outcome.to_string(),
                    &from,
                )?;
            }
            Ok::<_, import::ImportError>((outcome, note))
        })
        .await;
    match outcome {
        Ok((outcome, note)) => {
            let note = note.map(|n| format!(" ({n})")).unwrap_or_default();
            page(&state, &admin, Some(format!("{outcome}{note}.")), None).await
        }
        Err(import::ImportError::Store(e)) => Err(e.into()),
        Err(e) => {
            page(
                &state,
                &admin,
                None,
                Some(format!("The license was not imported: {e}.")),
            )
            .await
        }
    }
}

/// `GET /licenses/activation-request`: the file IT sends to the vendor.
pub async fn activation_request(state: web::Data<AppState>, _admin: Viewer) -> HttpResponse {
    let text = state.appliance.activation_request_file(state.clock.now());
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .insert_header((
            header::CONTENT_DISPOSITION,
            format!(
                "attachment; filename=\"keygate-{}.request\"",
                state.appliance.installation_id()
            ),
        ))
        .body(text)
}

#[derive(Template)]
#[template(path = "portal/item.html")]
struct ItemPage {
    page: Page,
    item: ItemRow,
    handshake: String,
    starts: String,
    expires: String,
    /// Thresholds alerted, with when.
    alerts: Vec<(String, String)>,
    figures: super::dashboard::Figures,
}

/// `GET /licenses/items/{item_id}`: an item's terms and consumption (linked from alerts).
pub async fn item(
    state: web::Data<AppState>,
    admin: Viewer,
    path: web::Path<String>,
) -> Result<HttpResponse, PortalError> {
    let id = path.into_inner();
    let now = state.clock.now().unix_timestamp();
    let found = state
        .store
        .read(move |conn| {
            let Some(mut item) = licenses::item(conn, &id)? else {
                return Ok(None);
            };
            let last_window = super::dashboard::load_now(conn, &mut item, now)?;
            let handshake = licenses::handshake_by_id(conn, item.handshake_id)?
                .map(|h| h.code)
                .unwrap_or_default();
            let alerts = ops::alert_marks(conn, &item.item_id)?;
            let figures = super::dashboard::Figures::of(&item, now, last_window);
            Ok::<_, StoreError>(Some((item, figures, handshake, alerts)))
        })
        .await?;
    let Some((item, figures, handshake, alerts)) = found else {
        return Ok(super::message_page(
            StatusCode::NOT_FOUND,
            "No such license item.",
        ));
    };
    Ok(render(&ItemPage {
        page: Page::of(&admin),
        figures,
        starts: super::utc(item.terms.starts_at),
        expires: super::utc(item.terms.expires_at),
        item,
        handshake,
        alerts: alerts
            .into_iter()
            .map(|mark| match mark.sent_at {
                Some(sent) => (mark.key, format!("sent {}", super::utc(sent))),
                None => (
                    mark.key,
                    format!("found {}, not emailed yet", super::utc(mark.found_at)),
                ),
            })
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_the_configuration_names_are_listed_and_unusable_ones_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let key = keygate_sdk::keys::generate_signing_key().verifying_key();
        let path = dir.path().join("acme.pub");
        std::fs::write(&path, keygate_sdk::keys::public_key_to_pem(&key)).unwrap();
        let listed = config_key(&path);
        assert_eq!(listed.kid, keygate_sdk::keys::kid(&key));
        assert_eq!(listed.name, path.display().to_string());
        let missing = config_key(&dir.path().join("gone.pub"));
        assert_eq!(missing.kid, "-");
        assert!(
            missing.name.contains("gone.pub cannot be used"),
            "{}",
            missing.name
        );
    }
}
