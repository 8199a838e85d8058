//! Researcher authentication for the console: argon2id passwords, a signed session cookie, and
//! CSRF tokens for every form (the form's token must be the HMAC of a per-browser cookie, so a
//! page on another site cannot forge it).

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a console login lasts.
pub const SESSION_HOURS: i64 = 12;
pub const SESSION_COOKIE: &str = "collabllm_console";
pub const CSRF_COOKIE: &str = "collabllm_csrf";

pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A valid argon2id hash of no one's password: verified against when a name is unknown, so a
/// wrong name takes as long as a wrong password and the timing does not tell which names exist.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        hash_password(&hex::encode(rand::random::<[u8; 16]>())).expect("argon2 hashes any password")
    })
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// The key that signs console cookies and CSRF tokens (an installation secret).
#[derive(Clone)]
pub struct ConsoleKey(Vec<u8>);

impl ConsoleKey {
    pub fn new(secret: &str) -> Self {
        Self(secret.as_bytes().to_vec())
    }

    fn mac(&self, purpose: &str, value: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(value.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// A session cookie value for researcher `id`, issued at `issued_ms` (unix milliseconds) and
    /// valid until `expires` (unix seconds).
    pub fn session(&self, id: i64, issued_ms: i64, expires: i64) -> String {
        let body = format!("{id}.{issued_ms}.{expires}");
        format!("{body}.{}", self.mac("session", &body))
    }

    /// The researcher id and issue time (unix milliseconds) of a session cookie value that is
    /// genuine and not expired at `now` (unix seconds).
    pub fn verify_session(&self, value: &str, now: i64) -> Option<(i64, i64)> {
        let (body, mac) = value.rsplit_once('.')?;
        if !constant_time_eq(mac, &self.mac("session", body)) {
            return None;
        }
        let mut parts = body.split('.');
        let id = parts.next()?.parse().ok()?;
        let issued_ms = parts.next()?.parse().ok()?;
        let expires: i64 = parts.next()?.parse().ok()?;
        (parts.next().is_none() && expires > now).then_some((id, issued_ms))
    }

    /// The CSRF token forms must carry for a browser with this CSRF cookie.
    pub fn csrf(&self, cookie: &str) -> String {
        self.mac("csrf", cookie)
    }

    pub fn verify_csrf(&self, cookie: &str, token: &str) -> bool {
        !cookie.is_empty() && constant_time_eq(token, &self.csrf(cookie))
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_with_the_right_password() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong", &hash));
        assert!(!verify_password("correct horse", "not a hash"));
    }

    #[test]
    fn session_cookies_cannot_be_forged_or_outlive_their_expiry() {
        let key = ConsoleKey::new("k");
        let cookie = key.session(7, 5, 1000);
        assert_eq!(key.verify_session(&cookie, 999), Some((7, 5)));
        assert_eq!(key.verify_session(&cookie, 1000), None);
        assert_eq!(key.verify_session(&cookie.replace("7.", "8."), 10), None);
        assert_eq!(key.verify_session(&cookie.replace(".5.", ".6."), 10), None);
        assert_eq!(ConsoleKey::new("other").verify_session(&cookie, 10), None);
        assert!(key.verify_csrf("abc", &key.csrf("abc")));
        assert!(!key.verify_csrf("abc", &key.csrf("abd")));
        assert!(!key.verify_csrf("", &key.csrf("")));
    }
}
