//! A device from the command line: authorize against a keygate appliance, check the stored
//! authorization offline, record usage, report it, release the seat.
//!
//! ```text
//! cargo run -p keygate-sdk --example device -- \
//!     --url https://127.0.0.1:8443 --ca appliance.pem --vendor-key vendor.pub \
//!     --product barcode-reader --handshake ACME-LAB authorize
//! cargo run -p keygate-sdk --example device -- ... use LIC-0042-1 scans 5
//! cargo run -p keygate-sdk --example device -- ... flush
//! cargo run -p keygate-sdk --example device -- ... run --every 10
//! ```
//!
//! The state (authorization, usage not yet reported, the device UUID unless `--device-uuid`
//! is given) lives in `--state` (default `./device-state`). Run one command at a time per
//! state directory: the client locks it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use keygate_sdk::client::{Client, ClientConfig, ClientError, FlushOutcome, Grant, TlsTrust};
use keygate_sdk::keys;
use keygate_sdk::wire::{DeviceInfo, ErrorCode, Validation};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, Parser)]
#[command(about = "A keygate device: authorize, check, record and report usage, release")]
struct Cli {
    /// Appliance base URL, e.g. https://10.0.0.5:8443 (repeat for fallbacks).
    #[arg(long = "url", required = true, value_name = "URL")]
    urls: Vec<String>,
    /// The vendor's public key (SPKI PEM), as embedded in the product (repeatable).
    #[arg(long = "vendor-key", required = true, value_name = "FILE")]
    vendor_keys: Vec<PathBuf>,
    /// Handshake code that selects the license items.
    #[arg(long, value_name = "CODE")]
    handshake: Option<String>,
    /// Organization id (alone: its default handshake code).
    #[arg(long, value_name = "ID")]
    organization: Option<String>,
    /// Session password of the handshake code.
    #[arg(long, env = "DEVICE_SESSION_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Product name, as in the license items.
    #[arg(long)]
    product: String,
    /// Device UUID (default: one generated once and kept in the state directory).
    #[arg(long, value_name = "UUID")]
    device_uuid: Option<String>,
    /// Instance id (concurrent_instance licenses).
    #[arg(long)]
    instance: Option<String>,
    /// User name (tokens licenses; default: the device counts as the user).
    #[arg(long)]
    user: Option<String>,
    /// Domain to present to the handshake code's validation.
    #[arg(long)]
    domain: Option<String>,
    /// Process name to present to the handshake code's validation.
    #[arg(long)]
    process: Option<String>,
    /// State directory.
    #[arg(long, default_value = "device-state", value_name = "DIR")]
    state: PathBuf,
    /// Trust only this certificate (PEM): the appliance's own, or the CA that issued it.
    #[arg(long, value_name = "FILE", required_unless_present = "insecure")]
    ca: Option<PathBuf>,
    /// Accept any certificate (labs only: the session password is then exposed to a man in
    /// the middle; authorizations are still verified up to the vendor key).
    #[arg(long, conflicts_with = "ca")]
    insecure: bool,
    /// Seconds between usage reports.
    #[arg(long, default_value_t = keygate_sdk::wire::REPORT_INTERVAL_S, value_name = "SECONDS")]
    report_interval: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ask the appliance for an authorization and verify it.
    Authorize,
    /// Verify the stored authorization offline.
    Check,
    /// Record usage: `use ITEM COUNTER N`.
    Use {
        item: String,
        counter: String,
        amount: u64,
    },
    /// Report the recorded usage now (and renew the authorization).
    Flush,
    /// Report usage and give the seat back.
    Release,
    /// Show the local state.
    Status,
    /// Stay running: check the authorization, report usage on schedule, print the status.
    Run {
        /// Seconds between two rounds.
        #[arg(long, default_value_t = 10, value_name = "SECONDS")]
        every: u64,
        /// Usage to record each round, as ITEM:COUNTER:N.
        #[arg(long = "use", value_name = "ITEM:COUNTER:N")]
        usage: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let usage = match &cli.command {
        Command::Run { usage, .. } => usage
            .iter()
            .map(|spec| parse_usage(spec))
            .collect::<Result<Vec<_>, _>>()?,
        _ => Vec::new(),
    };
    let mut client = client(&cli)?;
    match cli.command {
        Command::Authorize => print_grant("authorized", &client.authorize().map_err(describe)?),
        Command::Check => print_grant("valid", &client.check().map_err(describe)?),
        Command::Use {
            item,
            counter,
            amount,
        } => {
            client.record(&item, &counter, amount).map_err(describe)?;
            let status = client.status();
            let total = status
                .open_counters
                .get(&item)
                .and_then(|counters| counters.get(&counter))
                .copied()
                .unwrap_or(0);
            println!("recorded {amount} {counter} on {item} ({total} in the open period)");
        }
        Command::Flush => print_flush(&client.flush().map_err(describe)?),
        Command::Release => {
            client.release().map_err(describe)?;
            if client.status().lease_id.is_some() {
                println!("a public trial is kept, not released (a device gets one)");
            } else {
                println!("released; the authorization is forgotten");
            }
            print_status(&client);
        }
        Command::Status => print_status(&client),
        Command::Run { every, .. } => {
            run_loop(&mut client, Duration::from_secs(every.max(1)), &usage)?;
        }
    }
    Ok(())
}

fn client(cli: &Cli) -> Result<Client, String> {
    let vendor_keys = cli
        .vendor_keys
        .iter()
        .map(|path| {
            let pem = read_text(path)?;
            keys::public_key_from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tls = match &cli.ca {
        Some(path) => TlsTrust::Pinned(read_text(path)?.into_bytes()),
        None => TlsTrust::AcceptAnyCertificate,
    };
    let uuid = match &cli.device_uuid {
        Some(uuid) => uuid.clone(),
        None => stored_device_uuid(&cli.state)?,
    };
    let device = DeviceInfo {
        uuid,
        instance: cli.instance.clone(),
        user: cli.user.clone(),
        name: hostname(),
    };
    let mut config = ClientConfig::new(
        cli.urls.clone(),
        vendor_keys,
        cli.product.clone(),
        device,
        cli.state.clone(),
        tls,
    );
    config.handshake_code = cli.handshake.clone();
    config.organization_id = cli.organization.clone();
    config.session_password = cli.password.clone();
    if cli.domain.is_some() || cli.process.is_some() {
        config.validation = Some(Validation {
            domain: cli.domain.clone(),
            process: cli.process.clone(),
        });
    }
    config.report_interval = Duration::from_secs(cli.report_interval.max(1));
    Client::new(config).map_err(describe)
}

/// A device UUID generated on first use and kept next to the client's state.
fn stored_device_uuid(state: &Path) -> Result<String, String> {
    let path = state.join("device-uuid");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    // Written whole or not at all (a torn file would make a new device of this one).
    let uuid = uuid::Uuid::new_v4().to_string();
    let tmp = state.join("device-uuid.tmp");
    std::fs::create_dir_all(state)
        .and_then(|()| {
            let mut file = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut file, format!("{uuid}\n").as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(uuid)
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .or_else(|_| std::env::var("COMPUTERNAME"))
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
}

fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_usage(spec: &str) -> Result<(String, String, u64), String> {
    let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
    match parts[..] {
        [amount, counter, item] if !item.is_empty() && !counter.is_empty() => amount
            .parse()
            .map(|amount| (item.to_string(), counter.to_string(), amount))
            .map_err(|_| format!("--use {spec}: N is not a number")),
        _ => Err(format!("--use {spec}: expected ITEM:COUNTER:N")),
    }
}

/// Refusals another try cannot change: a person must fix the configuration (or the admin the
/// code). Retrying a wrong session password every round would also use up the code's
/// password checks that devices with the right one need (`RATE_LIMITED`).
fn needs_a_person(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::SessionPasswordMismatch
            | ErrorCode::ValidationFailed
            | ErrorCode::HandshakeNotFound
            | ErrorCode::HandshakeRequired
            | ErrorCode::DeviceBlocked
    )
}

/// Works until stopped (Ctrl-C), or until an authorization is refused for a reason only a
/// person can fix (the error).
fn run_loop(
    client: &mut Client,
    every: Duration,
    usage: &[(String, String, u64)],
) -> Result<(), String> {
    println!(
        "running: a round every {}s, usage reports every {}s; Ctrl-C to stop",
        every.as_secs(),
        client.config().report_interval.as_secs()
    );
    loop {
        let valid = match client.check() {
            Ok(grant) => Some(grant),
            // A clock set back (or fast, then corrected) recovers by authorizing again when
            // the appliance is in reach: it vouches for the time, and the device clock's
            // offset is measured anew. Out of reach, a clock set back stays refused. A state
            // directory authorized for another product or other settings (`--user` changed)
            // authorizes for these.
            Err(
                ClientError::NotAuthorized
                | ClientError::Expired { .. }
                | ClientError::ClockRolledBack { .. }
                | ClientError::OtherSettings { .. }
                | ClientError::WrongProduct { .. },
            ) => match client.authorize() {
                Ok(grant) => {
                    print_grant("authorized", &grant);
                    Some(grant)
                }
                Err(e) if e.code().is_some_and(needs_a_person) => {
                    return Err(format!(
                        "{}; stopped: run again once it is fixed",
                        describe(e)
                    ));
                }
                Err(e) => {
                    println!("{}  not working: {}", stamp(), describe(e));
                    None
                }
            },
            Err(e) => {
                println!("{}  not working: {}", stamp(), describe(e));
                None
            }
        };
        if let Some(grant) = &valid {
            for (item, counter, amount) in usage {
                if let Err(e) = client.record(item, counter, *amount) {
                    println!("{}  cannot record on {item}: {}", stamp(), describe(e));
                }
            }
            let status = client.status();
            println!(
                "{}  working: {}, until {}, {} report(s) pending, next report in {}s",
                stamp(),
                state_name(grant),
                rfc3339(grant.expires_at()),
                status.pending_reports,
                client.next_tick_in().as_secs_f64().ceil()
            );
        }
        match client.tick() {
            None => {}
            Some(Ok(outcome)) => print_flush(&outcome),
            Some(Err(e)) => println!("{}  report failed: {}", stamp(), describe(e)),
        }
        std::thread::sleep(every);
    }
}

fn print_grant(verb: &str, grant: &Grant) {
    let auth = &grant.authorization;
    println!(
        "{verb} until {} (state {}, lease {}, appliance {})",
        rfc3339(auth.expires_at),
        state_name(grant),
        auth.lease_id,
        auth.installation_id
    );
    println!(
        "license {} v{} from {} for organization {}, handshake code {}",
        grant.license.license_id,
        grant.license.version,
        grant.license.vendor,
        auth.organization_id,
        auth.handshake_code
    );
    for item in &auth.items {
        let features = if item.features.is_empty() {
            "-".to_string()
        } else {
            item.features.join(", ")
        };
        println!(
            "  item {} ({}) until {}, features: {features}",
            item.item_id,
            item.model,
            rfc3339(item.expires_at)
        );
    }
}

fn print_flush(outcome: &FlushOutcome) {
    println!(
        "{}  reported {} report(s): accepted {}, duplicates {}, acked seq {}, pending {}",
        stamp(),
        outcome.sent,
        outcome.accepted,
        outcome.duplicates,
        outcome.acked_seq,
        outcome.pending
    );
    if outcome.reauthorized {
        println!("  the appliance had lost the lease: authorized again");
    }
    if let Some(grant) = &outcome.renewed {
        println!(
            "  renewed until {} (state {})",
            rfc3339(grant.expires_at()),
            state_name(grant)
        );
    }
    if let Some(error) = &outcome.renewal_error {
        let then = if matches!(
            error.code,
            ErrorCode::DeviceBlocked | ErrorCode::LeaseRevoked
        ) {
            "the authorization is dropped: the product stops until authorized again"
        } else {
            "works offline until the current authorization expires"
        };
        println!("  not renewed [{}]: {} ({then})", error.code, error.message);
    }
}

fn print_status(client: &Client) {
    let status = client.status();
    let time = |t: Option<OffsetDateTime>| t.map_or_else(|| "-".to_string(), rfc3339);
    println!("device {}", client.config().device.uuid);
    println!("stream {} next seq {}", status.stream, status.next_seq);
    println!(
        "lease {} authorized until {}",
        status.lease_id.as_deref().unwrap_or("-"),
        time(status.authorized_until)
    );
    println!(
        "pending reports {}, last contact {}, newest time seen {}",
        status.pending_reports,
        time(status.last_contact),
        time(status.newest_time_seen)
    );
    for (item, counters) in &status.open_counters {
        for (counter, amount) in counters {
            println!(
                "open period since {}: {item} {counter} {amount}",
                time(status.open_since)
            );
        }
    }
}

/// The error's text: an appliance's refusal carries its protocol code (`QUOTA_EXCEEDED: ...`).
fn describe(e: ClientError) -> String {
    e.to_string()
}

fn state_name(grant: &Grant) -> &'static str {
    match grant.state() {
        keygate_sdk::wire::AuthorizationState::Ok => "ok",
        keygate_sdk::wire::AuthorizationState::Tolerance => "tolerance (over quota)",
        keygate_sdk::wire::AuthorizationState::Grace => "grace (tokens balance negative)",
    }
}

fn stamp() -> String {
    rfc3339(OffsetDateTime::now_utc())
}

/// RFC 3339 to the second.
fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}
