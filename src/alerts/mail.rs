//! Email delivery over SMTP (lettre): STARTTLS, implicit TLS, or plain on a trusted LAN
//! relay, with optional authentication. Settings live in the database (set from the CLI or
//! the portal); the password is never logged or shown.

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use rusqlite::Connection;

use crate::store::{StoreError, settings};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    StartTls,
    Tls,
    None,
}

impl TlsMode {
    pub fn parse(text: &str) -> Option<TlsMode> {
        match text {
            "starttls" => Some(TlsMode::StartTls),
            "tls" => Some(TlsMode::Tls),
            "none" => Some(TlsMode::None),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::StartTls => "starttls",
            TlsMode::Tls => "tls",
            TlsMode::None => "none",
        }
    }

    /// The port a server of this mode listens on when none is given.
    pub fn default_port(self) -> u16 {
        match self {
            TlsMode::Tls => 465,
            TlsMode::StartTls => 587,
            TlsMode::None => 25,
        }
    }
}

/// The sender when none is given: `keygate@` this host.
pub fn default_from() -> String {
    format!("keygate@{}", crate::appliance::hostname())
}

/// Where and how alert emails are sent.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub user: Option<String>,
    pub password: Option<String>,
    pub from: String,
    /// A PEM CA certificate to trust for the server's TLS certificate (a LAN relay with a
    /// certificate from an internal CA). Without one, the public web roots are trusted.
    pub ca: Option<String>,
}

impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("from", &self.from)
            .field("ca", &self.ca.as_ref().map(|_| "<PEM>"))
            .finish()
    }
}

pub const RECIPIENTS: &str = "alert_recipients";

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("no SMTP server is configured")]
    NotConfigured,
    #[error("{0:?} is not a valid email address")]
    BadAddress(String),
    #[error(
        "{0:?} has characters outside ASCII, which SMTP servers without SMTPUTF8 refuse for \
         the whole message (write a domain in its xn-- form)"
    )]
    NonAscii(String),
    #[error("the message could not be built: {0}")]
    Build(String),
    #[error("the SMTP CA certificate is not a PEM certificate: {0}")]
    Ca(String),
    /// A failure worth trying again at once (no answer saying otherwise).
    #[error("the SMTP server did not accept the message: {0}")]
    Smtp(String),
    /// No answer in time: the server may have taken the message all the same (a relay
    /// that scans it before answering the end of DATA), so it is not sent again at once.
    #[error("the SMTP server did not answer in time ({0}); it may have taken the message")]
    Unanswered(String),
    /// A permanent refusal (5xx: a wrong password, a sender not allowed): trying again at
    /// once only counts against the account (a directory locks it after a few).
    #[error("the SMTP server refused the message: {0}")]
    Refused(String),
    /// Every recipient refused (no such mailbox, mailbox full): the list is at fault, not
    /// the settings, so they are not paused.
    #[error("the SMTP server refused every recipient: {0}")]
    RecipientsRefused(String),
    #[error(
        "not sent: the SMTP server refused these settings {minutes_ago} minute(s) ago ({why}); \
         they are tried again an hour after that, or at once once the settings change or a \
         test email from the portal goes through"
    )]
    Paused { minutes_ago: u64, why: String },
    #[error("the SMTP settings cannot be used: {0} (set them again)")]
    Settings(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Parses a `;`-separated recipient list (a `;` in a quoted display name separates
/// nothing), naming the first invalid address. An address listed again (in any case, under
/// any display name) is kept once, where it first came: it would otherwise get every alert
/// twice.
pub fn parse_recipients(text: &str) -> Result<Vec<Mailbox>, MailError> {
    let mut list: Vec<Mailbox> = Vec::new();
    for a in split_outside_quotes(text)
        .into_iter()
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        let mailbox = mailbox(a)?;
        let address: &str = mailbox.email.as_ref();
        if !list.iter().any(|m| {
            let known: &str = m.email.as_ref();
            known.eq_ignore_ascii_case(address)
        }) {
            list.push(mailbox);
        }
    }
    Ok(list)
}

/// [`parse_recipients`] for a list about to be saved: every address must be ASCII. lettre
/// refuses a message with a UTF-8 address unless the server offers SMTPUTF8, which many
/// relays do not, and then no recipient gets it. (From a list an older release saved,
/// [`send_within`] leaves such an address out.)
pub fn recipients_to_save(text: &str) -> Result<Vec<Mailbox>, MailError> {
    let list = parse_recipients(text)?;
    for mailbox in &list {
        ascii(mailbox)?;
    }
    Ok(list)
}

/// One address (a display name may be in any script: it is sent encoded).
fn mailbox(text: &str) -> Result<Mailbox, MailError> {
    text.parse::<Mailbox>()
        .map_err(|_| MailError::BadAddress(text.to_string()))
}

/// Refuses an address outside ASCII, for settings about to be saved
/// ([`recipients_to_save`]).
fn ascii(mailbox: &Mailbox) -> Result<(), MailError> {
    let address: &str = mailbox.email.as_ref();
    if address.is_ascii() {
        Ok(())
    } else {
        Err(MailError::NonAscii(address.to_string()))
    }
}

/// `text` cut at each `;` outside a quoted string (`"..."`, where `\"` is a quote).
fn split_outside_quotes(text: &str) -> Vec<&str> {
    let (mut parts, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

pub fn load_settings(conn: &Connection) -> Result<Option<SmtpSettings>, StoreError> {
    let get = |k: &str| settings::get(conn, k);
    let Some(host) = get("smtp_host")?.filter(|h| !h.is_empty()) else {
        return Ok(None);
    };
    let tls = get("smtp_tls")?
        .as_deref()
        .and_then(TlsMode::parse)
        .unwrap_or(TlsMode::StartTls);
    Ok(Some(SmtpSettings {
        port: get("smtp_port")?
            .and_then(|p| p.parse().ok())
            .unwrap_or(tls.default_port()),
        host,
        tls,
        user: get("smtp_user")?.filter(|u| !u.is_empty()),
        password: get("smtp_password")?.filter(|p| !p.is_empty()),
        from: get("smtp_from")?.unwrap_or_else(default_from),
        ca: get("smtp_ca")?.filter(|c| !c.is_empty()),
    }))
}

pub fn save_settings(conn: &Connection, s: &SmtpSettings) -> Result<(), MailError> {
    ascii(&mailbox(&s.from)?)?;
    settings::set(conn, "smtp_host", &s.host)?;
    settings::set(conn, "smtp_port", &s.port.to_string())?;
    settings::set(conn, "smtp_tls", s.tls.as_str())?;
    settings::set(conn, "smtp_user", s.user.as_deref().unwrap_or(""))?;
    settings::set(conn, "smtp_password", s.password.as_deref().unwrap_or(""))?;
    settings::set(conn, "smtp_from", &s.from)?;
    settings::set(conn, "smtp_ca", s.ca.as_deref().unwrap_or(""))?;
    Ok(())
}

/// A message with a text and an HTML part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    pub subject: String,
    pub text: String,
    pub html: String,
}

impl Email {
    /// What `keygate alerts test` and the portal's test button send.
    pub fn test() -> Email {
        Email {
            subject: "keygate: test email".into(),
            text: "This is a test email from keygate. Alerts will reach you.".into(),
            html: "<p>This is a test email from keygate. Alerts will reach you.</p>".into(),
        }
    }
}

/// A CA certificate's text as stored and compared: the console reads a file (LF, a final
/// newline), the portal a textarea (CRLF, trimmed); the same certificate is the same text.
/// `None` when empty.
pub fn ca_text(text: &str) -> Option<String> {
    Some(text.replace("\r\n", "\n").trim().to_string()).filter(|t| !t.is_empty())
}

/// The password new settings (given without one) keep: the stored one only if it was given
/// for the same server, protection, user and CA, so nobody can send it to a server of their
/// own choosing by changing where mail goes. Also says whether a stored password was dropped.
pub fn kept_password(stored: Option<&SmtpSettings>, new: &SmtpSettings) -> (Option<String>, bool) {
    let had = stored.is_some_and(|s| s.password.is_some());
    let kept = stored
        .filter(|s| {
            new.user.is_some()
                && s.host == new.host
                && s.port == new.port
                && s.tls == new.tls
                && s.user == new.user
                && s.ca.as_deref().and_then(ca_text) == new.ca.as_deref().and_then(ca_text)
        })
        .and_then(|s| s.password.clone());
    let dropped = had && kept.is_none();
    (kept, dropped)
}

/// What settings must be to be used at all: a password is only sent inside TLS. Checked
/// again at send time (settings an older release saved may lack it); names the field.
fn check_usable(settings: &SmtpSettings) -> Result<(), (&'static str, &'static str)> {
    // (A password without a user, which an older release could save, is never sent.)
    if settings.user.is_some() && settings.password.is_some() && settings.tls == TlsMode::None {
        return Err((
            "tls",
            "A password is only sent over STARTTLS or TLS; choose one, or remove the user",
        ));
    }
    Ok(())
}

/// What settings must be before they are saved (the portal's and the console's alike): as
/// to be used ([`check_usable`]), a password goes with a user, and a CA is a PEM
/// certificate with no private key beside it. The refusal names the field.
pub fn check_settings(settings: &SmtpSettings) -> Result<(), (&'static str, &'static str)> {
    check_usable(settings)?;
    if settings.password.is_some() && settings.user.is_none() {
        return Err((
            "user",
            "A password goes with a user name: without one it is never sent",
        ));
    }
    if let Some(ca) = &settings.ca {
        // lettre takes a file with no certificate in it (a private key, say) as an empty
        // list: that would be kept in the database, and in every backup.
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let mut certificates = CertificateDer::pem_slice_iter(ca.as_bytes());
        let some = matches!(certificates.next(), Some(Ok(_))) && certificates.all(|c| c.is_ok());
        if !some || Certificate::from_pem(ca.as_bytes()).is_err() {
            return Err(("ca", "The CA certificate is not a PEM certificate"));
        }
        if ca.contains("PRIVATE KEY") {
            return Err((
                "ca",
                "The CA file holds a private key: give the CA's certificate alone",
            ));
        }
    }
    Ok(())
}

/// An SMTP host as the settings take it: a host name or an IP address, no port or scheme.
pub fn check_host(host: &str) -> Result<(), &'static str> {
    if crate::licensing::handshake::is_host_name(host) || host.parse::<std::net::IpAddr>().is_ok() {
        Ok(())
    } else {
        Err("The SMTP host must be a host name or an IP address (the port goes in its own field)")
    }
}

/// RFC 5321's refusals of an address (550 mailbox unavailable, 551 not local, 553 name not
/// allowed), and the answers about one mailbox's state (452 and 552 with RFC 3463's X.2.X:
/// full, disabled) or about how many recipients one message may have (X.5.3), as against
/// the sender, the login or the server.
fn refuses_a_mailbox(e: &lettre::transport::smtp::Error) -> bool {
    match e.status().map(u16::from) {
        Some(550 | 551 | 553) => e.is_permanent(),
        Some(452 | 552) => e.to_string().split_whitespace().any(|word| {
            ["4.2.", "5.2."].iter().any(|p| word.starts_with(p))
                || matches!(word, "4.5.3" | "5.5.3")
        }),
        _ => false,
    }
}

/// RFC 3463's codes for an unknown address (5.1.1, 5.1.3, 5.1.6, 5.1.10).
fn names_an_address(answer: &str) -> bool {
    ["5.1.1 ", "5.1.3 ", "5.1.6 ", "5.1.10 "]
        .iter()
        .any(|code| answer.contains(code))
}

/// An answer about the recipient's mailbox (unknown, full, disabled), not about the sender,
/// the login or the server: RFC 3463's X.1.X address codes and X.2.X mailbox codes.
fn about_a_mailbox(answer: &str) -> bool {
    names_an_address(answer)
        || answer
            .split_whitespace()
            .any(|word| word.starts_with("4.2.") || word.starts_with("5.2."))
}

/// The longest one delivery may take, whatever the server does.
pub const SEND_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends one message to all recipients; returns the server's answer (and the recipients it
/// refused, if it refused some but not all).
pub async fn send(
    settings: &SmtpSettings,
    to: &[Mailbox],
    email: &Email,
) -> Result<String, MailError> {
    send_within(settings, to, email, SEND_LIMIT).await
}

/// [`send`] within `limit` in all. When a server refusing one address makes each
/// recipient's copy a session of its own, the copies delivered before the time ran out
/// stand (a retry would send them again): the recipients left are reported unanswered.
pub async fn send_within(
    settings: &SmtpSettings,
    to: &[Mailbox],
    email: &Email,
    limit: std::time::Duration,
) -> Result<String, MailError> {
    // A list an older release saved may name an address outside ASCII, which lettre
    // refuses for the whole message on a server without SMTPUTF8: it is left out (told as
    // refused), and the others get the message.
    let (to, outside): (Vec<Mailbox>, Vec<Mailbox>) =
        to.iter().cloned().partition(|m| ascii(m).is_ok());
    if outside.is_empty() {
        return send_ascii(settings, &to, email, limit).await;
    }
    let left_out = outside
        .iter()
        .map(|m| format!("{} (outside ASCII: set the list again)", m.email))
        .collect::<Vec<_>>()
        .join(", ");
    tracing::warn!(%left_out, "alert recipients left out");
    if to.is_empty() {
        return Err(MailError::RecipientsRefused(left_out));
    }
    let answer = send_ascii(settings, &to, email, limit).await?;
    Ok(format!("{answer}; left out: {left_out}"))
}

/// [`send_within`] to addresses all in ASCII.
async fn send_ascii(
    settings: &SmtpSettings,
    to: &[Mailbox],
    email: &Email,
    limit: std::time::Duration,
) -> Result<String, MailError> {
    // Settings saved by an older release may lack what saving now checks (a password
    // over plain SMTP): never sent so.
    check_usable(settings).map_err(|(_, why)| MailError::Settings(why))?;
    let from = mailbox(&settings.from)?;
    ascii(&from)?;
    let mut builder = Message::builder().from(from).subject(&email.subject);
    for mailbox in to {
        builder = builder.to(mailbox.clone());
    }
    let message = builder
        .multipart(MultiPart::alternative_plain_html(
            email.text.clone(),
            email.html.clone(),
        ))
        .map_err(|e| MailError::Build(e.to_string()))?;
    let smtp = |e: lettre::transport::smtp::Error| {
        if e.is_permanent() {
            MailError::Refused(e.to_string())
        } else {
            MailError::Smtp(e.to_string())
        }
    };
    let builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&settings.host);
    let mut transport = match settings.tls {
        TlsMode::None => builder,
        mode => {
            let mut tls = TlsParameters::builder(settings.host.clone());
            if let Some(ca) = &settings.ca {
                tls = tls.add_root_certificate(
                    Certificate::from_pem(ca.as_bytes())
                        .map_err(|e| MailError::Ca(e.to_string()))?,
                );
            }
            let tls = tls.build_rustls().map_err(smtp)?;
            builder.tls(if mode == TlsMode::Tls {
                Tls::Wrapper(tls)
            } else {
                Tls::Required(tls)
            })
        }
    }
    .port(settings.port)
    .timeout(Some(std::time::Duration::from_secs(20)));
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        // PLAIN, or LOGIN for the servers that offer only that (Exchange, Microsoft 365):
        // the first of these the server offers is used, once.
        transport = transport
            .credentials(Credentials::new(user.clone(), password.clone()))
            .authentication(vec![Mechanism::Plain, Mechanism::Login]);
    }
    let transport = transport.build();
    let answer =
        |r: lettre::transport::smtp::response::Response| r.message().collect::<Vec<_>>().join(" ");
    let no_answer = || format!("no answer within {} seconds", limit.as_secs());
    let until = tokio::time::Instant::now() + limit;
    let whole = tokio::time::timeout_at(until, transport.send(message.clone()))
        .await
        .map_err(|_| MailError::Unanswered(no_answer()))?;
    let e = match whole {
        Ok(response) => return Ok(answer(response)),
        // A server refusing one address (550 no such user, 452 mailbox full) refuses the
        // whole message: then each recipient gets it on its own, so one bad address does not
        // keep the others from their alerts. Not for any other refusal (a wrong password, a
        // server out of service): that would only repeat it once per recipient.
        Err(e) if refuses_a_mailbox(&e) && to.len() > 1 => e,
        Err(e) if refuses_a_mailbox(&e) && e.is_permanent() && about_a_mailbox(&e.to_string()) => {
            return Err(MailError::RecipientsRefused(e.to_string()));
        }
        Err(e) => return Err(smtp(e)),
    };
    let bytes = message.formatted();
    let (mut accepted, mut refused, mut answers) = (None, Vec::new(), Vec::new());
    let (mut unanswered, mut timed_out) = (false, false);
    for mailbox in to {
        let envelope = lettre::address::Envelope::new(
            message.envelope().from().cloned(),
            vec![mailbox.email.clone()],
        )
        .map_err(|e| MailError::Build(e.to_string()))?;
        let why = match tokio::time::timeout_at(until, transport.send_raw(&envelope, &bytes)).await
        {
            Ok(Ok(response)) => {
                accepted = Some(answer(response));
                continue;
            }
            Ok(Err(e)) => {
                unanswered |= !e.is_permanent();
                e.to_string()
            }
            Err(_) => {
                timed_out = true;
                no_answer()
            }
        };
        refused.push(format!("{} ({why})", mailbox.email));
        answers.push(why);
    }
    // Every recipient refused for good with the very answer the whole message got, and it
    // is not about a mailbox (`about_a_mailbox`): what the server refuses is the sender (or
    // the message), not the addresses.
    if accepted.is_none()
        && e.is_permanent()
        && answers
            .iter()
            .all(|a| *a == e.to_string() && !about_a_mailbox(a))
    {
        return Err(MailError::Refused(format!(
            "{e} (for every recipient alike: check the sender address {})",
            settings.from
        )));
    }
    let refused = refused.join(", ");
    match accepted {
        Some(answer) => {
            tracing::warn!(%refused, "the SMTP server refused some recipients");
            Ok(format!("{answer}; refused: {refused}"))
        }
        // No answer in time: the server may have taken it (not sent again at once).
        None if timed_out => Err(MailError::Unanswered(format!(
            "no recipient accepted: {refused}"
        ))),
        // Worth another try only if a recipient's failure was not a refusal.
        None if unanswered => Err(MailError::Smtp(format!("no recipient accepted: {refused}"))),
        None => Err(MailError::RecipientsRefused(refused)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_outside_ascii_is_refused_a_display_name_is_not() {
        assert!(matches!(
            recipients_to_save("it@plant.test; jürgen@plant.test"),
            Err(MailError::NonAscii(a)) if a == "jürgen@plant.test"
        ));
        assert!(matches!(
            recipients_to_save("it@bücher.de"),
            Err(MailError::NonAscii(_))
        ));
        let to = recipients_to_save("Jürgen Groß <jg@xn--bcher-kva.de>").unwrap();
        assert_eq!(to.len(), 1);
        // A list an older release saved is still read (the send leaves that address out).
        assert_eq!(parse_recipients("it@bücher.de").unwrap().len(), 1);
    }

    #[test]
    fn a_recipient_listed_twice_is_kept_once() {
        let to = parse_recipients(
            " it@plant.test;Boss <boss@plant.test>; IT@Plant.test ;;boss@plant.test",
        )
        .unwrap();
        let shown: Vec<String> = to.iter().map(|m| m.to_string()).collect();
        assert_eq!(shown, ["it@plant.test", "Boss <boss@plant.test>"]);
        assert!(matches!(
            parse_recipients("it@plant.test; nope"),
            Err(MailError::BadAddress(a)) if a == "nope"
        ));
    }

    /// A `;` in a quoted display name is part of the name (the address was cut in two and
    /// refused as `"Ops`).
    #[test]
    fn a_quoted_name_may_hold_a_semicolon() {
        let to =
            parse_recipients(r#""Ops; Night \"B\" shift" <ops@plant.test>;it@plant.test"#).unwrap();
        let names: Vec<_> = to.iter().map(|m| m.name.clone()).collect();
        assert_eq!(names, [Some("Ops; Night \"B\" shift".into()), None]);
        assert_eq!(to[0].email.to_string(), "ops@plant.test");
    }

    /// Settings saved before a password over plain SMTP was refused are never used so.
    #[actix_web::test]
    async fn a_password_is_never_sent_over_plain_smtp() {
        let settings = SmtpSettings {
            host: "127.0.0.1".into(),
            port: 9,
            tls: TlsMode::None,
            user: Some("keygate".into()),
            password: Some("secret".into()),
            from: "keygate@plant.test".into(),
            ca: None,
        };
        let to = parse_recipients("it@plant.test").unwrap();
        let err = send(&settings, &to, &Email::test()).await.unwrap_err();
        assert!(matches!(err, MailError::Settings(_)), "{err}");
    }
}
