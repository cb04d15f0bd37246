//! Callers and their keys: who may call what. A caller is named in the key file
//! (`KABAR_API_KEYS_FILE`) with the SHA-256 hash of its key and its scopes; kabar never stores a
//! key. Keys are long random strings (`kabar keys new`), so a plain hash is the right tool, and
//! looking a caller up by the hash of what it presented leaks nothing through timing.

use std::collections::{BTreeSet, HashMap};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// What a key allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// SendOtp, VerifyOtp.
    Otp,
    /// SendTemplate, SubmitBatch, CancelBatch, ResumeBatch.
    Notify,
    /// GetMessageStatus, WatchMessageStatus, GetBatch, WatchBatch, ListBatchItems.
    Status,
    /// The operations API.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Otp, Scope::Notify, Scope::Status, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Otp => "otp",
            Scope::Notify => "notify",
            Scope::Status => "status",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// A caller kabar knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// From the key file: 1 to 64 of `a-z 0-9 _ -`, safe in a log line, a metric and a key.
    pub name: String,
    pub scopes: BTreeSet<Scope>,
    /// Calls per second this caller may make on each replica (`calls_per_second`), with a burst
    /// of one second's calls; `None`: no quota.
    pub calls_per_second: Option<u32>,
}

/// Most calls per second a quota may allow.
pub const MAX_CALLS_PER_SECOND: u32 = 100_000;

/// A caller's quota as a schedule (GCRA): `next_us` is when its next call is due, in
/// microseconds on any steady clock. A call is let in while it comes at most one second (the
/// burst) before its due time; each call moves the due time on by 1/rate. The answer is the new
/// due time, or how long to wait.
pub fn quota_take(next_us: u64, now_us: u64, rate: u32) -> Result<u64, u64> {
    let interval = 1_000_000 / u64::from(rate.max(1));
    let burst = 1_000_000u64;
    let due = next_us.max(now_us);
    if due > now_us + burst - interval.min(burst) {
        return Err(due - (now_us + burst - interval.min(burst)));
    }
    Ok(due + interval)
}

impl Caller {
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// The callers of a key file, by the SHA-256 of their key.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    by_hash: HashMap<[u8; 32], Caller>,
}

/// The SHA-256 of a key.
pub fn hash_of(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The stored form of a key: `sha256:` and 64 hex digits.
pub fn key_hash(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    hash: String,
    scopes: Vec<String>,
    #[serde(default)]
    calls_per_second: Option<u32>,
}

/// Shortest key `kabar keys new` makes and the file check accepts is not checked (only hashes
/// are stored); this is the shape of a name.
fn check_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl KeyRing {
    /// Reads a key file. The error names the entry and never shows a hash or a key.
    pub fn parse(text: &str) -> Result<KeyRing, String> {
        let file: KeyFile = toml::from_str(text).map_err(|e| {
            // TOML's message may quote the line, which may hold a hash or a pasted key.
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].lines().count().max(1);
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            format!("is not a key file{at}: expected [[key]] entries with name, hash and scopes")
        })?;
        let mut ring = KeyRing::default();
        let mut names = BTreeSet::new();
        for (i, entry) in file.key.iter().enumerate() {
            let which = format!("key {} ({})", i + 1, cut_name(&entry.name));
            if !check_name(&entry.name) {
                return Err(format!(
                    "{which}: name must be 1 to 64 of a-z 0-9 _ -, e.g. billing or portal"
                ));
            }
            if !names.insert(entry.name.clone()) {
                return Err(format!("{which}: the name is used twice"));
            }
            let hash = parse_hash(&entry.hash).ok_or_else(|| {
                format!(
                    "{which}: hash must be sha256: and 64 hex digits, as `kabar keys new` prints \
                     it (the file holds hashes of keys, never keys)"
                )
            })?;
            if entry.scopes.is_empty() {
                return Err(format!(
                    "{which}: scopes is empty; give at least one of otp, notify, status, admin"
                ));
            }
            let mut scopes = BTreeSet::new();
            for s in &entry.scopes {
                let scope = Scope::parse(s).ok_or_else(|| {
                    format!(
                        "{which}: unknown scope {:?}; one of otp, notify, status, admin",
                        cut_name(s)
                    )
                })?;
                scopes.insert(scope);
            }
            if let Some(rate) = entry.calls_per_second
                && !(1..=MAX_CALLS_PER_SECOND).contains(&rate)
            {
                return Err(format!(
                    "{which}: calls_per_second must be from 1 to {MAX_CALLS_PER_SECOND}"
                ));
            }
            if ring
                .by_hash
                .insert(
                    hash,
                    Caller {
                        name: entry.name.clone(),
                        scopes,
                        calls_per_second: entry.calls_per_second,
                    },
                )
                .is_some()
            {
                return Err(format!("{which}: the same key hash is listed twice"));
            }
        }
        if ring.by_hash.is_empty() {
            return Err("lists no key: add [[key]] entries (kabar keys new prints one)".into());
        }
        Ok(ring)
    }

    /// The caller whose key this is.
    pub fn caller(&self, key: &str) -> Option<&Caller> {
        self.caller_by_hash(&hash_of(key))
    }

    /// The caller whose key has this SHA-256.
    pub fn caller_by_hash(&self, hash: &[u8; 32]) -> Option<&Caller> {
        self.by_hash.get(hash)
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let hex_part = text.strip_prefix("sha256:")?;
    if hex_part.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

/// A name as an error may show it: at most 32 characters, printable ASCII only, and nothing of
/// a key pasted in the wrong place.
fn cut_name(name: &str) -> String {
    if name.starts_with("kabar_") || name.len() > 64 {
        return "a key? never put keys in this file".into();
    }
    name.chars()
        .take(32)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// A new key: 32 bytes from the OS CSPRNG, as `kabar_` and 64 hex digits.
pub fn new_key() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random number generator is available");
    format!("kabar_{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(entries: &[(&str, &str, &[&str])]) -> String {
        entries
            .iter()
            .map(|(name, hash, scopes)| {
                let scopes: Vec<String> = scopes.iter().map(|s| format!("{s:?}")).collect();
                format!(
                    "[[key]]\nname = {name:?}\nhash = {hash:?}\nscopes = [{}]\n",
                    scopes.join(", ")
                )
            })
            .collect()
    }

    #[test]
    fn a_key_finds_its_caller_and_scopes() {
        let portal = new_key();
        let billing = new_key();
        assert_eq!(portal.len(), 70);
        assert_ne!(portal, billing);
        let ring = KeyRing::parse(&file(&[
            ("portal", &key_hash(&portal), &["otp"]),
            ("billing", &key_hash(&billing), &["notify", "status"]),
        ]))
        .unwrap();
        let caller = ring.caller(&portal).unwrap();
        assert_eq!(caller.name, "portal");
        assert!(caller.may(Scope::Otp) && !caller.may(Scope::Notify));
        assert!(ring.caller(&billing).unwrap().may(Scope::Status));
        assert!(ring.caller("kabar_guess").is_none());
        assert!(
            ring.caller(&key_hash(&portal)).is_none(),
            "the hash is not a key"
        );
    }

    #[test]
    fn a_quota_lets_a_seconds_burst_through_then_paces() {
        // 10 calls a second: 10 at once, then one every 100 ms.
        let mut next = 0;
        let now = 5_000_000;
        for _ in 0..10 {
            next = quota_take(next, now, 10).expect("within the burst");
        }
        assert_eq!(quota_take(next, now, 10), Err(100_000));
        assert!(quota_take(next, now + 99_000, 10).is_err());
        next = quota_take(next, now + 100_000, 10).expect("one more after 100 ms");
        assert!(quota_take(next, now + 100_000, 10).is_err());
        // Idle time does not pile up beyond the burst.
        let later = now + 60_000_000;
        let mut n = 0;
        while let Ok(t) = quota_take(next, later, 10) {
            next = t;
            n += 1;
        }
        assert_eq!(n, 10);
        let ring = KeyRing::parse(&format!(
            "[[key]]\nname = \"job\"\nhash = \"{}\"\nscopes = [\"notify\"]\ncalls_per_second = 5\n",
            key_hash("k")
        ))
        .unwrap();
        assert_eq!(ring.caller("k").unwrap().calls_per_second, Some(5));
    }

    #[test]
    fn bad_files_are_named_without_showing_hashes_or_keys() {
        let key = new_key();
        let hash = key_hash(&key);
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "lists no key"),
            ("not toml [[".into(), "is not a key file"),
            (file(&[("Portal Web", &hash, &["otp"])]), "name must be"),
            (
                file(&[
                    ("portal", &hash, &["otp"]),
                    ("portal", &key_hash("x"), &["otp"]),
                ]),
                "used twice",
            ),
            (
                file(&[("a", &hash, &["otp"]), ("b", &hash, &["notify"])]),
                "listed twice",
            ),
            (file(&[("portal", &key, &["otp"])]), "never keys"),
            (file(&[("portal", &hash, &[])]), "scopes is empty"),
            (file(&[("portal", &hash, &["send"])]), "unknown scope"),
            (file(&[(&key, &hash, &["otp"])]), "never put keys"),
            (
                format!(
                    "[[key]]\nname = \"p\"\nhash = \"{hash}\"\nscopes = [\"otp\"]\ncalls_per_second = 0\n"
                ),
                "calls_per_second must be",
            ),
            (file(&[("portal", &hash, &[&key])]), "never put keys"),
            (
                format!(
                    "[[key]]\nname = \"p\"\nhash = \"{hash}\"\nscopes = [\"otp\"]\nkey = \"{key}\"\n"
                ),
                "is not a key file",
            ),
        ];
        for (text, expected) in cases {
            let e = KeyRing::parse(&text).unwrap_err();
            assert!(e.contains(expected), "{e}");
            assert!(!e.contains(&key) && !e.contains(&hash[7..]), "{e}");
        }
    }
}
