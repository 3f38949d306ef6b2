//! Writes keygate's man pages, generated from the clap definition (`keygate::cli::Cli`):
//! `keygate.1` and one page per subcommand (`keygate-serve.1`, `keygate-vendor-issue.1`, ...).
//!
//! Usage: `cargo run --example gen-man -- OUT_DIR` (scripts/package-test runs it before
//! `cargo deb`, which packages `target/man/*.1.gz`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;
use keygate::cli::Cli;

/// The DESCRIPTION of keygate(1); the subcommands' pages keep their own help text.
const LONG_ABOUT: &str = "keygate is an on-premises license appliance: the one machine in an \
offline LAN that authorizes the devices running a vendor's software against the license files \
the vendor signed for this appliance. Devices talk to it over HTTPS (port 8443 by default).

The Debian package runs it as the systemd service keygate.service (user keygate) with \
`keygate --config /etc/keygate/keygate.toml serve`; its data (database, appliance key, \
certificate, backups) live in /var/lib/keygate. Run administrative commands as the keygate \
user with the same configuration, e.g. \
`runuser -u keygate -- keygate --config /etc/keygate/keygate.toml status`. \
The operator's guide is /usr/share/doc/keygate/operations.md.";

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: gen-man OUT_DIR");
        return ExitCode::FAILURE;
    };
    let command = Cli::command()
        .version(env!("CARGO_PKG_VERSION"))
        .long_about(LONG_ABOUT);
    let command = fill_missing_about(command, "keygate");
    let result =
        std::fs::create_dir_all(&out).and_then(|()| clap_mangen::generate_to(command, &out));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gen-man: cannot write man pages to {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

/// A man page's NAME line needs a description (lintian: bad-whatis-entry); a subcommand
/// without a doc comment gets a placeholder, and a warning for its author.
fn fill_missing_about(command: clap::Command, path: &str) -> clap::Command {
    let names: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_string())
        .collect();
    names.into_iter().fold(command, |command, name| {
        let full = format!("{path} {name}");
        command.mut_subcommand(&name, |sub| {
            let sub = if sub.get_about().is_none() {
                eprintln!("gen-man: warning: `{full}` has no doc comment (about)");
                sub.about(format!("{full} (no description yet)"))
            } else {
                sub
            };
            fill_missing_about(sub, &full)
        })
    })
}
