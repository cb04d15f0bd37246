//! One-time login codes: generation, keyed hashing, the abuse rules, and delivery through the
//! AUTHENTICATION template.
//!
//! Security properties:
//! - codes come from the OS CSPRNG, uniform over all `10^n` values (rejection sampling);
//! - only `HMAC-SHA256(secret, purpose|phone|code)` is stored, so a Redis dump reveals no code and
//!   a code for one purpose or phone never matches another;
//! - verification is one atomic step in the store: a code is consumed exactly once, and each wrong
//!   guess uses an attempt until the code is discarded;
//! - every send passes the per-phone cooldown and hourly cap, the per-IP hourly cap, the country
//!   allow-list and the global daily cap, because every message costs the ISP money.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::Sha256;

use crate::{
    domain::ports::{CodeHash, Gate, OtpStore, Verdict},
    store::{self, now_ms},
};

use crate::{
    config::OtpConfig,
    domain::{
        error::{Error, Violations},
        outbox::{Outbox, Outgoing},
        pacing::Priority,
        reason::Reason,
    },
    phone::{self, Phone},
    templates::Category,
    templates::Template,
    whatsapp::OutboundTemplate,
};

const HOUR: Duration = Duration::from_secs(3600);
/// The daily cap resets at midnight Western Indonesian Time (UTC+7), the ISP's business day.
const DAY_OFFSET_MS: u64 = 7 * 3600 * 1000;
const DAY_MS: u64 = 24 * 3600 * 1000;

pub const DEFAULT_PURPOSE: &str = "login";

/// The daily cap's day of `now_ms` (Unix milliseconds): its number, counted in WIB (UTC+7), and
/// the Unix milliseconds at which it ends, 00:00 WIB.
pub fn wib_day(now_ms: u64) -> (u64, u64) {
    let day = (now_ms + DAY_OFFSET_MS) / DAY_MS;
    (day, (day + 1) * DAY_MS - DAY_OFFSET_MS)
}

pub struct OtpService {
    store: Arc<dyn OtpStore>,
    outbox: Arc<Outbox>,
    template: Arc<Template>,
    /// HMAC-SHA256 keyed with the OTP secret, the key schedule done once; cloned per code.
    keyed_mac: Hmac<Sha256>,
    ttl: Duration,
    max_attempts: u32,
    resend_after: Duration,
    max_sends_per_hour: u32,
    max_sends_per_ip_per_hour: u32,
    code_length: usize,
    allowed_countries: Vec<u16>,
    daily_limit: u32,
    test_numbers: HashMap<String, SecretString>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtpSent {
    pub expires_in: Duration,
    pub resend_after: Duration,
    /// Meta's message id; empty for a test number.
    pub message_id: String,
}

impl OtpService {
    pub fn new(
        config: &OtpConfig,
        store: Arc<dyn OtpStore>,
        outbox: Arc<Outbox>,
        template: Arc<Template>,
    ) -> Self {
        let key = match &config.secret {
            Some(secret) => SecretBox::new(Box::new(secret.expose_secret().clone())),
            None => {
                let mut random = vec![0u8; 32];
                getrandom::fill(&mut random).expect("the OS random number generator is available");
                SecretBox::new(Box::new(random))
            }
        };
        let keyed_mac = Hmac::<Sha256>::new_from_slice(key.expose_secret())
            .expect("HMAC accepts keys of any length");
        OtpService {
            store,
            outbox,
            template,
            keyed_mac,
            ttl: config.ttl,
            max_attempts: config.max_attempts,
            resend_after: config.resend_after,
            max_sends_per_hour: config.max_sends_per_hour,
            max_sends_per_ip_per_hour: config.max_sends_per_ip_per_hour,
            code_length: config.code_length,
            allowed_countries: config.allowed_countries.clone(),
            daily_limit: config.daily_limit,
            test_numbers: config
                .test_numbers
                .iter()
                .map(|(k, v)| (k.clone(), SecretString::from(v.expose_secret())))
                .collect(),
        }
    }

    /// `SendOtp`: a new code for (purpose, phone), replacing any earlier one.
    pub async fn send(
        &self,
        phone: &str,
        purpose: &str,
        client_ip: &str,
        deadline: Option<Instant>,
    ) -> Result<OtpSent, Error> {
        let mut violations = Violations::new();
        let phone = check(&mut violations, "phone", phone::normalize(phone));
        let purpose = check(&mut violations, "purpose", parse_purpose(purpose));
        let client_ip = check(&mut violations, "client_ip", parse_client_ip(client_ip));
        let (Some(phone), Some(purpose), Some(client_ip)) = (phone, purpose, client_ip) else {
            return Err(Error::InvalidArgument(violations));
        };
        if !self.allowed_countries.contains(&phone.country_code()) {
            return Err(Error::CountryNotAllowed(phone.country_code()));
        }
        let test_code = self.test_numbers.get(phone.digits());
        if test_code.is_none() && !self.outbox.enabled() {
            return Err(Error::WhatsAppDisabled);
        }
        let now = now_ms();

        let limits_key = store::limits_key(phone.digits());
        let resend_at_ms = match self
            .store
            .gate(
                &limits_key,
                now,
                self.resend_after,
                self.max_sends_per_hour,
                HOUR,
            )
            .await?
        {
            Gate::Allowed { resend_at_ms } => resend_at_ms,
            Gate::Cooldown(wait) => {
                return Err(limited(
                    Reason::OtpResendCooldown,
                    format!(
                        "a code was sent to this number less than {} s ago",
                        self.resend_after.as_secs()
                    ),
                    wait,
                ));
            }
            Gate::CapReached(wait) => {
                return Err(limited(
                    Reason::OtpHourlyLimit,
                    format!(
                        "at most {} codes per hour are sent to one number",
                        self.max_sends_per_hour
                    ),
                    wait,
                ));
            }
        };

        // The per-IP cap is counted after the per-phone gate, so that a customer tapping
        // "send again" inside the cooldown does not use up the allowance of everyone behind the
        // same carrier NAT address.
        if let Some(ip) = client_ip {
            let gate = self
                .store
                .gate(
                    &store::ip_key(&ip),
                    now,
                    Duration::ZERO,
                    self.max_sends_per_ip_per_hour,
                    HOUR,
                )
                .await;
            let gate = match gate {
                Ok(gate) => gate,
                Err(e) => {
                    self.release(&limits_key, resend_at_ms, true).await;
                    return Err(e.into());
                }
            };
            if let Gate::Cooldown(wait) | Gate::CapReached(wait) = gate {
                self.release(&limits_key, resend_at_ms, true).await;
                tracing::warn!(client_ip = %ip, "OTP per-IP hourly cap reached");
                return Err(limited(
                    Reason::OtpIpHourlyLimit,
                    format!(
                        "too many codes requested from this IP address in the last hour (at most {})",
                        self.max_sends_per_ip_per_hour
                    ),
                    wait,
                ));
            }
        }

        let code = match test_code {
            Some(code) => SecretString::from(code.expose_secret()),
            None => {
                let (day, next_day_ms) = wib_day(now);
                let allowed = self
                    .store
                    .count_daily(
                        &store::daily_key(day),
                        self.daily_limit,
                        next_day_ms + DAY_MS,
                    )
                    .await;
                match allowed {
                    Ok(true) => {}
                    Ok(false) => {
                        self.release(&limits_key, resend_at_ms, true).await;
                        tracing::error!(
                            daily_limit = self.daily_limit,
                            "OTP DAILY LIMIT REACHED: no more OTP messages are sent today \
                             (KABAR_OTP_DAILY_LIMIT). If this is not expected traffic, someone \
                             may be pumping OTP messages to run up the WhatsApp bill."
                        );
                        return Err(limited(
                            Reason::OtpDailyLimit,
                            "the service's daily OTP limit is reached".to_owned(),
                            Duration::from_millis(next_day_ms.saturating_sub(now)),
                        ));
                    }
                    Err(e) => {
                        self.release(&limits_key, resend_at_ms, true).await;
                        return Err(e.into());
                    }
                }
                generate_code(self.code_length)
            }
        };

        let hash = self.hash(purpose, &phone, code.expose_secret());
        let code_key = store::code_key(purpose, phone.digits());
        if let Err(e) = self
            .store
            .put_code(&code_key, &hash, self.max_attempts, self.ttl)
            .await
        {
            self.release(&limits_key, resend_at_ms, true).await;
            return Err(e.into());
        }
        let sent = OtpSent {
            expires_in: self.ttl,
            resend_after: self.resend_after,
            message_id: String::new(),
        };
        if test_code.is_some() {
            tracing::info!(to = %phone, purpose, "OTP for a configured test number: not sent");
            return Ok(sent);
        }

        // The runtime settings win over the registry.
        let settings = self.outbox.settings().current();
        let message = OutboundTemplate {
            to: phone.clone(),
            template: settings.name(&self.template).value,
            language: settings.language(&self.template).value,
            body_params: vec![code.expose_secret().to_owned()],
            button_param: Some(code.expose_secret().to_owned()),
            sensitive: true,
        };
        let outgoing = Outgoing {
            message,
            template_key: self.template.key.clone(),
            category: Category::Authentication,
            reference: String::new(),
            idempotency_key: None,
            priority: Priority::Otp,
            batch_id: String::new(),
        };
        match self.outbox.send(&outgoing, deadline).await {
            Ok(delivered) => Ok(OtpSent {
                message_id: delivered.message_id,
                ..sent
            }),
            Err(e) if e.may_have_been_delivered() => {
                // The customer may have the code: it stays valid and the cooldown stands.
                Err(e)
            }
            Err(e) => {
                // The customer never saw this code: drop it and let them ask again at once.
                // The attempt still counts toward the hourly caps (as the OTP rules say).
                if let Err(e) = self.store.discard_code(&code_key, &hash).await {
                    tracing::warn!(error = %e, "could not discard an undelivered OTP code");
                }
                self.release(&limits_key, resend_at_ms, false).await;
                Err(e)
            }
        }
    }

    /// Undoes the phone gate for a send that did not happen. With `uncount` (nothing reached
    /// Meta) the send also leaves the hourly count: otherwise anyone already refused by the per-IP
    /// or daily cap could use up a victim's hourly allowance for free.
    async fn release(&self, limits_key: &str, resend_at_ms: u64, uncount: bool) {
        if let Err(e) = self.store.release(limits_key, resend_at_ms, uncount).await {
            tracing::warn!(error = %e, "could not undo the send limits after a failed send");
        }
    }

    /// `VerifyOtp`: one atomic check in the store.
    pub async fn verify(&self, phone: &str, purpose: &str, code: &str) -> Result<Verdict, Error> {
        let mut violations = Violations::new();
        let phone = check(&mut violations, "phone", phone::normalize(phone));
        let purpose = check(&mut violations, "purpose", parse_purpose(purpose));
        let code_ok = code.len() == self.code_length && code.bytes().all(|b| b.is_ascii_digit());
        if !code_ok {
            violations.push(
                "code",
                format!("must be exactly {} digits", self.code_length),
            );
        }
        let (Some(phone), Some(purpose), true) = (phone, purpose, code_ok) else {
            return Err(Error::InvalidArgument(violations));
        };
        let hash = self.hash(purpose, &phone, code);
        self.store
            .verify(&store::code_key(purpose, phone.digits()), &hash)
            .await
            .map_err(Error::from)
    }

    fn hash(&self, purpose: &str, phone: &Phone, code: &str) -> CodeHash {
        let mut mac = self.keyed_mac.clone();
        mac.update(purpose.as_bytes());
        mac.update(b"|");
        mac.update(phone.digits().as_bytes());
        mac.update(b"|");
        mac.update(code.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

fn check<T, E: std::fmt::Display>(
    violations: &mut Violations,
    field: &str,
    result: Result<T, E>,
) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            violations.push(field, e.to_string());
            None
        }
    }
}

fn limited(reason: Reason, message: String, wait: Duration) -> Error {
    // Round up: "retry after 0 s" would invite an immediate, refused retry.
    let retry_after = Duration::from_secs(wait.as_millis().div_ceil(1000) as u64);
    Error::Limited {
        reason,
        message: format!("{message}; retry in {} s", retry_after.as_secs()),
        retry_after,
    }
}

/// `login` when empty; otherwise 1 to 32 of `a-z 0-9 _ -`.
pub fn parse_purpose(purpose: &str) -> Result<&str, String> {
    if purpose.is_empty() {
        return Ok(DEFAULT_PURPOSE);
    }
    if purpose.len() <= 32
        && purpose
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        Ok(purpose)
    } else {
        Err("must be 1 to 32 characters of a-z, 0-9, _ and - (e.g. login, reset)".to_owned())
    }
}

/// The client the per-IP cap counts: an IPv4 address, or the /64 network of an IPv6 address
/// (one subscriber line gets a whole /64 and can rotate through it freely).
fn parse_client_ip(ip: &str) -> Result<Option<String>, String> {
    if ip.is_empty() {
        return Ok(None);
    }
    // IPv4-mapped (::ffff:a.b.c.d) and the deprecated IPv4-compatible (::a.b.c.d) forms are the
    // IPv4 client itself: both fold into its IPv4 bucket.
    let parsed = ip.parse::<IpAddr>().map(|ip| match ip {
        IpAddr::V6(v6) if !v6.is_loopback() && !v6.is_unspecified() => {
            v6.to_ipv4().map_or(ip, IpAddr::V4)
        }
        other => other,
    });
    match parsed {
        Ok(IpAddr::V4(v4)) => Ok(Some(v4.to_string())),
        Ok(IpAddr::V6(v6)) => {
            let s = v6.segments();
            Ok(Some(format!(
                "{:x}:{:x}:{:x}:{:x}::/64",
                s[0], s[1], s[2], s[3]
            )))
        }
        Err(_) => Err("must be an IPv4 or IPv6 address such as 203.0.113.7".to_owned()),
    }
}

/// `length` decimal digits, each drawn uniformly: bytes of 250 and above are rejected so that
/// `byte % 10` carries no bias.
pub fn generate_code(length: usize) -> SecretString {
    let mut code = String::with_capacity(length);
    let mut buffer = [0u8; 32];
    while code.len() < length {
        getrandom::fill(&mut buffer).expect("the OS random number generator is available");
        for &b in &buffer {
            if b < 250 && code.len() < length {
                code.push(char::from(b'0' + b % 10));
            }
        }
    }
    SecretString::from(code)
}

#[cfg(test)]
mod tests {
    use super::parse_client_ip;

    #[test]
    fn every_spelling_of_an_ipv4_client_shares_its_bucket() {
        for spelling in ["1.2.3.4", "::ffff:1.2.3.4", "::1.2.3.4", "::ffff:102:304"] {
            assert_eq!(
                parse_client_ip(spelling),
                Ok(Some("1.2.3.4".to_owned())),
                "{spelling}"
            );
        }
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        assert_eq!(
            parse_client_ip("2001:db8:1:2:aaaa::1"),
            Ok(Some("2001:db8:1:2::/64".to_owned()))
        );
        assert_eq!(parse_client_ip("::1"), Ok(Some("0:0:0:0::/64".to_owned())));
        assert_eq!(parse_client_ip(""), Ok(None));
        assert!(parse_client_ip("1.2.3.4\n").is_err());
    }
}
