//! Issue 4 ("Done when"): a real headless Chromium drives the real portal over HTTPS.
//!
//! The browser is Debian's `chromium`, driven through Debian's `chromium-driver` (the two come
//! from the same source package, so their versions always match); `scripts/test` installs them
//! on a fresh machine. chromedriver listens on a loopback port the system chose and fantoccini
//! talks plain HTTP to it; the appliance is the in-process server of `Fixture` with its
//! self-signed certificate, which the browser session accepts (`acceptInsecureCerts`).
//!
//! Everything the admin does happens by clicking and typing in the browser; only the device
//! side (authorize) goes through the client API, as a real device would.
#![cfg(unix)] // chromedriver's process group; Debian's chromium

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::helpers::*;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const PASSWORD: &str = "correct horse battery";
const NEW_PASSWORD: &str = "a brand new passphrase";
/// How long one browser condition may take to come true (pages load in milliseconds; this
/// only bounds a broken run on a slow, busy CI machine).
const CONDITION: Duration = Duration::from_secs(30);
/// How long the whole scenario may take before the test fails instead of hanging.
const SCENARIO: Duration = Duration::from_secs(180);

/// A running chromedriver on a loopback port, in its own process group so that dropping it
/// kills chromedriver and every browser process it started, also when the test panics.
struct Chromedriver {
    child: Child,
    port: u16,
    /// Chromium's profile; fresh for each run, removed after the processes are gone.
    profile: tempfile::TempDir,
    log: PathBuf,
}

impl Chromedriver {
    fn start() -> Chromedriver {
        assert!(
            Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists(),
            "{CHROMEDRIVER} or {CHROMIUM} is missing: the browser test needs Debian's `chromium` \
             and `chromium-driver` packages. `scripts/test` installs them; by hand: \
             apt-get install --no-install-recommends chromium chromium-driver fonts-liberation"
        );
        // The port is free when chosen but could be taken before chromedriver binds it: then
        // chromedriver exits, and another port is tried.
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Chromedriver::try_start() {
                Ok(driver) => return driver,
                Err(why) => failures.push(why),
            }
        }
        panic!("chromedriver did not start:\n{}", failures.join("\n---\n"));
    }

    fn try_start() -> Result<Chromedriver, String> {
        let port = {
            let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("a free port");
            probe.local_addr().unwrap().port()
        };
        let profile = tempfile::tempdir().unwrap();
        let log = profile.path().join("chromedriver.log");
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Chromium inherits these: its config, cache and crash reports stay in the
                // temporary directory instead of the user's home.
                .env("XDG_CONFIG_HOME", profile.path().join("config"))
                .env("XDG_CACHE_HOME", profile.path().join("cache"))
                .process_group(0)
                .spawn()
                .map_err(|e| format!("{CHROMEDRIVER} does not run: {e}"))?
        };
        let mut driver = Chromedriver {
            child,
            port,
            profile,
            log,
        };
        let deadline = Instant::now() + CONDITION;
        loop {
            if driver.ready() {
                return Ok(driver);
            }
            if let Ok(Some(status)) = driver.child.try_wait() {
                return Err(format!(
                    "chromedriver exited ({status}) on port {port}:\n{}",
                    driver.log_tail()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "chromedriver not ready on port {port} after {CONDITION:?}:\n{}",
                    driver.log_tail()
                ));
            }
            // Polling a condition, not waiting a fixed time: each round asks again.
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Whether chromedriver answers `GET /status` with `ready: true`.
    fn ready(&self) -> bool {
        self.get("/status")
            .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
            .is_some_and(|status| status["value"]["ready"] == true)
    }

    /// The body of a plain `GET` to chromedriver (no client library: also used from `Drop`).
    fn get(&self, path: &str) -> Option<String> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).ok()?;
        // chromedriver keeps the connection open: read up to Content-Length, not to the end.
        let text = crate::helpers::read_answer(&mut stream).ok()?;
        text.split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A new headless Chromium session that trusts the appliance's self-signed certificate.
    async fn session(&self) -> Client {
        let args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--no-first-run".into(),
            // Only the loopback appliance is visited: never through a proxy from the environment.
            "--no-proxy-server".into(),
            "--window-size=1280,900".into(),
            format!(
                "--user-data-dir={}",
                self.profile.path().join("profile").display()
            ),
        ];
        let capabilities = json!({
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "timeouts": {"pageLoad": 30_000, "script": 10_000, "implicit": 0},
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&self.url())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "no browser session from chromedriver: {e}\n{}",
                    self.log_tail()
                )
            })
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // Politely first: chromedriver's /shutdown quits its browsers and exits, reaping them.
        let _ = self.get("/shutdown");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        // Then for certain: the whole group, chromedriver and the Chromium it started.
        let group = format!("-{}", self.child.id());
        let killed = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !killed {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The first-admin setup link's path (`/setup?token=...`), as `keygate serve` prints it.
fn setup_path(app: &TestApp) -> String {
    let conn = keygate::store::open(&app.data_dir.join("keygate.db")).unwrap();
    keygate::portal::auth::setup_link(&conn, app.clock_now().unix_timestamp())
        .unwrap()
        .expect("no admin yet, so a setup link")
}

/// Waits until an element is on the page, with a message naming it if it never comes.
async fn wait_for(c: &Client, what: Locator<'_>) -> Element {
    match c.wait().at_most(CONDITION).for_element(what).await {
        Ok(element) => element,
        Err(e) => {
            let url = c.current_url().await.map(String::from).unwrap_or_default();
            let source = c.source().await.unwrap_or_default();
            panic!("{what:?} did not appear ({e}) on {url}:\n{source}")
        }
    }
}

/// Types into the form field named `name` (after clearing it).
async fn type_into(c: &Client, name: &str, text: &str) {
    let field = wait_for(c, Locator::Css(&format!("input[name='{name}']"))).await;
    field.clear().await.unwrap();
    field.send_keys(text).await.unwrap();
}

/// Clicks the button with exactly this text.
async fn click_button(c: &Client, text: &str) {
    wait_for(
        c,
        Locator::XPath(&format!("//button[normalize-space()='{text}']")),
    )
    .await
    .click()
    .await
    .unwrap();
}

/// The XPath of the devices-table row of device `uuid`: the row with a cell whose text is the
/// UUID (however the cell marks it up).
fn device_row(uuid: &str) -> String {
    format!("//tr[td[normalize-space()='{uuid}']]")
}

/// Clicks a button (Block, Unblock, Remove) in the row of device `uuid`.
async fn click_in_row(c: &Client, uuid: &str, button: &str) {
    let xpath = format!("{}//button[normalize-space()='{button}']", device_row(uuid));
    wait_for(c, Locator::XPath(&xpath))
        .await
        .click()
        .await
        .unwrap();
}

async fn path_of(c: &Client) -> String {
    c.current_url().await.unwrap().path().to_string()
}

/// Where kept test artifacts go: `target/test-artifacts`.
fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is inside the target directory")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn admin_runs_the_appliance_in_a_real_browser() {
    let f = Fixture::new(&item("reader", "per_device", 10, ""));
    let driver = Chromedriver::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        tokio::time::timeout(SCENARIO, scenario(&f, &driver))
            .await
            .unwrap_or_else(|_| panic!("the browser scenario took more than {SCENARIO:?}"));
    });
}

async fn scenario(f: &Fixture, driver: &Chromedriver) {
    let c = driver.session().await;

    // First admin: the setup link, the form filled in by typing, submitted by clicking.
    c.goto(&f.app.url(&setup_path(&f.app))).await.unwrap();
    wait_for(
        &c,
        Locator::XPath("//h2[normalize-space()='Create the first admin']"),
    )
    .await;
    type_into(&c, "name", "olivia").await;
    type_into(&c, "password", PASSWORD).await;
    type_into(&c, "confirm", PASSWORD).await;
    click_button(&c, "Create and sign in").await;

    // The dashboard with the license item.
    let row = wait_for(&c, Locator::Id("item-LIC-T-1")).await;
    let text = row.text().await.unwrap();
    assert!(
        text.contains("LIC-T-1") && text.contains("per_device"),
        "{text}"
    );
    assert_eq!(path_of(&c).await, "/");
    wait_for(
        &c,
        Locator::XPath("//span[normalize-space()='olivia (owner)']"),
    )
    .await;
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG screenshot");
    std::fs::write(artifacts_dir().join("dashboard.png"), &png).unwrap();

    // A device authorizes over the client API and shows on the Devices page.
    let uuid = device_uuid(1);
    let (status, body) = f.authorize(&f.request("reader", 1));
    assert_eq!(status, 200, "{body}");
    wait_for(&c, Locator::LinkText("Devices"))
        .await
        .click()
        .await
        .unwrap();
    wait_for(&c, Locator::XPath(&device_row(&uuid))).await;
    assert_eq!(path_of(&c).await, "/devices");

    // Block: the page comes back with Unblock in the row, and the device is refused.
    click_in_row(&c, &uuid, "Block").await;
    let unblock = format!("{}//button[normalize-space()='Unblock']", device_row(&uuid));
    wait_for(&c, Locator::XPath(&unblock)).await;
    assert_eq!(f.refused("reader", 1), "DEVICE_BLOCKED");

    // Unblock, then Remove: the seat is freed.
    click_in_row(&c, &uuid, "Unblock").await;
    let block = format!("{}//button[normalize-space()='Block']", device_row(&uuid));
    wait_for(&c, Locator::XPath(&block)).await;
    let seats = format!("{}/td[6]", device_row(&uuid));
    let held = wait_for(&c, Locator::XPath(&seats))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(held, "1", "the device holds its seat before Remove");
    click_in_row(&c, &uuid, "Remove").await;
    // The page after Remove: the device's row either is gone or shows 0 seats.
    let after_remove = format!(
        "//main[not(.{row})] | {row}[td[6][normalize-space()='0']]",
        row = device_row(&uuid)
    );
    wait_for(&c, Locator::XPath(&after_remove)).await;
    assert_eq!(f.item_value("LIC-T-1", "seats_used"), 0);

    // A hostile device name is shown as text, never run as script.
    let hostile = "<script>window.__x=1</script>";
    let mut request = f.request("reader", 2);
    request["device"]["name"] = json!(hostile);
    let (status, body) = f.authorize(&request);
    assert_eq!(status, 200, "{body}");
    wait_for(&c, Locator::LinkText("Devices"))
        .await
        .click()
        .await
        .unwrap();
    let name_cell = format!("{}/td[2]", device_row(&device_uuid(2)));
    let shown = wait_for(&c, Locator::XPath(&name_cell))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(shown, hostile, "the name is shown as typed, as text");
    let not_run = c
        .execute("return window.__x === undefined", vec![])
        .await
        .unwrap();
    assert_eq!(
        not_run,
        json!(true),
        "the hostile name's script did not run"
    );

    // A license renewal uploaded through the Licenses page's file input.
    let renewal = items_file("LIC-T", &item("reader", "per_device", 25, ""));
    let file = f
        .vendor
        .issue_file(&f.data, &renewal, &["--version", "2"], "renewal.lic");
    c.goto(&f.app.url("/licenses")).await.unwrap();
    wait_for(
        &c,
        Locator::Css("form[action='/licenses'] input[name='file']"),
    )
    .await
    .send_keys(file.to_str().unwrap())
    .await
    .unwrap();
    click_button(&c, "Import").await;
    let notice = wait_for(&c, Locator::Css("p.notice"))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        notice.contains("version 2 supersedes version 1"),
        "{notice}"
    );
    assert_eq!(f.item_value("LIC-T-1", "quota"), 25);

    // A handshake code with a session password and an allowed domain, serving the item.
    c.goto(&f.app.url("/handshakes")).await.unwrap();
    // The browser itself refuses a code with characters the appliance does not take (a
    // pattern the browser cannot compile is ignored: Chromium compiles it in `v` mode).
    for (code, valid) in [("bad code!", false), ("", true)] {
        let checked = c
            .execute(
                "const i = document.querySelector(\"form[action='/handshakes/create'] \
                 input[name='code']\"); i.value = arguments[0]; return i.checkValidity();",
                vec![serde_json::json!(code)],
            )
            .await
            .unwrap();
        assert_eq!(checked, serde_json::json!(valid), "{code:?}");
    }
    wait_for(
        &c,
        Locator::Css("form[action='/handshakes/create'] input[name='code']"),
    )
    .await
    .send_keys("PLANT-B")
    .await
    .unwrap();
    click_button(&c, "Create").await;
    wait_for(
        &c,
        Locator::XPath("//p[@class='notice'][contains(., 'PLANT-B created')]"),
    )
    .await;
    wait_for(
        &c,
        Locator::Css("#code-PLANT-B form[action='/handshakes/password'] input[name='password']"),
    )
    .await
    .send_keys("plant-b secret")
    .await
    .unwrap();
    wait_for(
        &c,
        Locator::Css("#code-PLANT-B form[action='/handshakes/password'] button"),
    )
    .await
    .click()
    .await
    .unwrap();
    wait_for(
        &c,
        Locator::XPath("//p[@class='notice'][contains(., 'Session password of PLANT-B set')]"),
    )
    .await;
    wait_for(&c, Locator::Css("#code-PLANT-B textarea[name='domains']"))
        .await
        .send_keys("*.plant-b.local")
        .await
        .unwrap();
    wait_for(
        &c,
        Locator::XPath(
            "//section[@id='code-PLANT-B']//button[normalize-space()='Save validation fields']",
        ),
    )
    .await
    .click()
    .await
    .unwrap();
    wait_for(
        &c,
        Locator::XPath("//p[@class='notice'][contains(., 'Validation fields of PLANT-B saved')]"),
    )
    .await;
    wait_for(
        &c,
        Locator::XPath("//tr[td[normalize-space()='LIC-T-1']]//select[@name='code']"),
    )
    .await
    .select_by_value("PLANT-B")
    .await
    .unwrap();
    wait_for(
        &c,
        Locator::XPath(
            "//tr[td[normalize-space()='LIC-T-1']]//button[normalize-space()='Configure']",
        ),
    )
    .await
    .click()
    .await
    .unwrap();
    wait_for(
        &c,
        Locator::XPath("//p[@class='notice'][contains(., 'now served by PLANT-B')]"),
    )
    .await;
    let mut request = f.request("reader", 5);
    request["handshake_code"] = serde_json::json!("PLANT-B");
    request["session_password"] = serde_json::json!("plant-b secret");
    request["validation"] = serde_json::json!({"domain": "line2.plant-b.local"});
    assert_eq!(
        f.authorize(&request).0,
        200,
        "the device side sees the new code"
    );
    request["validation"] = serde_json::json!({"domain": "elsewhere.local"});
    assert_eq!(
        f.authorize(&request).1["error"]["code"],
        "VALIDATION_FAILED"
    );

    // Alert recipients, then the audit log shows who did all this.
    c.goto(&f.app.url("/alerts")).await.unwrap();
    type_into(&c, "recipients", "it@plant.test; boss@plant.test").await;
    click_button(&c, "Save recipients").await;
    wait_for(
        &c,
        Locator::XPath("//p[@class='notice'][contains(., 'Alert recipients saved (2)')]"),
    )
    .await;
    c.goto(&f.app.url("/audit")).await.unwrap();
    let log = wait_for(&c, Locator::Css("table"))
        .await
        .text()
        .await
        .unwrap();
    for action in [
        "license imported",
        "handshake create",
        "handshake password",
        "alert recipients set",
        "device removed",
        "first admin created",
    ] {
        assert!(
            log.contains(action),
            "the audit log lacks {action:?}:\n{log}"
        );
    }
    assert!(
        log.lines()
            .filter(|l| l.contains("device removed"))
            .all(|l| l.ends_with("127.0.0.1")),
        "who, and from where:\n{log}"
    );

    // An alert email's link, opened from another site (a webmail): the signed-in admin
    // lands on the item, not on the sign-in page.
    let link = f.app.url("/licenses/items/LIC-T-1");
    c.goto(&format!(
        "data:text/html,<a id=\"mail\" href=\"{link}\">LIC-T-1</a>"
    ))
    .await
    .unwrap();
    wait_for(&c, Locator::Id("mail"))
        .await
        .click()
        .await
        .unwrap();
    wait_for(&c, Locator::XPath("//h1[normalize-space()='Item LIC-T-1']")).await;
    assert_eq!(path_of(&c).await, "/licenses/items/LIC-T-1");

    // The admin's own account, from the name in the header: a new password.
    wait_for(
        &c,
        Locator::XPath("//header//a[normalize-space()='olivia']"),
    )
    .await
    .click()
    .await
    .unwrap();
    wait_for(&c, Locator::XPath("//h1[normalize-space()='Your account']")).await;
    type_into(&c, "current", PASSWORD).await;
    type_into(&c, "password", NEW_PASSWORD).await;
    type_into(&c, "confirm", NEW_PASSWORD).await;
    click_button(&c, "Change password").await;
    wait_for(
        &c,
        Locator::XPath("//p[@role='status'][contains(., 'Your password was changed')]"),
    )
    .await;

    // Sign out: back on the sign-in page, and the portal is closed again.
    click_button(&c, "Sign out").await;
    wait_for(&c, Locator::XPath("//h2[normalize-space()='Sign in']")).await;
    assert_eq!(path_of(&c).await, "/login");
    c.goto(&f.app.url("/devices")).await.unwrap();
    wait_for(&c, Locator::XPath("//h2[normalize-space()='Sign in']")).await;
    assert_eq!(path_of(&c).await, "/login", "signed out: sent to sign in");

    // Sign in again through the form, with the new password.
    type_into(&c, "name", "olivia").await;
    type_into(&c, "password", NEW_PASSWORD).await;
    click_button(&c, "Sign in").await;
    wait_for(&c, Locator::Id("item-LIC-T-1")).await;
    wait_for(
        &c,
        Locator::XPath("//span[normalize-space()='olivia (owner)']"),
    )
    .await;
    assert_eq!(path_of(&c).await, "/");

    // A clean end of the session closes Chromium; the guard kills whatever is left.
    c.close().await.unwrap();
}
