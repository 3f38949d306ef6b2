//! Running as a Windows service (compiled on Windows only).
//!
//! The MSI (`packaging/wix/main.wxs`) registers the service `keygate` with the command line
//! `keygate.exe --windows-service --config <ProgramData>\keygate\keygate.toml
//! --data-dir <ProgramData>\keygate serve`. `main` sees the leading `--windows-service`
//! ([`service_args`]), parses the rest as usual and hands the work to [`run`], which connects
//! to the service control manager (SCM) and runs it on the service thread. `cli::serve`
//! reports Running once the listener is bound ([`report_running`]); the SCM's Stop and
//! Shutdown controls end the server's shutdown future ([`until_stopped`]), the same graceful
//! shutdown as Ctrl-C.

use std::ffi::OsString;
use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use windows_service::service::{
    ServiceControl, ServiceControlAccept, ServiceExitCode, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{
    self, ServiceControlHandlerResult, ServiceStatusHandle,
};
use windows_service::{define_windows_service, service_dispatcher};

/// The service's name, as the MSI registers it.
pub const SERVICE_NAME: &str = "keygate";
/// The first argument of the service's command line: "started by the SCM".
pub const SERVICE_FLAG: &str = "--windows-service";

type Work = Box<dyn FnOnce() -> ExitCode + Send>;

/// What the service thread runs (set by [`run`] before the dispatcher starts).
static WORK: Mutex<Option<Work>> = Mutex::new(None);
/// How the work ended, for the process's exit code.
static OUTCOME: OnceLock<ExitCode> = OnceLock::new();
/// Set once the service registered its control handler; absent when not a service.
static STATUS: OnceLock<ServiceStatusHandle> = OnceLock::new();
/// Notified by the SCM's Stop or Shutdown control.
static STOP: tokio::sync::Notify = tokio::sync::Notify::const_new();
/// While the service starts: the first start after an upgrade backs the database up,
/// checks and migrates it, which may take longer than one wait hint.
static STARTING: AtomicBool = AtomicBool::new(false);
/// The progress reported while starting or stopping (the SCM takes a wait hint that passes
/// without a new checkpoint for a service that hangs).
static CHECKPOINT: AtomicU32 = AtomicU32::new(0);
/// How often a starting service tells the SCM it is still at work, and for how long at most
/// (the systemd unit allows the same 30 minutes).
const PROGRESS_EVERY: Duration = Duration::from_secs(20);
const START_AT_MOST: Duration = Duration::from_secs(30 * 60);

/// The command line without [`SERVICE_FLAG`] when it is the first argument, else `None`.
pub fn service_args() -> Option<Vec<OsString>> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|arg| arg == SERVICE_FLAG) {
        args.remove(1);
        Some(args)
    } else {
        None
    }
}

/// Runs `work` as the service `keygate`; returns when the service has stopped.
pub fn run(work: impl FnOnce() -> ExitCode + Send + 'static) -> ExitCode {
    *WORK.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(work));
    match service_dispatcher::start(SERVICE_NAME, ffi_service_main) {
        Ok(()) => OUTCOME.get().copied().unwrap_or(ExitCode::FAILURE),
        Err(e) => {
            eprintln!(
                "error: {SERVICE_FLAG} is for the Windows service manager only \
                 (run `keygate serve` in a console instead): {e}"
            );
            ExitCode::FAILURE
        }
    }
}

/// Tells the SCM the service is up (a no-op when not running as a service).
pub fn report_running() {
    report(ServiceState::Running, ServiceExitCode::NO_ERROR);
}

/// Completes when `signal` does or when the SCM asks the service to stop.
pub async fn until_stopped(signal: impl Future<Output = ()>) {
    tokio::select! {
        () = signal => {}
        () = STOP.notified() => {}
    }
}

define_windows_service!(ffi_service_main, service_main);

/// The service thread. Arguments given to the service's start request are ignored: the
/// service's command line is what counts.
fn service_main(_arguments: Vec<OsString>) {
    let handler = |control| match control {
        // Pre-shutdown comes first at a system shutdown, with more time than shutdown
        // gives (in-flight requests finish, the database closes cleanly).
        ServiceControl::Stop | ServiceControl::Preshutdown | ServiceControl::Shutdown => {
            report(ServiceState::StopPending, ServiceExitCode::NO_ERROR);
            STOP.notify_one();
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let Ok(handle) = service_control_handler::register(SERVICE_NAME, handler) else {
        let _ = OUTCOME.set(ExitCode::FAILURE);
        return;
    };
    let _ = STATUS.set(handle);
    STARTING.store(true, Ordering::SeqCst);
    report(ServiceState::StartPending, ServiceExitCode::NO_ERROR);
    std::thread::spawn(|| {
        let started = std::time::Instant::now();
        while started.elapsed() < START_AT_MOST {
            std::thread::sleep(PROGRESS_EVERY);
            if !report_progress() {
                return;
            }
        }
    });
    let work = WORK.lock().unwrap_or_else(|e| e.into_inner()).take();
    let outcome = work.map_or(ExitCode::FAILURE, |work| work());
    let _ = OUTCOME.set(outcome);
    let exit_code = if outcome == ExitCode::SUCCESS {
        ServiceExitCode::NO_ERROR
    } else {
        ServiceExitCode::ServiceSpecific(1)
    };
    report(ServiceState::Stopped, exit_code);
}

/// Serialises status reports: progress is never reported after Running or Stopped.
static REPORTING: Mutex<()> = Mutex::new(());

/// Reports StartPending with the next checkpoint if the service is still starting; returns
/// whether it was.
fn report_progress() -> bool {
    let _reporting = REPORTING.lock().unwrap_or_else(|e| e.into_inner());
    let starting = STARTING.load(Ordering::SeqCst);
    if starting {
        set_status(ServiceState::StartPending, ServiceExitCode::NO_ERROR);
    }
    starting
}

fn report(state: ServiceState, exit_code: ServiceExitCode) {
    let _reporting = REPORTING.lock().unwrap_or_else(|e| e.into_inner());
    if state != ServiceState::StartPending {
        STARTING.store(false, Ordering::SeqCst);
    }
    set_status(state, exit_code);
}

fn set_status(state: ServiceState, exit_code: ServiceExitCode) {
    let Some(handle) = STATUS.get() else {
        return;
    };
    let checkpoint = match state {
        ServiceState::StartPending | ServiceState::StopPending => {
            CHECKPOINT.fetch_add(1, Ordering::SeqCst) + 1
        }
        _ => 0,
    };
    let (controls_accepted, wait_hint) = match state {
        ServiceState::Running => (
            ServiceControlAccept::STOP
                | ServiceControlAccept::PRESHUTDOWN
                | ServiceControlAccept::SHUTDOWN,
            Duration::ZERO,
        ),
        // First start makes the key, the database and the certificate; a stop lets
        // in-flight requests finish (up to 30 s).
        ServiceState::StartPending | ServiceState::StopPending => {
            (ServiceControlAccept::empty(), Duration::from_secs(60))
        }
        _ => (ServiceControlAccept::empty(), Duration::ZERO),
    };
    let status = ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted,
        exit_code,
        checkpoint,
        wait_hint,
        process_id: None,
    };
    if let Err(e) = handle.set_service_status(status) {
        tracing::warn!(error = %e, ?state, "cannot report the service status");
    }
}
