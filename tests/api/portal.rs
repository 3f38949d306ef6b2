//! Issue 4 (foundation): setup, sign-in, sessions, CSRF, roles, rate limits, escaping,
//! security headers, the dashboard and the devices page, over real HTTPS.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use serde_json::json;
use time::Duration;

use crate::helpers::*;
use keygate::server::Passwords;

/// A minimal browser: keeps cookies, does not follow redirects.
struct Browser {
    agent: ureq::Agent,
    base: String,
    cookies: RefCell<BTreeMap<String, String>>,
}

struct Answer {
    status: u16,
    body: String,
    location: String,
    headers: Vec<(String, String)>,
}

impl Browser {
    fn new(app: &TestApp) -> Browser {
        let cert = ureq::tls::Certificate::from_pem(&appliance_cert(&app.data_dir))
            .unwrap()
            .to_owned();
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![cert])))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        Browser {
            agent,
            base: app.url(""),
            cookies: RefCell::new(BTreeMap::new()),
        }
    }

    /// The same session over new connections that trust the certificate the appliance
    /// serves now (its connections so far trusted the one it served then).
    fn trusting_the_new_certificate(self, app: &TestApp) -> Browser {
        let browser = Browser::new(app);
        *browser.cookies.borrow_mut() = self.cookies.into_inner();
        browser
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .borrow()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn keep(&self, mut response: ureq::http::Response<ureq::Body>) -> Answer {
        let headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        for (name, value) in &headers {
            if name == "set-cookie" {
                let pair = value.split(';').next().unwrap();
                let (k, v) = pair.split_once('=').unwrap();
                if v.is_empty() || value.contains("Max-Age=0") {
                    self.cookies.borrow_mut().remove(k);
                } else {
                    self.cookies
                        .borrow_mut()
                        .insert(k.to_string(), v.to_string());
                }
            }
        }
        let location = headers
            .iter()
            .find(|(k, _)| k == "location")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        Answer {
            status: response.status().as_u16(),
            body: response.body_mut().read_to_string().unwrap_or_default(),
            location,
            headers,
        }
    }

    fn get(&self, path: &str) -> Answer {
        let response = self
            .agent
            .get(&format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .call()
            .unwrap();
        self.keep(response)
    }

    fn post(&self, path: &str, fields: &[(&str, &str)]) -> Answer {
        let response = self
            .agent
            .post(&format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .send_form(fields.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self.keep(response)
    }
}

/// The value of the first hidden `csrf` field of a page.
fn csrf(body: &str) -> String {
    hidden(body, "csrf")
}

/// Posts `fields` to `/admins/{action}` as `browser` (an owner), with its CSRF token.
fn admins_post(browser: &Browser, action: &str, fields: &[(&str, &str)]) -> Answer {
    let token = csrf(&browser.get("/admins").body);
    let mut all = vec![("csrf", token.as_str())];
    all.extend_from_slice(fields);
    browser.post(&format!("/admins/{action}"), &all)
}

/// The value of the first hidden field `name` of a page.
fn hidden(body: &str, name: &str) -> String {
    let field = format!("name=\"{name}\" value=\"");
    let start = body.find(&field).expect("the hidden field") + field.len();
    body[start..]
        .split('"')
        .next()
        .unwrap()
        .replace("&amp;", "&")
}

fn setup_token(app: &TestApp) -> String {
    let conn = keygate::store::open(&app.data_dir.join("keygate.db")).unwrap();
    let path = keygate::portal::auth::setup_link(&conn, app.clock_now().unix_timestamp())
        .unwrap()
        .unwrap();
    path.trim_start_matches("/setup?token=").to_string()
}

const PASSWORD: &str = "correct horse battery";

/// A fixture whose first admin ("olivia", owner) is signed in.
fn signed_in(items: &str) -> (Fixture, Browser) {
    let f = Fixture::new(items);
    let token = setup_token(&f.app);
    let browser = Browser::new(&f.app);
    let page = browser.get(&format!("/setup?token={token}"));
    assert_eq!(page.status, 200);
    let answer = browser.post(
        "/setup",
        &[
            ("token", &token),
            ("name", "olivia"),
            ("password", PASSWORD),
            ("confirm", PASSWORD),
            ("csrf", &csrf(&page.body)),
        ],
    );
    assert_eq!(
        (answer.status, answer.location.as_str()),
        (303, "/"),
        "{}",
        answer.body
    );
    (f, browser)
}

fn sign_in(f: &Fixture, name: &str, password: &str) -> (Browser, Answer) {
    let browser = Browser::new(&f.app);
    let page = browser.get("/login");
    let answer = browser.post(
        "/login",
        &[
            ("name", name),
            ("password", password),
            ("csrf", &csrf(&page.body)),
        ],
    );
    (browser, answer)
}

#[test]
fn first_admin_setup_then_dashboard() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    f.authorized("reader", 1);
    let browser = Browser::new(&f.app);
    assert_eq!(
        browser.get("/").location,
        "/login",
        "signed out: sent to sign in"
    );
    assert_eq!(browser.get("/setup?token=wrong").status, 404);
    // Forms posted without their fields (not possible from the pages) get a page saying so.
    for (path, form) in [
        ("/setup", &[("name", "olivia")]),
        ("/login", &[("name", "olivia")]),
    ] {
        let answer = browser.post(path, form);
        assert_eq!(answer.status, 400, "{path}");
        assert!(
            answer.body.contains("<html") && answer.body.contains("The form could not be read"),
            "{path}: {}",
            answer.body
        );
    }

    let token = setup_token(&f.app);
    let page = browser.get(&format!("/setup?token={token}"));
    let form = csrf(&page.body);
    let answer = browser.post(
        "/setup",
        &[
            ("token", &token),
            ("name", "olivia"),
            ("password", PASSWORD),
            ("confirm", "something else!!"),
            ("csrf", &form),
        ],
    );
    assert_eq!(answer.status, 400);
    assert!(
        answer.body.contains("The two passwords differ")
            && answer.body.contains("value=\"olivia\""),
        "input kept, reason shown"
    );
    let answer = browser.post(
        "/setup",
        &[
            ("token", &token),
            ("name", "olivia"),
            ("password", "short"),
            ("confirm", "short"),
            ("csrf", &csrf(&answer.body)),
        ],
    );
    assert!(answer.body.contains("at least 12 characters"));
    let answer = browser.post(
        "/setup",
        &[
            ("token", &token),
            ("name", "olivia"),
            ("password", PASSWORD),
            ("confirm", PASSWORD),
            // The first page's form (another tab) still works after the refusals.
            ("csrf", &form),
        ],
    );
    assert_eq!((answer.status, answer.location.as_str()), (303, "/"));

    let dashboard = browser.get("/");
    assert_eq!(dashboard.status, 200);
    assert!(dashboard.body.contains("LIC-T-1") && dashboard.body.contains("per_device"));
    assert!(
        dashboard
            .body
            .contains(f.app.state.appliance.installation_id())
    );
    assert!(dashboard.body.contains("<svg class=\"chart\""));
    assert!(dashboard.body.contains("olivia</a> (owner)"));
    // The link is used up.
    assert_eq!(
        Browser::new(&f.app)
            .get(&format!("/setup?token={token}"))
            .status,
        404
    );
    // Security headers on every page, the stylesheet under its hashed URL.
    let header = |name: &str| {
        dashboard
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert!(header("content-security-policy").contains("frame-ancestors 'none'"));
    assert_eq!(header("referrer-policy"), "no-referrer");
    assert!(header("strict-transport-security").starts_with("max-age="));
    assert_eq!(
        header("cache-control"),
        "no-store",
        "no page in a browser's cache"
    );
    let css = keygate::portal::css_path();
    assert!(dashboard.body.contains(css));
    let stylesheet = browser.get(css);
    assert_eq!(stylesheet.status, 200);
    assert!(
        stylesheet
            .headers
            .iter()
            .any(|(k, v)| k == "cache-control" && v.contains("immutable")),
        "the stylesheet keeps its caching"
    );
}

#[test]
fn session_cookie_flags_and_sign_out_needs_csrf() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let (_, answer) = sign_in(&f, "olivia", PASSWORD);
    let cookie = answer
        .headers
        .iter()
        .find(|(k, v)| k == "set-cookie" && v.starts_with("__Host-keygate_session="))
        .unwrap()
        .1
        .clone();
    for flag in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    assert_eq!(browser.post("/logout", &[]).status, 403, "no token");
    assert_eq!(
        browser.post("/logout", &[("csrf", "forged")]).status,
        403,
        "wrong token"
    );
    assert_eq!(browser.get("/").status, 200, "still signed in");
    let token = csrf(&browser.get("/").body);
    assert_eq!(
        browser.post("/logout", &[("csrf", &token)]).location,
        "/login"
    );
    assert_eq!(browser.get("/").location, "/login");
    let (actor, from): (String, String) = f
        .db()
        .query_row(
            "SELECT actor, address FROM audit_log WHERE action = 'signed out'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((actor.as_str(), from.as_str()), ("olivia", "127.0.0.1"));
}

/// Signing in again from a browser ends the session its cookie held, at once: a shared
/// machine's next admin does not leave the previous one's session open until it idles out.
#[test]
fn a_new_sign_in_ends_the_session_the_browser_held() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let session = || browser.cookies.borrow()["__Host-keygate_session"].clone();
    let before = session();
    let page = browser.get("/login");
    let answer = browser.post(
        "/login",
        &[
            ("name", "olivia"),
            ("password", PASSWORD),
            ("csrf", &csrf(&page.body)),
        ],
    );
    assert_eq!(answer.location, "/", "{}", answer.body);
    assert_ne!(session(), before);
    assert_eq!(browser.get("/").status, 200);
    let old = Browser::new(&f.app);
    old.cookies
        .borrow_mut()
        .insert("__Host-keygate_session".into(), before);
    assert_eq!(old.get("/").location, "/login", "the earlier session ended");
    let sessions: i64 = f
        .db()
        .query_row("SELECT COUNT(*) FROM sessions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sessions, 1);
}

/// Any admin changes its own password, giving the current one; its other sessions end.
#[test]
fn an_admin_changes_its_own_password_and_its_other_sessions_end() {
    let (f, owner) = signed_in(&item("reader", "per_device", 10, ""));
    let token = csrf(&owner.get("/admins").body);
    owner.post(
        "/admins/create",
        &[
            ("csrf", &token),
            ("name", "aud"),
            ("role", "auditor"),
            ("password", PASSWORD),
        ],
    );
    let (browser, _) = sign_in(&f, "aud", PASSWORD);
    let (elsewhere, answer) = sign_in(&f, "aud", PASSWORD);
    assert_eq!(answer.location, "/");
    assert!(browser.get("/").body.contains("href=\"/account\""));
    let page = browser.get("/account");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Change your password"), "{}", page.body);
    let token = csrf(&page.body);
    let change = |current: &str, new: &str, confirm: &str| {
        browser.post(
            "/account/password",
            &[
                ("csrf", &token),
                ("current", current),
                ("password", new),
                ("confirm", confirm),
            ],
        )
    };
    let new = "a brand new passphrase";
    for (current, password, confirm, says) in [
        (
            "wrong password!",
            new,
            new,
            "The current password is wrong.",
        ),
        (
            PASSWORD,
            new,
            "a brand new passphrasf",
            "The two new passwords differ.",
        ),
        (PASSWORD, "short", "short", "at least 12 characters"),
    ] {
        let answer = change(current, password, confirm);
        assert_eq!(answer.status, 400, "{says}");
        assert!(answer.body.contains(says), "{says}: {}", answer.body);
        assert!(answer.body.contains("Nothing was changed."));
    }
    assert_eq!(
        browser
            .post(
                "/account/password",
                &[("current", PASSWORD), ("password", new), ("confirm", new)]
            )
            .status,
        403,
        "no CSRF token"
    );
    assert_eq!(elsewhere.get("/").status, 200, "nothing changed yet");
    assert_eq!(sign_in(&f, "aud", new).1.status, 401);

    let answer = change(PASSWORD, new, new);
    assert_eq!(
        (answer.status, answer.location.as_str()),
        (303, "/account?changed"),
        "{}",
        answer.body
    );
    assert!(
        browser
            .get(&answer.location)
            .body
            .contains("Your password was changed")
    );
    assert_eq!(browser.get("/").status, 200, "this browser stays signed in");
    assert_eq!(
        elsewhere.get("/").location,
        "/login",
        "the other session ended"
    );
    assert_eq!(sign_in(&f, "aud", PASSWORD).1.status, 401, "old password");
    assert_eq!(sign_in(&f, "aud", new).1.location, "/", "new password");
    let audited = |action: &str| -> i64 {
        f.db()
            .query_row(
                "SELECT COUNT(*) FROM audit_log WHERE action = ?1 AND actor = 'aud'",
                [action],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(
        (
            audited("password changed"),
            audited("password change refused (wrong current password)")
        ),
        (1, 1)
    );
}

/// Guessing the current password from a session left open meets the sign-in's limit.
#[test]
fn guessing_the_current_password_is_rate_limited() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let token = csrf(&browser.get("/account").body);
    let change = |current: &str| {
        browser.post(
            "/account/password",
            &[
                ("csrf", &token),
                ("current", current),
                ("password", "a brand new passphrase"),
                ("confirm", "a brand new passphrase"),
            ],
        )
    };
    for attempt in 1..=5 {
        assert!(
            change("wrong password!")
                .body
                .contains("The current password is wrong."),
            "attempt {attempt}"
        );
    }
    assert!(
        change(PASSWORD).body.contains("Too many wrong passwords"),
        "even the right password waits"
    );
    f.app.clock.advance(Duration::minutes(1));
    assert_eq!(change(PASSWORD).status, 303);
}

/// Holds `slots` of the Argon2 slots for `whose` passwords until the returned senders drop.
fn hold_argon2(
    state: &actix_web::web::Data<keygate::server::AppState>,
    whose: Passwords,
    slots: usize,
) -> Vec<std::sync::mpsc::Sender<()>> {
    let (held, started) = std::sync::mpsc::channel();
    let holds = (0..slots)
        .map(|_| {
            let (state, held) = (state.clone(), held.clone());
            let (release, wait) = std::sync::mpsc::channel::<()>();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                runtime.block_on(state.argon2(whose, move || {
                    held.send(()).unwrap();
                    let _ = wait.recv();
                }));
            });
            release
        })
        .collect();
    for _ in 0..slots {
        started.recv().unwrap();
    }
    holds
}

/// Whether a thread ends within `seconds`.
fn ends_within<T>(thread: &std::thread::ScopedJoinHandle<'_, T>, seconds: u64) -> bool {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !thread.is_finished() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    thread.is_finished()
}

/// An Argon2 run keeps its slot until it ends, even when the request that started it is
/// dropped (its client gone): requests reset once their password check started cannot run
/// more checks at once (19 MiB each) than there are slots.
#[test]
fn an_argon2_run_keeps_its_slot_after_its_request_is_dropped() {
    let (f, _) = signed_in(&item("reader", "per_device", 10, ""));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let (started, running) = std::sync::mpsc::channel();
    let mut releases = Vec::new();
    for _ in 0..2 {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        releases.push(release);
        let started = started.clone();
        let check = f.app.state.argon2(Passwords::Devices, move || {
            started.send(()).unwrap();
            let _ = wait.recv();
        });
        // Polled once (the check starts on the blocking pool), then dropped.
        let dropped = runtime
            .block_on(async { tokio::time::timeout(StdDuration::from_millis(1), check).await });
        assert!(dropped.is_err(), "the check runs until released");
        running.recv_timeout(StdDuration::from_secs(30)).unwrap();
    }
    let third = |seconds| {
        runtime.block_on(async {
            let check = f.app.state.argon2(Passwords::Devices, || ());
            tokio::time::timeout(StdDuration::from_secs(seconds), check).await
        })
    };
    assert!(
        third(1).is_err(),
        "a third check ran beside the two of dropped requests"
    );
    drop(releases);
    assert_eq!(third(30), Ok(Some(())));
}

/// An admin deleted or demoted while a request of theirs waited (here for the Argon2 slot
/// a password needs) changes nothing when it goes on: an owner deleted meanwhile made a new
/// owner, a manager made an auditor set a handshake code's session password.
#[test]
fn an_admin_deleted_or_demoted_meanwhile_changes_nothing() {
    let (f, olivia) = signed_in(&item("reader", "per_device", 10, ""));
    let post = admins_post;
    // A new admin `name` with `role` posts `fields` to `path`, which waits for the Argon2
    // slot; meanwhile olivia does `change` (an action of /admins) to that admin, saying
    // `done`. The post, going on, is refused.
    type Posted<'a> = (&'a str, &'a [(&'a str, &'a str)]);
    let refused_after =
        |name: &str, role: &str, (path, fields): Posted<'_>, change: Posted<'_>, done: &str| {
            let created = post(
                &olivia,
                "create",
                &[("name", name), ("role", role), ("password", PASSWORD)],
            );
            assert!(
                created.body.contains(&format!("Admin {name} created")),
                "{}",
                created.body
            );
            let (admin, _) = sign_in(&f, name, PASSWORD);
            let token = csrf(&admin.get("/").body);
            let mut all = vec![("csrf", token.as_str())];
            all.extend_from_slice(fields);
            std::thread::scope(|s| {
                let busy = hold_argon2(&f.app.state, Passwords::Portal, 1);
                let request = s.spawn(move || admin.post(path, &all));
                assert!(!ends_within(&request, 1), "the request waits for the slot");
                let changed = post(&olivia, change.0, change.1);
                assert!(changed.body.contains(done), "{}", changed.body);
                drop(busy);
                let answer = request.join().unwrap();
                assert!(
                    answer
                        .body
                        .contains("Your account no longer has the role this needs"),
                    "{}",
                    answer.body
                );
            });
        };
    refused_after(
        "bob",
        "owner",
        (
            "/admins/create",
            &[
                ("name", "mallory"),
                ("role", "owner"),
                ("password", PASSWORD),
            ],
        ),
        ("delete", &[("name", "bob")]),
        "Admin bob deleted",
    );
    assert!(!olivia.get("/admins").body.contains("mallory"));
    refused_after(
        "max",
        "manager",
        (
            "/handshakes/password",
            &[
                ("code", f.code.as_str()),
                ("password", "a session password"),
            ],
        ),
        ("role", &[("name", "max"), ("role", "auditor")]),
        "max is now auditor",
    );
    assert_eq!(
        f.authorize(&f.request("reader", 1)).0,
        200,
        "no session password was set"
    );
}

/// Admins' and devices' passwords have Argon2 slots of their own: with every slot of one
/// kind busy (a flood of guesses), the other kind is still checked at once.
#[test]
fn argon2_for_admins_and_for_devices_never_wait_for_each_other() {
    let (f, _) = signed_in(&item("reader", "per_device", 10, ""));
    let with_password = |password: &str| {
        assert!(set_password(&f.data, &f.code, password).ok);
        let mut request = f.request("reader", 1);
        request["session_password"] = json!(password);
        request
    };
    let request = with_password("open sesame");
    std::thread::scope(|s| {
        let devices_busy = hold_argon2(&f.app.state, Passwords::Devices, 2);
        let device = s.spawn(|| f.authorize(&request).0);
        let admin = s.spawn(|| sign_in(&f, "olivia", PASSWORD).1.location);
        assert!(ends_within(&admin, 30), "a sign-in waited for devices");
        assert!(!ends_within(&device, 1), "devices have two slots");
        drop(devices_busy);
        assert_eq!(admin.join().unwrap(), "/");
        assert_eq!(device.join().unwrap(), 200);
    });
    let request = with_password("another sesame");
    std::thread::scope(|s| {
        let portal_busy = hold_argon2(&f.app.state, Passwords::Portal, 1);
        let admin = s.spawn(|| sign_in(&f, "olivia", PASSWORD).1.location);
        let device = s.spawn(|| f.authorize(&request).0);
        assert!(ends_within(&device, 30), "a device waited for the portal");
        assert!(!ends_within(&admin, 1), "the portal has one slot");
        drop(portal_busy);
        assert_eq!(device.join().unwrap(), 200);
        assert_eq!(admin.join().unwrap(), "/");
    });
}

#[test]
fn sessions_expire_when_idle_and_after_twelve_hours() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    f.app.clock.advance(Duration::minutes(29));
    assert_eq!(browser.get("/").status, 200);
    f.app.clock.advance(Duration::minutes(31));
    assert_eq!(browser.get("/").location, "/login", "30 minutes idle");

    let (browser, _) = sign_in(&f, "olivia", PASSWORD);
    for _ in 0..(12 * 3) {
        assert_eq!(browser.get("/").status, 200);
        f.app.clock.advance(Duration::minutes(20));
    }
    assert_eq!(browser.get("/").location, "/login", "12 hours in all");
}

/// Keeping a session's activity is housekeeping: when the database refuses the write (a
/// full disk; here a trigger refuses it) the portal stays readable, and an idle session still
/// ends.
#[test]
fn a_session_whose_activity_cannot_be_written_still_reads_the_portal() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    f.db()
        .execute_batch(
            "CREATE TRIGGER full_disk BEFORE UPDATE ON sessions \
             BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END; \
             CREATE TRIGGER full_disk_delete BEFORE DELETE ON sessions \
             BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
        )
        .unwrap();
    f.app.clock.advance(Duration::minutes(2));
    assert_eq!(browser.get("/").status, 200);
    assert_eq!(browser.get("/devices").status, 200);
    f.app.clock.advance(Duration::minutes(31));
    assert_eq!(browser.get("/").location, "/login", "30 minutes idle");
}

/// A sign-in refused in one tab leaves the sign-in form open in another tab working.
#[test]
fn a_failed_sign_in_leaves_another_tab_signing_in() {
    let (f, _) = signed_in(&item("reader", "per_device", 10, ""));
    let browser = Browser::new(&f.app);
    let (tab_a, tab_b) = (
        csrf(&browser.get("/login").body),
        csrf(&browser.get("/login").body),
    );
    let sign_in = |password: &str, token: &str| {
        browser.post(
            "/login",
            &[("name", "olivia"), ("password", password), ("csrf", token)],
        )
    };
    assert_eq!(sign_in("wrong password!", &tab_a).status, 401);
    let answer = sign_in(PASSWORD, &tab_b);
    assert_eq!(
        (answer.status, answer.location.as_str()),
        (303, "/"),
        "{}",
        answer.body
    );
}

#[test]
fn sign_in_is_rate_limited_and_audited() {
    let (f, _) = signed_in(&item("reader", "per_device", 10, ""));
    for attempt in 1..=5 {
        let (_, answer) = sign_in(&f, "olivia", "wrong password!");
        assert_eq!(answer.status, 401, "attempt {attempt}");
        assert!(answer.body.contains("Wrong name or password"));
    }
    let (_, answer) = sign_in(&f, "olivia", PASSWORD);
    assert!(
        answer.body.contains("Too many failed sign-ins"),
        "even the right password waits"
    );
    f.app.clock.advance(Duration::minutes(1));
    assert_eq!(sign_in(&f, "olivia", PASSWORD).1.location, "/");
    let count = |action: &str| -> i64 {
        f.db()
            .query_row(
                "SELECT COUNT(*) FROM audit_log WHERE action = ?1",
                [action],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(
        (
            count("sign-in failed"),
            count("sign-in refused (rate limited)")
        ),
        (5, 1)
    );
    // A name no admin can have (a bidirectional mark would garble the audit log's line) is
    // refused as a wrong name, before any record.
    let (_, answer) = sign_in(&f, "oli\u{202E}via", "wrong password!");
    assert_eq!(answer.status, 401);
    assert!(answer.body.contains("Wrong name or password"));
    assert_eq!(count("sign-in failed"), 5);
}

/// A password typed into the name box is not written into the audit log, which every role
/// reads: a sign-in with a name no admin has is recorded as such, its address kept.
#[test]
fn a_sign_in_with_an_unknown_name_does_not_record_what_was_typed() {
    let (f, _) = signed_in(&item("reader", "per_device", 10, ""));
    let typed = "Tr0ub4dor&3-horse";
    for _ in 0..6 {
        assert_eq!(sign_in(&f, typed, "wrong password!").1.status, 401);
    }
    let actors: Vec<(String, String)> = f
        .db()
        .prepare("SELECT actor, action FROM audit_log WHERE action LIKE 'sign-in%' ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let unknown = "(unknown name)".to_string();
    assert_eq!(
        actors,
        [
            vec![(unknown.clone(), "sign-in failed".to_string()); 5],
            vec![(unknown, "sign-in refused (rate limited)".to_string())]
        ]
        .concat()
    );
    let dump: String = f
        .db()
        .query_row(
            "SELECT group_concat(actor || target || detail || address, '') FROM audit_log",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!dump.contains(typed), "{dump}");
}

/// The audit log's own actors (the scheduled jobs, the console) are no admin's name.
#[test]
fn no_admin_takes_the_name_of_the_audit_logs_own_actors() {
    let (f, owner) = signed_in(&item("reader", "per_device", 10, ""));
    for name in ["system", "CLI"] {
        let refused = set_password_for_admin(&f, name, "manager");
        assert!(
            !refused.ok && refused.stderr.contains("the audit log's own"),
            "{}",
            refused.stderr
        );
    }
    let answer = admins_post(
        &owner,
        "create",
        &[
            ("name", "System"),
            ("role", "manager"),
            ("password", PASSWORD),
        ],
    );
    assert!(answer.body.contains("the audit log"), "{}", answer.body);
    let admins: i64 = f
        .db()
        .query_row("SELECT COUNT(*) FROM admins", [], |r| r.get(0))
        .unwrap();
    assert_eq!(admins, 1);
}

#[test]
fn auditors_see_but_cannot_change() {
    let (f, owner) = signed_in(&item("reader", "per_device", 10, ""));
    f.authorized("reader", 1);
    assert!(set_password_for_admin(&f, "audrey", "auditor").ok);
    let (auditor, answer) = sign_in(&f, "audrey", PASSWORD);
    assert_eq!(answer.location, "/");
    let page = auditor.get("/devices");
    assert_eq!(page.status, 200);
    assert!(page.body.contains(&device_uuid(1)));
    assert!(!page.body.contains("/block\""), "no forms for auditors");
    // What the forms set is shown to them too.
    let codes = auditor.get("/handshakes").body;
    assert!(
        codes.contains("<strong id=\"public-trial\">off</strong>"),
        "{codes}"
    );
    assert!(
        codes.contains(&f.code) && !codes.contains("/handshakes/trial"),
        "{codes}"
    );
    let token = csrf(&page.body);
    let answer = auditor.post(
        &format!("/devices/{}/block", device_uuid(1)),
        &[("csrf", &token)],
    );
    assert_eq!(answer.status, 403);
    assert_eq!(f.authorize(&f.request("reader", 1)).0, 200, "not blocked");

    let page = owner.get("/devices");
    let answer = owner.post(
        &format!("/devices/{}/block", device_uuid(1)),
        &[("csrf", &csrf(&page.body))],
    );
    assert_eq!(answer.location, "/devices");
    assert_eq!(f.refused("reader", 1), "DEVICE_BLOCKED");
    // An action taken from a searched, filtered page comes back to it; never elsewhere.
    let searched = "/devices?q=&item=LIC-T-1&blocked=1";
    let page = owner.get(searched);
    assert!(
        page.body
            .contains("name=\"back\" value=\"/devices?q=&#38;item=LIC-T-1&#38;blocked=1\""),
        "{}",
        page.body
    );
    let unblock = format!("/devices/{}/unblock", device_uuid(1));
    let token = csrf(&page.body);
    let answer = owner.post(&unblock, &[("csrf", &token), ("back", searched)]);
    assert_eq!(answer.location, searched);
    let answer = owner.post(
        &unblock,
        &[("csrf", &token), ("back", "https://evil.example/")],
    );
    assert_eq!(answer.location, "/devices");
    // A page address no Location header can carry goes back to the list too.
    let answer = owner.post(&unblock, &[("csrf", &token), ("back", "/devices\u{0}")]);
    assert_eq!((answer.status, answer.location.as_str()), (303, "/devices"));
    let answer = owner.post(
        &format!("/devices/{}/block", device_uuid(1)),
        &[("csrf", &token)],
    );
    assert_eq!(answer.location, "/devices");
    let blocked: i64 = f
        .db()
        .query_row(
            "SELECT COUNT(*) FROM audit_log WHERE action = 'device blocked' AND actor = 'olivia'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(blocked, 2, "blocked, unblocked twice, blocked again");
}

/// A device removed and authorized again within the same 3-minute window counts once in
/// it: removing it took it out of the window, so no false exception is recorded.
#[test]
fn a_removed_device_back_in_the_same_window_counts_once() {
    let (f, owner) = signed_in(&item(
        "viewer",
        "concurrent_device",
        1,
        "max_exceptions = 5",
    ));
    f.authorized("viewer", 1);
    let page = owner.get("/devices");
    let answer = owner.post(
        &format!("/devices/{}/remove", device_uuid(1)),
        &[("csrf", &csrf(&page.body))],
    );
    assert_eq!(answer.location, "/devices");
    assert_eq!(
        f.authorized("viewer", 1).state,
        keygate_sdk::wire::AuthorizationState::Ok,
        "one device active in the window, quota 1"
    );
    assert_eq!(f.item_value("LIC-T-1", "exceptions"), 0);
}

fn set_password_for_admin(f: &Fixture, name: &str, role: &str) -> Run {
    use std::io::Write;
    let mut child = command()
        .arg("--data-dir")
        .arg(&f.data)
        .args(["admin", "create", name, "--role", role])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    child.wait_with_output().unwrap().into()
}

/// The first admin manages the others: one made at the console with another role would
/// use up the setup link and leave the appliance with no owner. `admin setup-link` prints
/// the one-time link at the console.
#[test]
fn the_first_admin_made_at_the_console_must_be_an_owner() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    let token = setup_token(&f.app);
    for role in ["manager", "auditor"] {
        let refused = set_password_for_admin(&f, "ops", role);
        assert!(!refused.ok, "{role}");
        assert!(
            refused.stderr.contains("the first admin must be an owner"),
            "{}",
            refused.stderr
        );
    }
    let setup = Browser::new(&f.app).get(&format!("/setup?token={token}"));
    assert_eq!(setup.status, 200, "the setup link still works");
    // At the console of a service (whose log never shows one), a link is asked for.
    let printed = keygate(&f.data, &["admin", "setup-link"]);
    assert!(printed.ok, "{}", printed.stderr);
    let token = printed.stdout.split("/setup?token=").nth(1).unwrap();
    let path = format!("/setup?token={}", token.split_whitespace().next().unwrap());
    assert_eq!(Browser::new(&f.app).get(&path).status, 200, "{path}");
    assert!(set_password_for_admin(&f, "olivia", "owner").ok);
    assert!(set_password_for_admin(&f, "ops", "manager").ok);
    let refused = keygate(&f.data, &["admin", "setup-link"]);
    assert!(!refused.ok && refused.stderr.contains("an admin exists already"));
    assert_eq!(Browser::new(&f.app).get(&path).status, 404, "used up");
    // The console's admin changes are audited as the portal's are (`admin <action>`).
    let reset = command()
        .arg("--data-dir")
        .arg(&f.data)
        .args(["admin", "reset-password", "olivia"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        writeln!(reset.stdin.as_ref().unwrap(), "{PASSWORD}").unwrap();
    }
    assert!(reset.wait_with_output().unwrap().status.success());
    let actions: Vec<(String, String)> = rusqlite::Connection::open(f.data.join("keygate.db"))
        .unwrap()
        .prepare("SELECT action, target FROM audit_log WHERE actor = 'cli' AND action LIKE 'admin %' ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let expected = [
        ("admin create", "olivia"),
        ("admin create", "ops"),
        ("admin password", "olivia"),
    ]
    .map(|(action, target)| (action.to_string(), target.to_string()));
    assert_eq!(actions, expected);
}

#[test]
fn hostile_input_is_shown_escaped_and_long_input_refused() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let mut request = f.request("reader", 1);
    request["device"]["name"] = json!("<script>alert('x')</script>\"quoted\"");
    assert_eq!(f.authorize(&request).0, 200);
    let page = browser.get("/devices?q=%3Cscript%3E");
    assert!(
        page.body
            .contains("&#60;script&#62;alert(&#39;x&#39;)&#60;/script&#62;&#34;quoted&#34;"),
        "{}",
        page.body
    );
    assert!(!page.body.contains("<script>"));
    let page = browser.get("/devices?q=%22%3E%3Cscript%3E");
    assert!(
        !page.body.contains("\"><script>"),
        "the search box value is escaped"
    );
    let (_, answer) = sign_in(&f, &format!("<b>{}</b>", "x".repeat(5000)), "whatever");
    assert_eq!(answer.status, 401);
    assert!(!answer.body.contains("<b>x"));
    request["device"]["name"] = json!("n".repeat(300));
    assert_eq!(
        f.authorize(&request).1["error"]["code"],
        "BAD_REQUEST",
        "names past 256 characters are refused"
    );
}

#[test]
fn devices_page_searches_and_pages_by_key() {
    let (f, browser) = signed_in(&item("reader", "per_device", 200, ""));
    for n in 1..=60 {
        let mut request = f.request("reader", n);
        request["device"]["name"] = json!(format!("line-{n:02}"));
        request["device"]["user"] = json!(if n % 2 == 0 { "alice" } else { "bob" });
        assert_eq!(f.authorize(&request).0, 200);
    }
    let first = browser.get("/devices");
    assert_eq!(first.body.matches("<code>").count(), 50);
    let next = first
        .body
        .split("after=")
        .nth(1)
        .unwrap()
        .split(['&', '"'])
        .next()
        .unwrap()
        .to_string();
    let second = browser.get(&format!("/devices?after={next}"));
    assert_eq!(second.body.matches("<code>").count(), 10);
    assert!(!second.body.contains("Next page"));
    assert_eq!(
        browser
            .get("/devices?q=alice")
            .body
            .matches("<code>")
            .count(),
        30
    );
    assert_eq!(
        browser
            .get("/devices?q=line-1")
            .body
            .matches("<code>")
            .count(),
        10
    );
    let one = browser.get(&format!("/devices?q={}", device_uuid(7).to_uppercase()));
    assert_eq!(one.body.matches("<code>").count(), 1);
}

impl Browser {
    /// Posts a multipart form with a CSRF token and one file (field `file`).
    fn upload(&self, path: &str, csrf: &str, file: &[u8]) -> Answer {
        self.upload_files(path, csrf, &[("file", file)])
    }
}

#[test]
fn licenses_are_uploaded_with_the_import_checks() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let page = browser.get("/licenses");
    assert!(page.body.contains("LIC-T") && page.body.contains("current"));
    let token = csrf(&page.body);

    let renewal = items_file("LIC-T", &item("reader", "per_device", 50, ""));
    let file = std::fs::read(
        f.vendor
            .issue_file(&f.data, &renewal, &["--version", "2"], "v2.lic"),
    )
    .unwrap();
    let db = f.data.join("keygate.db");
    let before = db_digest(&db);
    let mut tampered = file.clone();
    let at = tampered.len() - 30;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let answer = browser.upload("/licenses", &token, &tampered);
    assert_eq!(answer.status, 400);
    assert!(
        answer.body.contains("The license was not imported"),
        "{}",
        answer.body
    );
    assert_eq!(db_digest(&db), before, "a refused file changes nothing");
    assert_eq!(
        browser.upload("/licenses", "forged", &file).status,
        403,
        "CSRF"
    );

    let answer = browser.upload("/licenses", &token, &file);
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        answer
            .body
            .contains("license LIC-T version 2 supersedes version 1"),
        "{}",
        answer.body
    );
    assert!(
        answer.body.contains("superseded"),
        "the history shows version 1"
    );
    assert_eq!(f.item_value("LIC-T-1", "quota"), 50);
    // The same file again changes nothing, not even the audit log.
    let before = db_digest(&db);
    let answer = browser.upload("/licenses", &token, &file);
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.body.contains("already imported"), "{}", answer.body);
    assert_eq!(db_digest(&db), before);
    // A file saved as UTF-16 (Windows PowerShell 5's default) is named as such.
    let utf16: Vec<u8> = [0xFF, 0xFE]
        .into_iter()
        .chain(
            String::from_utf8(file.clone())
                .unwrap()
                .encode_utf16()
                .flat_map(u16::to_le_bytes),
        )
        .collect();
    let answer = browser.upload("/licenses", &token, &utf16);
    assert!(answer.body.contains("not UTF-8 text"), "{}", answer.body);
    assert_eq!(db_digest(&db), before);

    assert!(set_password_for_admin(&f, "audrey", "auditor").ok);
    let (auditor, _) = sign_in(&f, "audrey", PASSWORD);
    let page = auditor.get("/licenses");
    assert!(
        !page.body.contains("enctype=\"multipart/form-data\""),
        "no upload form for auditors"
    );
    assert_eq!(
        auditor.upload("/licenses", &csrf(&page.body), &file).status,
        403
    );

    let request = browser.get("/licenses/activation-request");
    let parsed = keygate::vendor::read_activation_request(&request.body).unwrap();
    assert_eq!(
        parsed.installation_id,
        f.app.state.appliance.installation_id()
    );
    let item = browser.get("/licenses/items/LIC-T-1");
    assert!(item.body.contains("per_device") && item.body.contains(&f.code));
    assert_eq!(browser.get("/licenses/items/NOPE").status, 404);

    // Vendor keys are trusted at the console only (the specification: "config file or
    // `keygate trust`, nothing else"): even the owner cannot add one from the portal.
    let page = browser.get("/licenses");
    assert!(page.body.contains("keygate trust VENDOR.pub"));
    let other = Vendor::new();
    let before = db_digest(&f.data.join("keygate.db"));
    let answer = browser.upload(
        "/licenses/keys",
        &csrf(&page.body),
        &std::fs::read(other.pub_path()).unwrap(),
    );
    assert_eq!(answer.status, 404);
    assert_eq!(db_digest(&f.data.join("keygate.db")), before);

    // A form with more fields than any upload form has is refused before it is kept.
    let filler = vec![b'x'; 200 * 1024];
    let fields: Vec<(String, &[u8])> = (0..8).map(|n| (format!("f{n}"), &filler[..])).collect();
    let fields: Vec<(&str, &[u8])> = fields.iter().map(|(n, d)| (n.as_str(), *d)).collect();
    let answer = browser.upload_files("/licenses", &csrf(&page.body), &fields);
    assert_eq!(answer.status, 400);
    assert!(
        answer.body.contains("more fields than expected"),
        "{}",
        answer.body
    );
    assert_eq!(db_digest(&f.data.join("keygate.db")), before);
    // A file larger than any license: the license page says so, with its upload form.
    let answer = browser.upload("/licenses", &csrf(&page.body), &vec![b'x'; 300 * 1024]);
    assert_eq!(answer.status, 400);
    assert!(
        answer.body.contains(
            "The license was not imported: a file is larger than 256 KiB, more than any license"
        ) && answer.body.contains("enctype=\"multipart/form-data\""),
        "{}",
        answer.body
    );
    assert_eq!(db_digest(&f.data.join("keygate.db")), before);
}

#[test]
fn alert_settings_are_checked_and_a_test_email_reports_the_server_answer() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let sink = SmtpSink::start();
    let page = browser.get("/alerts");
    let token = csrf(&page.body);
    let answer = browser.post(
        "/alerts/recipients",
        &[
            ("csrf", &token),
            ("recipients", "it@plant.test; not an address"),
        ],
    );
    assert_eq!(answer.status, 400);
    assert!(
        answer
            .body
            .contains("&#34;not an address&#34; is not a valid email address; nothing was saved"),
        "{}",
        answer.body
    );
    assert!(
        answer
            .body
            .contains("value=\"it@plant.test; not an address\""),
        "the input is kept"
    );
    assert_eq!(
        keygate::store::settings::get(&f.db(), "alert_recipients").unwrap(),
        None
    );
    // A signed-in form posted without its field: the portal's page, the reason said once.
    let answer = browser.post("/alerts/recipients", &[("csrf", &token)]);
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.body.matches("could not be read").count(),
        1,
        "{}",
        answer.body
    );
    assert!(answer.body.contains("missing field"), "{}", answer.body);
    let answer = browser.post(
        "/alerts/recipients",
        &[
            ("csrf", &token),
            ("recipients", "it@plant.test;boss@plant.test; IT@plant.test"),
        ],
    );
    assert!(answer.body.contains("Alert recipients saved (2)"));
    assert_eq!(
        keygate::store::settings::get(&f.db(), "alert_recipients").unwrap(),
        Some("it@plant.test;boss@plant.test".to_string()),
        "an address listed twice gets each alert once"
    );

    let port = sink.port.to_string();
    let smtp = |port: &str, action: &str| {
        browser.post(
            "/alerts/smtp",
            &[
                ("csrf", &token),
                ("host", "127.0.0.1"),
                ("port", port),
                ("tls", "none"),
                ("user", ""),
                ("password", ""),
                ("from", "keygate@plant.test"),
                ("action", action),
            ],
        )
    };
    let answer = smtp("99999", "save");
    assert_eq!(answer.status, 400);
    assert!(
        answer
            .body
            .contains("The port must be a number from 1 to 65535")
    );
    // The test uses the settings as typed, before they are saved, and saves nothing.
    let answer = smtp(&port, "test");
    assert!(
        answer.body.contains(
            "The SMTP server accepted the test email: Message accepted for delivery. These \
             settings are not saved yet"
        ),
        "{}",
        answer.body
    );
    assert!(
        answer.body.contains(&format!("value=\"{port}\"")),
        "the typed port stays"
    );
    assert!(
        keygate::alerts::mail::load_settings(&f.db())
            .unwrap()
            .is_none()
    );
    assert_eq!(
        f.audited("SMTP test email"),
        [(
            "SMTP test email".to_string(),
            format!("127.0.0.1:{port}"),
            "none, accepted".to_string()
        )],
        "where the appliance was made to connect is on record"
    );
    assert_eq!(
        sink.wait_for(1, std::time::Duration::from_secs(10)).len(),
        1
    );
    assert!(smtp(&port, "save").body.contains("SMTP server saved"));
    let answer = smtp(&port, "test");
    assert!(
        answer
            .body
            .contains("The SMTP server accepted the test email: Message accepted for delivery.")
            && !answer.body.contains("not saved yet"),
        "{}",
        answer.body
    );
    assert_eq!(
        sink.wait_for(2, std::time::Duration::from_secs(10)).len(),
        2
    );

    f.app.run_job("housekeeping").unwrap();
    let page = browser.get("/alerts");
    assert!(
        page.body.contains("housekeeping") && page.body.contains("freed 0 seat(s)"),
        "job runs are shown"
    );
    let audit = browser.get("/audit?action=SMTP+server+set");
    assert!(audit.body.contains("127.0.0.1:") && audit.body.contains("olivia"));
    assert!(!audit.body.contains("alert recipients set"), "filtered");
    assert!(browser.get("/audit").body.contains("first admin created"));

    // A stored SMTP password goes only to the server it was given for.
    let save = |host: &str, tls: &str, password: &str| {
        browser.post(
            "/alerts/smtp",
            &[
                ("csrf", &token),
                ("host", host),
                ("port", "587"),
                ("tls", tls),
                ("user", "alerts"),
                ("password", password),
                ("from", "keygate@plant.test"),
                ("action", "save"),
            ],
        )
    };
    let stored = || {
        keygate::alerts::mail::load_settings(&f.db())
            .unwrap()
            .unwrap()
            .password
    };
    assert!(
        save("mail.plant.test", "starttls", "mail-secret-1")
            .body
            .contains("SMTP server saved")
    );
    assert!(
        save("mail.plant.test", "starttls", "")
            .body
            .contains("SMTP server saved")
    );
    assert_eq!(
        stored().as_deref(),
        Some("mail-secret-1"),
        "kept for the same server"
    );
    let answer = save("mail.plant.test", "none", "mail-secret-1");
    assert_eq!(answer.status, 400, "never in clear text");
    assert_eq!(stored().as_deref(), Some("mail-secret-1"));
    let answer = save("mail.plant.test:587", "starttls", "");
    assert_eq!(answer.status, 400, "a port in the host field");
    assert!(answer.body.contains("the port goes in its own field"));
    assert_eq!(stored().as_deref(), Some("mail-secret-1"));
    assert!(
        save("elsewhere.example", "starttls", "")
            .body
            .contains("The stored password was removed because the server changed")
    );
    assert_eq!(stored(), None, "dropped when the server changes");
}

/// The same CA certificate set at the console from a file (LF, a final newline) and saved
/// back from the portal's textarea (CRLF, trimmed) is the same server: the stored SMTP
/// password stays, whichever side saves last.
#[test]
fn an_smtp_password_stays_when_console_and_portal_save_the_same_server() {
    use std::io::Write;
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ca = rcgen::CertificateParams::new(vec!["mail.plant.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .pem();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let console = |password: Option<&str>| -> Run {
        let mut child = command()
            .arg("--data-dir")
            .arg(&f.data)
            .args([
                "alerts",
                "smtp",
                "--host",
                "mail.plant.test",
                "--user",
                "alerts",
            ])
            .arg("--ca")
            .arg(&ca_file)
            .args(password.map(|_| "--password-stdin"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if let Some(password) = password {
            writeln!(stdin, "{password}").unwrap();
        }
        drop(stdin);
        child.wait_with_output().unwrap().into()
    };
    let run = keygate(
        &f.data,
        &["alerts", "smtp", "--host", "mail.plant.test", "--port", "0"],
    );
    assert!(!run.ok && run.stderr.contains("--port"), "{}", run.stderr);
    assert!(
        keygate::alerts::mail::load_settings(&f.db())
            .unwrap()
            .is_none(),
        "port 0 refused at the console as in the portal, nothing saved"
    );
    let run = console(Some("relay secret"));
    assert!(run.ok, "{}", run.stderr);
    let stored = || {
        keygate::alerts::mail::load_settings(&f.db())
            .unwrap()
            .unwrap()
            .password
    };

    let page = browser.get("/alerts");
    let shown = page.body.split("<textarea name=\"ca\"").nth(1).unwrap();
    let shown = &shown[shown.find('>').unwrap() + 1..shown.find("</textarea>").unwrap()];
    assert!(shown.contains("BEGIN CERTIFICATE"), "{shown}");
    let answer = browser.post(
        "/alerts/smtp",
        &[
            ("csrf", &csrf(&page.body)),
            ("host", "mail.plant.test"),
            ("port", "587"),
            ("tls", "starttls"),
            ("user", "alerts"),
            ("password", ""),
            ("from", "alerts@plant.test"),
            ("ca", &shown.replace('\n', "\r\n")),
            ("action", "save"),
        ],
    );
    assert!(
        answer.body.contains("SMTP server saved") && !answer.body.contains("removed"),
        "{}",
        answer.body
    );
    assert_eq!(
        stored().as_deref(),
        Some("relay secret"),
        "kept by the portal"
    );
    let run = console(None);
    assert!(
        run.ok && run.stdout.contains("stored password kept"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(
        stored().as_deref(),
        Some("relay secret"),
        "kept by the console"
    );
}

#[test]
fn handshake_codes_are_managed_from_the_portal() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let token = csrf(&browser.get("/handshakes").body);
    let post = |action: &str, fields: &[(&str, &str)]| {
        let mut all = vec![("csrf", token.as_str())];
        all.extend_from_slice(fields);
        browser.post(&format!("/handshakes/{action}"), &all)
    };
    let answer = post(
        "create",
        &[
            ("organization", "200001"),
            ("code", "PLANT-B"),
            ("name", "<i>Plant B</i>"),
        ],
    );
    assert!(
        answer.body.contains("Handshake code PLANT-B created"),
        "{}",
        answer.body
    );
    assert!(
        answer.body.contains("&#60;i&#62;Plant B&#60;/i&#62;"),
        "names are escaped"
    );
    assert_eq!(
        post(
            "create",
            &[("organization", "200001"), ("code", "bad code!")]
        )
        .status,
        400
    );
    assert_eq!(
        post("password", &[("code", "PLANT-B"), ("password", "short")]).status,
        400
    );
    assert!(
        post(
            "password",
            &[("code", "PLANT-B"), ("password", "plant-b secret")]
        )
        .body
        .contains("Session password of PLANT-B set")
    );
    let answer = post(
        "validation",
        &[
            ("code", "PLANT-B"),
            ("domains", "*.plant-b.local\nnot a domain!"),
            ("processes", ""),
        ],
    );
    assert!(answer.body.contains("is not a domain") && answer.status == 400);
    assert!(
        post(
            "validation",
            &[
                ("code", "PLANT-B"),
                ("domains", "*.plant-b.local"),
                ("processes", "reader.exe")
            ]
        )
        .status
            == 200
    );
    assert!(
        post("assign", &[("item", "LIC-T-1"), ("code", "PLANT-B")])
            .body
            .contains("Item LIC-T-1 is now served by PLANT-B")
    );

    // The device side sees it at once.
    let mut request = f.request("reader", 1);
    assert_eq!(
        f.authorize(&request).1["error"]["code"],
        "NO_LICENSE",
        "the default code serves nothing now"
    );
    request["handshake_code"] = json!("PLANT-B");
    request["session_password"] = json!("plant-b secret");
    request["validation"] = json!({"domain": "line1.plant-b.local", "process": "reader.exe"});
    let (status, body) = f.authorize(&request);
    assert_eq!(status, 200, "{body}");
    let lease = f.verify(&body, 1).lease_id;

    assert!(
        post("delete", &[("code", &f.code)])
            .body
            .contains("cannot be deleted")
    );
    assert!(
        post("delete", &[("code", "PLANT-B")])
            .body
            .contains("items are configured to this code")
    );
    post("assign", &[("item", "LIC-T-1"), ("code", &f.code)]);
    assert!(
        post("delete", &[("code", "PLANT-B")])
            .body
            .contains("Handshake code PLANT-B deleted")
    );
    // The device's authorization names PLANT-B: its lease ends rather than being renewed
    // under no code (which the device would refuse).
    assert_eq!(f.heartbeat(&lease, 1).unwrap_err(), "LEASE_REVOKED");

    let audited = |f: &Fixture| -> i64 {
        f.db()
            .query_row(
                "SELECT COUNT(*) FROM audit_log WHERE action = 'handshake trial'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert!(
        post("trial", &[("trial", "on")])
            .body
            .contains("The public trial is on")
    );
    assert!(
        post("trial", &[("trial", "on")])
            .body
            .contains("The public trial is already on")
    );
    assert_eq!(
        audited(&f),
        1,
        "a change is audited, a repeat changes nothing"
    );
    let trial = json!({"product": "reader", "device": {"uuid": device_uuid(9)}, "nonce": NONCE});
    assert_eq!(f.authorize(&trial).0, 200);
    assert_eq!(
        browser
            .post("/handshakes/trial", &[("trial", "off")])
            .status,
        403,
        "no CSRF token"
    );
}

impl Browser {
    /// Posts a multipart form with a CSRF token and several named files.
    fn upload_files(&self, path: &str, csrf: &str, files: &[(&str, &[u8])]) -> Answer {
        let boundary = "keygate-test-boundary-7d2f";
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{csrf}\r\n"
        )
        .into_bytes();
        for (name, data) in files {
            body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.pem\"\r\n\r\n").bytes());
            body.extend_from_slice(data);
            body.extend(b"\r\n");
        }
        body.extend(format!("--{boundary}--\r\n").bytes());
        let response = self
            .agent
            .post(&format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .send(&body[..])
            .unwrap();
        self.keep(response)
    }
}

/// The portal hides withdrawn items, so a code left with only those looks unused: it must
/// be deletable from the portal.
#[test]
fn a_handshake_code_left_with_withdrawn_items_only_can_be_deleted() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    f.assign_to_new_code("LIC-T-1", "PLANT-B");
    f.import(
        "LIC-T",
        &item("reader", "per_device", 10, "item_id = \"LIC-T-NEW\""),
        &["--version", "2"],
    );
    let token = csrf(&browser.get("/handshakes").body);
    let answer = browser.post(
        "/handshakes/delete",
        &[("csrf", token.as_str()), ("code", "PLANT-B")],
    );
    assert!(
        answer.body.contains("Handshake code PLANT-B deleted"),
        "{}",
        answer.body
    );
    let code: String = f
        .db()
        .query_row(
            "SELECT h.code FROM items i JOIN handshake_codes h ON h.id = i.handshake_id
             WHERE i.item_id = 'LIC-T-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(code, f.code, "the withdrawn item went to the default code");
}

fn certificate(name: &str) -> (String, String) {
    certificate_with(name, |_| {})
}

/// A self-signed certificate for `name` and 127.0.0.1, its parameters set by `edit`.
fn certificate_with(
    name: &str,
    edit: impl FnOnce(&mut rcgen::CertificateParams),
) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string(), "127.0.0.1".to_string()]).unwrap();
    edit(&mut params);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn the_certificate_is_replaced_only_by_a_matching_pair_and_without_restart() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let old = appliance_cert(&f.data);
    let page = browser.get("/settings").body;
    assert!(page.contains("cert.pem (self-signed)"), "{page}");
    let token = csrf(&page);
    let (cert_a, key_a) = certificate("keygate.plant.test");
    let (_, key_b) = certificate("other.test");
    let answer = browser.upload_files(
        "/settings/certificate",
        &token,
        &[("cert", cert_a.as_bytes()), ("key", key_b.as_bytes())],
    );
    assert_eq!(answer.status, 400);
    assert!(
        answer.body.contains("The certificate was not installed")
            && answer.body.contains("current one stays"),
        "{}",
        answer.body
    );
    assert_eq!(appliance_cert(&f.data), old);
    assert_eq!(
        get_json(&pinned_agent(&old), &f.app.url("/healthz")).0,
        200,
        "the old certificate is still served"
    );
    // A file larger than any certificate: the settings page says so, nothing changes.
    let answer = browser.upload_files(
        "/settings/certificate",
        &token,
        &[("cert", &vec![b'x'; 300 * 1024]), ("key", key_a.as_bytes())],
    );
    assert_eq!(answer.status, 400);
    assert!(
        answer
            .body
            .contains("The certificate was not installed: a file is larger than 256 KiB")
            && answer.body.contains("action=\"/settings/certificate\""),
        "{}",
        answer.body
    );
    assert_eq!(appliance_cert(&f.data), old);

    // A pair that belongs together but cannot serve: refused, with why.
    let now = f.app.clock_now();
    let refusals = [
        (
            certificate_with("keygate.plant.test", |p| {
                p.not_before = now - time::Duration::days(400);
                p.not_after = now - time::Duration::days(1);
            }),
            "it expired on",
        ),
        (
            certificate_with("keygate.plant.test", |p| {
                p.not_before = now + time::Duration::days(2);
            }),
            "it is valid only from",
        ),
        (
            certificate_with("keygate.plant.test", |p| {
                p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            }),
            "the certificate of a certificate authority",
        ),
        (
            certificate_with("keygate.plant.test", |p| {
                p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            }),
            "does not include TLS servers",
        ),
    ];
    for ((cert, key), why) in &refusals {
        let answer = browser.upload_files(
            "/settings/certificate",
            &token,
            &[("cert", cert.as_bytes()), ("key", key.as_bytes())],
        );
        assert_eq!(answer.status, 400, "{why}");
        assert!(
            answer.body.contains("The certificate was not installed") && answer.body.contains(why),
            "{why}: {}",
            answer.body
        );
        assert_eq!(appliance_cert(&f.data), old, "{why}");
    }

    // One expiring in 20 days is installed, with a warning and the names it covers (on the
    // appliance's clock: on the real one it has expired, so the next upload follows at once,
    // over the connection trusting the first certificate).
    let (cert_soon, key_soon) = certificate_with("keygate.plant.test", |p| {
        p.not_after = now + time::Duration::days(20);
    });
    let answer = browser.upload_files(
        "/settings/certificate",
        &token,
        &[("cert", cert_soon.as_bytes()), ("key", key_soon.as_bytes())],
    );
    assert!(
        answer.body.contains("The new certificate is in use")
            && answer.body.contains("It names keygate.plant.test")
            && answer.body.contains("It expires on"),
        "{}",
        answer.body
    );

    let answer = browser.upload_files(
        "/settings/certificate",
        &token,
        &[("cert", cert_a.as_bytes()), ("key", key_a.as_bytes())],
    );
    assert!(
        answer.body.contains("The new certificate is in use") && !answer.body.contains("expires"),
        "{}",
        answer.body
    );
    assert_eq!(
        get_json(&pinned_agent(cert_a.as_bytes()), &f.app.url("/healthz")).0,
        200,
        "served without a restart"
    );
    assert!(
        pinned_agent(&old)
            .get(&f.app.url("/healthz"))
            .call()
            .is_err(),
        "the old one is gone"
    );
    assert_eq!(
        appliance_cert(&f.data),
        cert_a.as_bytes(),
        "and kept for the next start"
    );
    // (Until now over the connection made before: one idle for 5 s is closed.)
    let browser = browser.trusting_the_new_certificate(&f.app);

    // One from the company's CA: the page no longer calls the certificate self-signed.
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Plant Root CA");
    let ca = rcgen::Issuer::new(ca, rcgen::KeyPair::generate().unwrap());
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["keygate.plant.test".to_string()]).unwrap();
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "keygate.plant.test");
    let cert = leaf.signed_by(&key, &ca).unwrap();
    let answer = browser.upload_files(
        "/settings/certificate",
        &token,
        &[
            ("cert", cert.pem().as_bytes()),
            ("key", key.serialize_pem().as_bytes()),
        ],
    );
    assert!(
        answer
            .body
            .contains("cert.pem (issued by a certificate authority, uploaded)")
            && !answer.body.contains("self-signed"),
        "{}",
        answer.body
    );
}

#[test]
fn backups_are_listed_and_only_owners_download_them() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let page = browser.get("/settings");
    assert!(
        page.body.contains("taken every 12 minutes"),
        "{}",
        page.body
    );
    let answer = browser.post("/settings/backup", &[("csrf", &csrf(&page.body))]);
    assert!(answer.body.contains("Backup taken"), "{}", answer.body);
    let name = answer
        .body
        .split("/settings/backups/")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let audited = f.audited("backup taken");
    assert_eq!(audited.len(), 1, "every admin action is audited");
    assert!(audited[0].2.contains(&name), "{audited:?}");
    let download = browser.get(&format!("/settings/backups/{name}"));
    assert_eq!(download.status, 200);
    assert!(
        download
            .headers
            .iter()
            .any(|(k, v)| k == "content-disposition" && v.contains(&name))
    );
    let mut raw = browser
        .agent
        .get(&format!("{}/settings/backups/{name}", browser.base))
        .header("cookie", browser.cookie_header())
        .call()
        .unwrap();
    let bytes = raw.body_mut().read_to_vec().unwrap();
    assert!(
        bytes.starts_with(b"SQLite format 3\0"),
        "a SQLite database file"
    );
    assert_eq!(
        bytes,
        std::fs::read(f.data.join("backups").join(&name)).unwrap(),
        "the whole file, streamed"
    );
    assert_eq!(browser.get("/settings/backups/..%2Fkeygate.db").status, 404);
    // A link on another site, followed with the owner's session: no download, no entry.
    for site in ["cross-site", "same-site"] {
        let status = browser
            .agent
            .get(&format!("{}/settings/backups/{name}", browser.base))
            .header("cookie", browser.cookie_header())
            .header("sec-fetch-site", site)
            .call()
            .map_or_else(
                |e| match e {
                    ureq::Error::StatusCode(code) => code,
                    e => panic!("{e}"),
                },
                |r| r.status().as_u16(),
            );
        assert_eq!(status, 403, "{site}");
    }
    assert_eq!(f.audited("backup downloaded").len(), 2);
    assert!(set_password_for_admin(&f, "max", "manager").ok);
    let (manager, _) = sign_in(&f, "max", PASSWORD);
    assert_eq!(
        manager.get(&format!("/settings/backups/{name}")).status,
        403
    );
    // Backups that cannot be read are a fault to report, not "no such backup".
    let backups = f.data.join("backups");
    std::fs::rename(&backups, f.data.join("backups.aside")).unwrap();
    std::fs::write(&backups, "not a directory").unwrap();
    let unreadable = browser.get(&format!("/settings/backups/{name}"));
    assert_eq!(unreadable.status, 500, "{}", unreadable.body);
}

#[test]
fn owners_manage_admins_and_keep_at_least_one_owner() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let token = csrf(&browser.get("/admins").body);
    let post = |action: &str, fields: &[(&str, &str)]| {
        let mut all = vec![("csrf", token.as_str())];
        all.extend_from_slice(fields);
        browser.post(&format!("/admins/{action}"), &all)
    };
    assert!(
        post(
            "create",
            &[("name", "max"), ("role", "manager"), ("password", PASSWORD)]
        )
        .body
        .contains("Admin max created (manager)")
    );
    assert!(
        post(
            "create",
            &[("name", "tiny"), ("role", "manager"), ("password", "short")]
        )
        .body
        .contains("at least 12 characters")
    );
    assert!(
        post("delete", &[("name", "olivia")])
            .body
            .contains("You cannot delete or change your own account")
    );
    // An owner's own password is changed on Your account, with the current one: a reset
    // here would sign this very session out behind a page that still looks signed in.
    let own = post(
        "password",
        &[("name", "olivia"), ("password", "another long password")],
    );
    assert!(
        own.body
            .contains("change your own password on Your account"),
        "{}",
        own.body
    );
    assert_eq!(browser.get("/admins").status, 200, "still signed in");
    let (manager, answer) = sign_in(&f, "max", PASSWORD);
    assert_eq!(answer.location, "/");
    assert_eq!(
        manager.get("/admins").status,
        403,
        "managers do not manage admins"
    );
    assert!(!manager.get("/").body.contains("href=\"/admins\""));
    assert!(
        post(
            "password",
            &[("name", "max"), ("password", "another long password")]
        )
        .body
        .contains("sessions are signed out")
    );
    assert_eq!(
        manager.get("/").location,
        "/login",
        "signed out by the reset"
    );
    assert!(
        post("role", &[("name", "max"), ("role", "owner")])
            .body
            .contains("max is now owner")
    );
    assert!(
        post("delete", &[("name", "max")])
            .body
            .contains("Admin max deleted")
    );
    assert!(!browser.get("/admins").body.contains(">max<"));
}

#[test]
fn device_detail_item_filter_and_removing_a_users_devices() {
    let items = [
        item("reader", "per_device", 10, ""),
        item("scanner", "per_usage", 1000, "counter = \"scans\""),
    ]
    .concat();
    let (f, browser) = signed_in(&items);
    for n in 1..=4 {
        let mut request = f.request(if n <= 2 { "reader" } else { "scanner" }, n);
        request["device"]["user"] = json!(if n % 2 == 0 { "leaver" } else { "stayer" });
        assert_eq!(f.authorize(&request).0, 200);
    }
    // Device 5 is shared: "stayer" used it before "leaver" did.
    for user in ["stayer", "leaver"] {
        let mut request = f.request("reader", 5);
        request["device"]["user"] = json!(user);
        assert_eq!(f.authorize(&request).0, 200);
    }
    let lease = f.authorized("scanner", 3).lease_id;
    f.usage(&f.reports(
        &lease,
        3,
        "11111111-1111-4111-8111-111111111111",
        &[(1, "LIC-T-2", "scans", 12)],
    ));
    assert_eq!(
        browser
            .get("/devices?item=LIC-T-1")
            .body
            .matches("<code>")
            .count(),
        3,
        "devices 1, 2 and 5 hold a reader seat"
    );
    let detail = browser.get(&format!("/devices/{}", device_uuid(3)));
    assert!(
        detail.body.contains("LIC-T-2")
            && detail.body.contains("scans")
            && detail.body.contains(">12<"),
        "{}",
        detail.body
    );
    assert_eq!(browser.get("/devices/not-a-uuid").status, 404);

    let token = csrf(&browser.get("/devices").body);
    let answer = browser.post(
        "/devices/remove-user",
        &[("csrf", &token), ("user", "leaver")],
    );
    assert_eq!(answer.location, "/devices?removed=2&shared=1");
    let removed = browser.get(&format!("{}&q=stayer", answer.location));
    assert!(
        removed
            .body
            .contains("2 device(s) removed; 1 kept because other users use them too")
    );
    // An action taken on that page comes back to its search, not to the removal's notice.
    let blocked = browser.post(
        &format!("/devices/{}/block", device_uuid(1)),
        &[("csrf", &token), ("back", &hidden(&removed.body, "back"))],
    );
    assert_eq!(blocked.location, "/devices?q=stayer");
    assert!(!browser.get(&blocked.location).body.contains("removed;"));
    assert_eq!(
        f.authorize(&f.request("reader", 5)).0,
        200,
        "still authorized"
    );
    assert!(
        !browser
            .get("/devices?notice=Call+555")
            .body
            .contains("Call 555"),
        "a link cannot put text on the page"
    );
    assert_eq!(
        f.item_value("LIC-T-1", "seats_used"),
        2,
        "the leaver's own reader seat is freed, the shared device's kept"
    );
    // Each device removed is in the audit log, by its uuid, as one removed alone is.
    let audited = || -> Vec<String> {
        f.db()
            .prepare(
                "SELECT target FROM audit_log WHERE action = 'device removed'
                 AND actor = 'olivia' AND detail = 'one of the devices of user leaver'
                 ORDER BY target",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(audited(), [device_uuid(2), device_uuid(4)]);
    // Again: the devices removed already are not counted (nor audited) a second time.
    let answer = browser.post(
        "/devices/remove-user",
        &[("csrf", &token), ("user", "leaver")],
    );
    assert_eq!(answer.location, "/devices?removed=0&shared=1");
    assert_eq!(audited().len(), 2);
    // No user named: the device page says so, nothing is removed.
    let before = db_digest(&f.data.join("keygate.db"));
    let answer = browser.post("/devices/remove-user", &[("csrf", &token), ("user", " ")]);
    assert_eq!(answer.status, 400);
    assert!(
        answer
            .body
            .contains("Name the user whose devices to remove; nothing was removed.")
            && answer.body.contains("action=\"/devices/remove-user\""),
        "{}",
        answer.body
    );
    assert_eq!(db_digest(&f.data.join("keygate.db")), before);
}

#[test]
fn the_dashboard_draws_concurrency_per_window() {
    let (f, browser) = signed_in(&item(
        "viewer",
        "concurrent_device",
        2,
        "max_exceptions = 5",
    ));
    let leases: Vec<String> = (1..=3)
        .map(|n| f.authorized("viewer", n).lease_id)
        .collect();
    let page = browser.get("/");
    assert!(
        page.body
            .contains("devices per 3-minute window, last 4 hours, highest 3"),
        "{}",
        page.body
    );
    assert!(
        page.body
            .contains("<span class=\"state state-tolerance\">tolerance</span>")
    );
    // Used and quota are devices in the window; the exceptions are counted apart.
    let row = &page.body[page.body.find("<tr id=\"item-LIC-T-1\"").unwrap()..];
    let cells: Vec<&str> = row
        .split("<td class=\"num\">")
        .skip(1)
        .take(2)
        .map(|c| c.split('<').next().unwrap())
        .collect();
    assert_eq!(cells, ["3", "2"], "3 devices active, quota 2");
    assert!(row.contains("exceptions: 1 of 5"), "{row}");

    // A release frees its place in the window at once: 2 of 2 active, back to ok; the
    // chart keeps the window's highest.
    assert_eq!(f.release(&leases[2], 3).0, 200);
    let page = browser.get("/");
    let row = &page.body[page.body.find("<tr id=\"item-LIC-T-1\"").unwrap()..];
    let used = row.split("<td class=\"num\">").nth(1).unwrap();
    assert_eq!(used.split('<').next().unwrap(), "2", "{row}");
    assert!(
        row.contains("<span class=\"state state-ok\">ok</span>"),
        "{row}"
    );
    assert!(page.body.contains("last 4 hours, highest 3"));
}

#[test]
fn hostile_input_in_every_form_is_refused_or_shown_escaped() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let hostile = [
        "<script>alert(1)</script>".to_string(),
        "\"><img src=x onerror=alert(1)>".to_string(),
        "' OR 1=1; --".to_string(),
        "x".repeat(100_000),
    ];
    for value in &hostile {
        let pages: Vec<(&str, Vec<(&str, &str)>)> = vec![
            (
                "/handshakes/create",
                vec![("organization", "200001"), ("code", value), ("name", value)],
            ),
            (
                "/handshakes/rename",
                vec![("code", &f.code), ("name", value)],
            ),
            (
                "/handshakes/validation",
                vec![("code", &f.code), ("domains", value), ("processes", value)],
            ),
            (
                "/handshakes/password",
                vec![("code", value), ("password", value)],
            ),
            ("/alerts/recipients", vec![("recipients", value)]),
            (
                "/alerts/smtp",
                vec![
                    ("host", value),
                    ("port", value),
                    ("tls", value),
                    ("user", value),
                    ("from", value),
                    ("action", "save"),
                ],
            ),
            (
                "/admins/create",
                vec![("name", value), ("role", value), ("password", value)],
            ),
            ("/devices/remove-user", vec![("user", value)]),
        ];
        for (path, fields) in pages {
            let token = csrf(&browser.get("/").body);
            let mut all = vec![("csrf", token.as_str())];
            all.extend(fields);
            let answer = browser.post(path, &all);
            assert!(
                matches!(answer.status, 200 | 303 | 400),
                "{path}: {}",
                answer.status
            );
            assert!(
                !answer.body.contains("<script>alert") && !answer.body.contains("<img src=x"),
                "{path} shows it raw"
            );
        }
        for path in [
            "/",
            "/handshakes",
            "/alerts",
            "/admins",
            "/devices",
            "/audit",
            "/licenses",
            "/settings",
        ] {
            let page = browser.get(path);
            assert_eq!(page.status, 200, "{path}");
            assert!(
                !page.body.contains("<script>alert") && !page.body.contains("<img src=x"),
                "{path} shows it raw"
            );
        }
        let value: String = value.chars().take(2000).collect(); // URLs have limits of their own
        let search = browser.get(&format!(
            "/devices?q={}",
            value
                .replace('<', "%3C")
                .replace('>', "%3E")
                .replace('"', "%22")
                .replace(' ', "+")
                .replace('\'', "%27")
                .replace(';', "%3B")
                .replace('=', "%3D")
        ));
        assert!(
            matches!(search.status, 200 | 400),
            "search: {}",
            search.status
        );
    }
}

#[test]
fn the_portal_scope_is_guarded_before_any_handler() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    let browser = Browser::new(&f.app);
    for path in [
        "/",
        "/devices",
        "/admins",
        "/settings/backups/x",
        "/no-such-page",
    ] {
        assert_eq!(browser.get(path).location, "/login", "{path}");
    }
    assert_eq!(
        browser
            .post("/devices/remove-user", &[("user", "x")])
            .location,
        "/login"
    );
    assert_eq!(browser.get("/login").status, 200);
    assert_eq!(browser.get("/healthz").status, 200);
    assert_eq!(
        get_json(&f.app.agent, &f.app.url("/api/v1/appliance")).0,
        200
    );
}

#[test]
fn an_auditor_cannot_change_anything() {
    let (f, _owner) = signed_in(&item("reader", "per_device", 10, ""));
    f.authorized("reader", 1);
    assert!(set_password_for_admin(&f, "audrey", "auditor").ok);
    let (auditor, _) = sign_in(&f, "audrey", PASSWORD);
    let token = csrf(&auditor.get("/").body);
    let db = f.data.join("keygate.db");
    let before = db_digest(&db);
    let device = format!("/devices/{}", device_uuid(1));
    let forms: Vec<(String, Vec<(&str, &str)>)> = vec![
        (format!("{device}/block"), vec![]),
        (format!("{device}/remove"), vec![]),
        ("/devices/remove-user".into(), vec![("user", "x")]),
        (
            "/handshakes/create".into(),
            vec![("organization", "200001"), ("code", "NEW")],
        ),
        (
            "/handshakes/rename".into(),
            vec![("code", &f.code), ("name", "x")],
        ),
        ("/handshakes/delete".into(), vec![("code", &f.code)]),
        (
            "/handshakes/password".into(),
            vec![("code", &f.code), ("password", "long enough!")],
        ),
        ("/handshakes/clear-password".into(), vec![("code", &f.code)]),
        (
            "/handshakes/validation".into(),
            vec![("code", &f.code), ("domains", "a.b")],
        ),
        (
            "/handshakes/assign".into(),
            vec![("item", "LIC-T-1"), ("code", &f.code)],
        ),
        ("/handshakes/trial".into(), vec![("trial", "on")]),
        (
            "/alerts/recipients".into(),
            vec![("recipients", "a@b.test")],
        ),
        (
            "/alerts/smtp".into(),
            vec![("host", "h"), ("tls", "none"), ("action", "save")],
        ),
        (
            "/alerts/smtp".into(),
            vec![("host", "h"), ("tls", "none"), ("action", "test")],
        ),
        (
            "/admins/create".into(),
            vec![
                ("name", "eve"),
                ("role", "owner"),
                ("password", "long enough password"),
            ],
        ),
        (
            "/admins/role".into(),
            vec![("name", "audrey"), ("role", "owner")],
        ),
        ("/settings/backup".into(), vec![]),
    ];
    for (path, fields) in &forms {
        let mut all = vec![("csrf", token.as_str())];
        all.extend(fields.iter().copied());
        assert_eq!(auditor.post(path, &all).status, 403, "{path}");
    }
    for path in ["/licenses", "/settings/certificate"] {
        assert_eq!(
            auditor.upload(path, &token, b"anything").status,
            403,
            "{path}"
        );
    }
    assert_eq!(
        db_digest(&db),
        before,
        "nothing changed, not even the audit log"
    );
    assert!(
        std::fs::read_dir(f.data.join("backups")).map_or(true, |mut d| d.next().is_none()),
        "no backup taken"
    );
}

/// A clock set back 50 minutes every 50 minutes (inside the hour's slack each time) does not
/// hold the time still: the newest time used moves on as time passes, so the second step
/// back is 100 minutes behind it and refused. Before, the newest time stood still while the
/// clock caught up with it, and a license never expired.
#[test]
fn a_clock_set_back_again_and_again_gains_no_more_than_the_hour() {
    let f = Fixture::new(&item("scan", "per_device", 10, ""));
    f.authorized("scan", 1);
    let fifty = Duration::minutes(50);
    f.app.clock.advance(fifty);
    f.app.clock.set(test_epoch());
    f.authorized("scan", 2);
    f.app.clock.advance(fifty);
    f.app.clock.set(test_epoch());
    assert_eq!(f.refused("scan", 3), "INTERNAL");
    f.app.clock.set(test_epoch() + 2 * fifty);
    f.authorized("scan", 3);
}

/// The appliance's clock set back more than an hour behind the newest time it used signs
/// nothing: authorizations answer `INTERNAL` saying why and change nothing, usage is still
/// recorded but not renewed, the dashboard says so. The newest time outlives a restart;
/// `keygate reset-clock` (service stopped, audited) accepts a clock whose earlier time was
/// wrong.
#[test]
fn a_clock_set_back_signs_nothing_until_it_is_right() {
    let (f, browser) = signed_in(&item("scan", "per_device", 10, ""));
    let first = f.authorized("scan", 1);
    // Inside the hour's slack (an NTP correction, a resumed VM): nothing changes.
    f.app.clock.set(test_epoch() - Duration::minutes(59));
    f.authorized("scan", 2);
    assert!(!browser.get("/").body.contains("clock-behind"));

    f.app.clock.set(test_epoch() - Duration::hours(2));
    let before = db_digest(&f.data.join("keygate.db"));
    let (status, body) = f.authorize(&f.request("scan", 3));
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "INTERNAL");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("clock (2026-06-01T10:00:00Z) is 2h behind the newest time it has used (2026-06-01T12:00:00Z)"),
        "{message}"
    );
    assert_eq!(db_digest(&f.data.join("keygate.db")), before);
    let stream = "00000000-0000-4000-8000-00000000c10c";
    let (status, body) =
        f.usage(&f.reports(&first.lease_id, 1, stream, &[(1, "LIC-T-1", "pages", 7)]));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["acked_seq"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(body["authorization"].is_null(), "{body}");
    assert_eq!(body["renewal_error"]["code"], "INTERNAL");
    assert_eq!(
        f.recorded("pages"),
        7,
        "usage is recorded whatever the clock"
    );
    let page = browser.get("/").body;
    assert!(page.contains("id=\"clock-behind\""), "{page}");

    // Right again: signing again.
    f.app.clock.set(test_epoch());
    f.authorized("scan", 3);
    f.heartbeat(&first.lease_id, 1).unwrap();

    // Stopped, clock set back, started: still refused.
    drop(browser);
    let f = f.restart_at(test_epoch() - Duration::hours(2));
    assert_eq!(f.refused("scan", 4), "INTERNAL");
    let run = keygate(&f.data, &["reset-clock"]);
    assert!(
        !run.ok && run.stderr.contains("stop the service first"),
        "{}",
        run.stderr
    );

    // The clock was once ahead by a day (the real one, for the real binary): status tells,
    // reset-clock accepts the clock as it is, audited.
    let (_dir, data) = f.stop();
    let db = rusqlite::Connection::open(data.join("keygate.db")).unwrap();
    let ahead = (time::OffsetDateTime::now_utc() + Duration::days(1)).unix_timestamp();
    keygate::store::settings::set(&db, keygate::clock::NEWEST_TIME, &ahead.to_string()).unwrap();
    let status = keygate(&data, &["status"]);
    assert!(
        status.stdout.contains("clock:            BEHIND"),
        "{}",
        status.stdout
    );
    let run = keygate(&data, &["reset-clock"]);
    assert!(run.ok, "{}", run.stderr);
    let audited: i64 = db
        .query_row(
            "SELECT count(*) FROM audit_log WHERE action = 'clock reset'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(audited, 1);
    let status = keygate(&data, &["status"]);
    assert!(
        status.stdout.contains("clock:            ok"),
        "{}",
        status.stdout
    );
}

/// A per_usage item's chart shows what its quota counts, the metered counter, not every
/// counter its devices report.
#[test]
fn the_dashboard_charts_what_a_per_usage_item_meters() {
    let (f, browser) = signed_in(&item("scanner", "per_usage", 1000, "counter = \"scans\""));
    let auth = f.authorized("scanner", 1);
    let stream = "00000000-0000-4000-8000-0000000c4a27";
    let mut body = f.reports(&auth.lease_id, 1, stream, &[(1, "LIC-T-1", "scans", 17)]);
    body["reports"][0]["counters"]["pdf417"] = serde_json::json!(3);
    assert_eq!(f.usage(&body).0, 200);
    let page = browser.get("/").body;
    let day = f.app.clock_now().date();
    assert!(
        page.contains(&format!("<title>{day} UTC: 17</title>")),
        "{page}"
    );
}

/// What an admin must not have to guess: an item whose seats are all taken says it refuses
/// new devices, times carry their zone, and a link with a query the portal cannot read gets
/// the portal's page with the reason.
#[test]
fn pages_say_a_full_item_and_the_time_zone() {
    let (f, browser) = signed_in(&item("cad", "standalone", 1, ""));
    f.authorized("cad", 1);
    let dashboard = browser.get("/").body;
    assert!(
        dashboard.contains("state-full\">full</span>"),
        "{dashboard}"
    );
    assert!(dashboard.contains("2036-01-01 00:00:00 UTC"), "{dashboard}");
    assert_eq!(f.refused("cad", 2), "QUOTA_EXCEEDED");
    let devices = browser.get("/devices").body;
    assert!(devices.contains(" UTC</td>"), "{devices}");
    let answer = browser.get("/devices?after=x");
    assert_eq!(answer.status, 400);
    assert!(
        answer.body.contains("The link could not be read"),
        "{}",
        answer.body
    );
}

/// The audit log pages back through everything (a day of freed seats does not push the
/// admins' own actions out of reach) and filters by part of an action, in any case, and by
/// who acted.
#[test]
fn the_audit_log_pages_back_and_filters_by_text_and_actor() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    f.db()
        .execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 450)
             INSERT INTO audit_log (at, actor, action, target, detail, address)
             SELECT 1000 + i, 'system', 'seat freed', printf('dev-%d on LIC-T-1', i), '', '' FROM n;",
        )
        .unwrap();
    let rows = |body: &str| body.matches("<tr><td>").count();
    let older = |body: &str| {
        body.split("href=\"")
            .find(|s| s.starts_with("/audit?"))
            .map(|s| s[..s.find('"').unwrap()].replace("&amp;", "&"))
    };
    let mut page = browser.get("/audit").body;
    let mut seen = rows(&page);
    while let Some(link) = older(&page) {
        page = browser.get(&link).body;
        seen += rows(&page);
    }
    let all: i64 = f
        .db()
        .query_row("SELECT count(*) FROM audit_log", [], |r| r.get(0))
        .unwrap();
    assert!(all > 450);
    assert_eq!(seen as i64, all, "every entry, each once");
    assert!(
        page.contains("first admin created"),
        "the oldest page reaches the admin's own first entry"
    );

    let mine = browser.get("/audit?action=ADMIN+CREATED&actor=olivia").body;
    assert_eq!(rows(&mine), 1, "{mine}");
    let freed = browser.get("/audit?action=+seat+&actor=system").body;
    assert_eq!(rows(&freed), 200);
    assert_eq!(
        rows(&browser.get("/audit?action=%25").body),
        0,
        "no wildcard"
    );
}

/// A search by action reads a span of entries a page (no index finds part of a word): a
/// log of millions is not read whole for one page; the page says so and searches on.
#[test]
fn an_action_search_reads_a_span_a_page_and_searches_on() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    f.db()
        .execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100100)
             INSERT INTO audit_log (at, actor, action, target, detail, address)
             SELECT 1000 + i, 'system', 'seat freed', 'dev on LIC-T-1', '', '' FROM n;",
        )
        .unwrap();
    let page = browser.get("/audit?action=admin+created").body;
    assert!(
        page.contains("Nothing recorded for this filter in these 100000 entries.")
            && page.contains("Searched 100000 entries.")
            && !page.contains("first admin created"),
        "{page}"
    );
    let link = page
        .split("href=\"")
        .find(|s| s.starts_with("/audit?"))
        .map(|s| s[..s.find('"').unwrap()].replace("&amp;", "&"))
        .unwrap();
    let page = browser.get(&link).body;
    assert!(page.contains("first admin created"), "{page}");
    assert!(!page.contains("Search older entries"), "the oldest reached");
    // With an actor, the span is the actor's entries: an admin's few are read at once.
    let page = browser.get("/audit?action=admin+created&actor=olivia").body;
    assert!(
        page.contains("first admin created") && !page.contains("Searched"),
        "{page}"
    );
    let page = browser.get("/audit?action=admin&actor=system").body;
    assert!(page.contains("Search older entries"), "{page}");
    // Without an action, pages are read by their index, full.
    let page = browser.get("/audit").body;
    assert_eq!(page.matches("<tr><td>").count(), 200);
}

/// A refused form comes back with what the admin typed (never a password), so one wrong
/// entry does not cost the others.
#[test]
fn a_refused_form_keeps_what_was_typed() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let token = csrf(&browser.get("/handshakes").body);
    let answer = browser.post(
        "/handshakes/validation",
        &[
            ("csrf", &token),
            ("code", &f.code),
            ("domains", "good.plant.test\nplant_b.local"),
            ("processes", "scanner"),
        ],
    );
    assert_eq!(answer.status, 400);
    assert!(
        answer
            .body
            .contains(">good.plant.test\nplant_b.local</textarea>")
            && answer.body.contains(">scanner</textarea>"),
        "{}",
        answer.body
    );
    let answer = browser.post(
        "/handshakes/create",
        &[
            ("csrf", &token),
            ("organization", "200001"),
            ("code", "no spaces"),
            ("name", "Lab B"),
        ],
    );
    assert_eq!(answer.status, 400);
    assert!(
        answer.body.contains("value=\"no spaces\"") && answer.body.contains("value=\"Lab B\""),
        "{}",
        answer.body
    );
    let answer = browser.post(
        "/admins/create",
        &[
            ("csrf", &token),
            ("name", "audrey"),
            ("role", "auditor"),
            ("password", "short"),
        ],
    );
    assert_eq!(answer.status, 400);
    assert!(
        answer.body.contains("value=\"audrey\"")
            && answer.body.contains("<option selected>auditor</option>")
            && !answer.body.contains("value=\"short\""),
        "{}",
        answer.body
    );
}

/// Posts `body` to `path` as `browser`, the first half at once and the rest after
/// `meanwhile` ran (a client may send a body as slowly as the body pace allows); returns the
/// answer's status and body.
fn post_slowly(
    f: &Fixture,
    browser: &Browser,
    path: &str,
    content_type: &str,
    body: &[u8],
    meanwhile: impl FnOnce(),
) -> (u16, String) {
    use std::io::{Read, Write};
    let tcp = std::net::TcpStream::connect(f.app.addr).unwrap();
    let mut tls = tls_with(
        &tls_client(&f.app.data_dir),
        tcp,
        StdDuration::from_secs(20),
    );
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nCookie: {}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        f.app.addr,
        browser.cookie_header(),
        body.len()
    );
    let (first, rest) = body.split_at(body.len() / 2);
    tls.write_all(head.as_bytes()).unwrap();
    tls.write_all(first).unwrap();
    tls.flush().unwrap();
    meanwhile();
    tls.write_all(rest).unwrap();
    tls.flush().unwrap();
    let mut answer = Vec::new();
    // The appliance closes the connection without TLS's close_notify: what came is the answer.
    let _ = tls.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).to_string();
    let status = answer[9..12].parse().unwrap();
    (status, answer)
}

/// A form's or an upload's body arrives at the client's pace, after the session and role
/// were checked: an owner's change to the account meanwhile (a lower role, a password
/// reset) wins, and nothing is changed.
#[test]
fn a_form_or_upload_sent_slowly_is_checked_again_when_it_has_arrived() {
    let (f, olivia) = signed_in(&item("reader", "per_device", 10, ""));
    let admins = |fields: &[(&str, &str)], action: &str, done: &str| {
        let answer = admins_post(&olivia, action, fields);
        assert!(answer.body.contains(done), "{}", answer.body);
    };
    admins(
        &[("name", "max"), ("role", "manager"), ("password", PASSWORD)],
        "create",
        "Admin max created",
    );
    let (max, _) = sign_in(&f, "max", PASSWORD);
    let token = csrf(&max.get("/").body);
    let trial_off = || hidden(&olivia.get("/handshakes").body, "trial") == "on";
    assert!(trial_off());

    // A form: max turns the public trial on while olivia makes him an auditor.
    let form = format!("csrf={token}&trial=on");
    let (status, answer) = post_slowly(
        &f,
        &max,
        "/handshakes/trial",
        "application/x-www-form-urlencoded",
        form.as_bytes(),
        || {
            admins(
                &[("name", "max"), ("role", "auditor")],
                "role",
                "max is now auditor",
            )
        },
    );
    assert_eq!(status, 403, "{answer}");
    assert!(trial_off(), "the trial stayed off");

    // An upload: max imports a license while olivia resets his password (which signs him out).
    admins(
        &[("name", "max"), ("role", "manager")],
        "role",
        "max is now manager",
    );
    let renewal = items_file("LIC-T", &item("reader", "per_device", 50, ""));
    let file = std::fs::read(
        f.vendor
            .issue_file(&f.data, &renewal, &["--version", "2"], "v2.lic"),
    )
    .unwrap();
    let boundary = "keygate-test-boundary-7d2f";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{token}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"v2.lic\"\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&file);
    body.extend(format!("\r\n--{boundary}--\r\n").bytes());
    let (status, answer) = post_slowly(
        &f,
        &max,
        "/licenses",
        &format!("multipart/form-data; boundary={boundary}"),
        &body,
        || {
            admins(
                &[("name", "max"), ("password", "a new password for max")],
                "password",
                "Password of max reset",
            )
        },
    );
    assert_eq!(status, 303, "signed out: {answer}");
    assert_eq!(f.item_value("LIC-T-1", "quota"), 10, "not imported");
}

/// Sign-in checks the password against the account as it was read; the session starts only
/// if the account is still that one: an owner's reset or removal while the check waited for
/// its Argon2 slot wins.
#[test]
fn a_sign_in_loses_to_a_reset_or_removal_made_while_it_waited() {
    let (f, olivia) = signed_in(&item("reader", "per_device", 10, ""));
    let admins = |fields: &[(&str, &str)], action: &str| admins_post(&olivia, action, fields).body;
    for (name, change) in [("max", "delete"), ("mia", "password")] {
        let created = admins(
            &[("name", name), ("role", "manager"), ("password", PASSWORD)],
            "create",
        );
        assert!(created.contains("created"), "{created}");
        // Olivia in a second browser, which the reset's thread takes.
        let (owner, _) = sign_in(&f, "olivia", PASSWORD);
        std::thread::scope(|s| {
            let busy = hold_argon2(&f.app.state, Passwords::Portal, 1);
            // A reset hashes the new password: it queues for the slot ahead of the sign-in.
            let reset = (change == "password").then(|| {
                let reset = s.spawn(move || {
                    let fields = [("name", name), ("password", "another password!")];
                    admins_post(&owner, "password", &fields).body
                });
                assert!(!ends_within(&reset, 1), "the reset waits for the slot");
                reset
            });
            let signing_in = s.spawn(|| sign_in(&f, name, PASSWORD));
            assert!(
                !ends_within(&signing_in, 1),
                "the sign-in waits for the slot"
            );
            if change == "delete" {
                assert!(admins(&[("name", name)], "delete").contains("deleted"));
            }
            drop(busy);
            if let Some(reset) = reset {
                assert!(reset.join().unwrap().contains("reset"));
            }
            let (browser, answer) = signing_in.join().unwrap();
            assert!(
                answer.body.contains("Wrong name or password"),
                "{change}: {} {}",
                answer.status,
                answer.body
            );
            assert_eq!(
                browser.get("/").location,
                "/login",
                "{change}: not signed in"
            );
        });
    }
}

/// The public trial's switch takes `on` or `off`; any other value changes nothing.
#[test]
fn the_trial_switch_takes_on_or_off_only() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let page = browser.get("/handshakes");
    let token = csrf(&page.body);
    assert_eq!(hidden(&page.body, "trial"), "on", "off at first");
    let before = db_digest(&f.data.join("keygate.db"));
    let answer = browser.post("/handshakes/trial", &[("csrf", &token), ("trial", "yes")]);
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(
        answer.body.contains("Unknown trial setting"),
        "{}",
        answer.body
    );
    assert_eq!(db_digest(&f.data.join("keygate.db")), before);
    let answer = browser.post("/handshakes/trial", &[("csrf", &token), ("trial", "on")]);
    assert!(
        answer.body.contains("The public trial is on"),
        "{}",
        answer.body
    );
}

/// A write that waited for its Argon2 slot checks the session it came from, not only the
/// role of an admin by that name: a password reset made meanwhile (which signs the account
/// out, its role unchanged) wins.
#[test]
fn a_write_waiting_for_argon2_loses_to_a_reset_of_its_admin() {
    let (f, olivia) = signed_in(&item("reader", "per_device", 10, ""));
    let created = admins_post(
        &olivia,
        "create",
        &[("name", "bob"), ("role", "owner"), ("password", PASSWORD)],
    );
    assert!(
        created.body.contains("Admin bob created"),
        "{}",
        created.body
    );
    let (bob, _) = sign_in(&f, "bob", PASSWORD);
    let bobs = csrf(&bob.get("/admins").body);
    let (owner, _) = sign_in(&f, "olivia", PASSWORD);
    std::thread::scope(|s| {
        let busy = hold_argon2(&f.app.state, Passwords::Portal, 1);
        let reset = s.spawn(move || {
            let fields = [("name", "bob"), ("password", "another password!")];
            admins_post(&owner, "password", &fields).body
        });
        assert!(!ends_within(&reset, 1), "the reset waits for the slot");
        let create = s.spawn(move || {
            bob.post(
                "/admins/create",
                &[
                    ("csrf", &bobs),
                    ("name", "mallory"),
                    ("role", "owner"),
                    ("password", PASSWORD),
                ],
            )
        });
        assert!(!ends_within(&create, 1), "bob's create waits behind it");
        drop(busy);
        assert!(reset.join().unwrap().contains("Password of bob reset"));
        let answer = create.join().unwrap();
        assert!(
            answer
                .body
                .contains("Your account no longer has the role this needs"),
            "{}",
            answer.body
        );
    });
    assert!(!olivia.get("/admins").body.contains("mallory"));
}

/// Each model's own figures: a tokens item's balance and the end of its grace, a concurrent
/// item's devices active in this window and in the last whole one (just after a window
/// starts few devices have called in it) and its exceptions against `max_exceptions`, on the
/// dashboard and the item's page alike.
#[test]
fn the_pages_show_each_models_own_figures() {
    let (f, browser) = signed_in(&item(
        "ocr",
        "tokens",
        10,
        "tokens_per_pass = 4\ngrace_days = 10",
    ));
    for n in 1..=3 {
        f.authorized("ocr", n);
    }
    // 12 tokens spent of 10: in grace from now, for 10 days.
    let ends = test_epoch() + Duration::days(10);
    let ends = format!(
        "{} UTC",
        ends.format(&time::macros::format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second]"
        ))
        .unwrap()
    );
    let dashboard = browser.get("/").body;
    assert!(
        dashboard.contains("balance: -2") && dashboard.contains(&format!("grace ends {ends}")),
        "{dashboard}"
    );
    let page = browser.get("/licenses/items/LIC-T-1").body;
    assert!(
        page.contains("<th>Token balance</th><td>-2</td>")
            && page.contains(&format!("<th>Grace ends</th><td>{ends}</td>"))
            && page.contains("12 of 10 (tokens spent)")
            && !page.contains("Windows over quota"),
        "{page}"
    );

    let (f, browser) = signed_in(&item(
        "viewer",
        "concurrent_device",
        2,
        "max_exceptions = 5",
    ));
    for n in 1..=3 {
        f.authorized("viewer", n);
    }
    let page = browser.get("/licenses/items/LIC-T-1").body;
    assert!(
        page.contains("3 of 2 (devices active in this 3-minute window; 0 in the last one)")
            && page.contains("<th>Windows over quota</th><td>1 of 5")
            && page.contains("state-tolerance")
            && !page.contains("Token balance"),
        "{page}"
    );
    // The next window has begun and no device has called in it yet: the last one had 3.
    f.app.clock.advance(Duration::seconds(180));
    let page = browser.get("/licenses/items/LIC-T-1").body;
    assert!(
        page.contains("0 of 2 (devices active in this 3-minute window; 3 in the last one)"),
        "{page}"
    );
    let dashboard = browser.get("/").body;
    let row = &dashboard[dashboard.find("<tr id=\"item-LIC-T-1\"").unwrap()..];
    assert!(row.contains("<small>last window: 3</small>"), "{row}");
}

/// A device's lease reads expired once its authorization has (as a usage call finds it), and
/// a device not blocked reads "allowed", not "active", however long ago it called.
#[test]
fn a_lease_past_its_authorization_reads_expired() {
    let (f, browser) = signed_in(&item("reader", "per_device", 10, ""));
    let uuid = f.authorized("reader", 1).device_uuid;
    let page = browser.get(&format!("/devices/{uuid}")).body;
    assert!(page.contains("<td>active</td></tr>"), "{page}");
    f.app.clock.advance(Duration::days(8));
    let (browser, _) = sign_in(&f, "olivia", PASSWORD); // the session ended meanwhile
    let page = browser.get(&format!("/devices/{uuid}")).body;
    assert!(
        page.contains("<td>expired</td></tr>") && !page.contains("<td>active</td>"),
        "{page}"
    );
    let list = browser.get("/devices").body;
    assert!(
        list.contains(">allowed<") && !list.contains(">active<"),
        "{list}"
    );
    // The public trial ends at its expiry exactly (its record does not lag).
    assert!(keygate(&f.data, &["trial", "on"]).ok);
    let mut trial = f.request("reader", 2);
    trial.as_object_mut().unwrap().remove("handshake_code");
    let (status, body) = f.authorize(&trial);
    assert_eq!(status, 200, "{body}");
    let uuid = f.verify(&body, 2).device_uuid;
    f.app.clock.advance(Duration::days(7));
    let (browser, _) = sign_in(&f, "olivia", PASSWORD);
    let page = browser.get(&format!("/devices/{uuid}")).body;
    assert!(page.contains("<td>trial</td>"), "{page}");
    assert!(page.contains("<td>expired</td></tr>"), "{page}");
}

/// A device's pages at scale and across renewals: seats in an item a newer license withdrew
/// serve nothing and are not counted (nor offered as a filter); a device with more leases
/// than a page shows (a terminal server, a lease per user) says how many it holds; an action
/// on a device that does not exist is a 404.
#[test]
fn device_pages_count_what_serves_and_show_a_bounded_page() {
    let (f, browser) = signed_in(&item("reader", "per_device", 1000, ""));
    let device = f.authorized("reader", 1).device_uuid;
    for user in 0..201 {
        let mut request = f.request("reader", 1);
        request["device"]["user"] = json!(format!("user{user:03}"));
        assert_eq!(f.authorize(&request).0, 200);
    }
    let page = browser.get(&format!("/devices/{device}")).body;
    assert!(
        page.contains("The first 200 of 202 leases.")
            && page.matches("<tr><td>reader</td>").count() == 200,
        "{page}"
    );
    let seats = |list: &str| {
        let row = &list[list.find(&format!("<tr id=\"device-{device}\"")).unwrap()..];
        let cell = row.split("<td class=\"num seats\">").nth(1).unwrap();
        cell.split('<').next().unwrap().to_string()
    };
    assert_eq!(seats(&browser.get("/devices").body), "1");

    f.import(
        "LIC-T",
        &item("reader", "per_device", 1000, "item_id = \"LIC-T-NEW\""),
        &["--version", "2"],
    );
    let list = browser.get("/devices").body;
    assert_eq!(
        seats(&list),
        "0",
        "the withdrawn item's seat serves nothing"
    );
    assert!(
        list.contains("<option>LIC-T-NEW</option>") && !list.contains("<option>LIC-T-1</option>"),
        "{list}"
    );
    let page = browser.get(&format!("/devices/{device}")).body;
    assert!(
        page.contains("LIC-T-1</a> (withdrawn: serves nothing)"),
        "{page}"
    );

    let token = csrf(&list);
    let answer = browser.post(
        "/devices/00000000-0000-4000-8000-00000000ffff/block",
        &[("csrf", &token)],
    );
    assert_eq!(answer.status, 404, "{}", answer.body);
    assert!(answer.body.contains("No such device."), "{}", answer.body);
}

/// A seat that lapsed counts no more from the moment it lapses, on the pages as for a new
/// device, not only once the alerts job frees it.
#[test]
fn a_lapsed_seat_is_not_counted_on_the_pages() {
    let (f, _) = signed_in(&item("reader", "per_active_device", 1, ""));
    f.authorized("reader", 1);
    f.app.clock.advance(Duration::days(90));
    let (browser, _) = sign_in(&f, "olivia", PASSWORD);
    let dashboard = browser.get("/").body;
    let row = &dashboard[dashboard.find("<tr id=\"item-LIC-T-1\"").unwrap()..];
    assert!(
        row.contains("<td class=\"num\">0</td>") && !row.contains("state-full"),
        "{row}"
    );
    let page = browser.get("/licenses/items/LIC-T-1").body;
    assert!(page.contains("0 of 1 (devices with a seat)"), "{page}");
    f.authorized("reader", 2);
}
