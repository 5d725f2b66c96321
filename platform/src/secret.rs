//! A string that never prints, and the rules a signing secret must meet outside development.
//!
//! The services sign and verify HS256 tokens with their secrets (`AUTH_JWT_SECRET`,
//! `SERVICE_JWT_SECRET`). [`check`] refuses a secret that is missing, one of the well-known example
//! values ([`KNOWN_DEFAULTS`]: deploy-file placeholders, the dev secrets of `./dev`) or shorter than
//! [`MIN_SECRET_BYTES`]; `platform::settings::SecretPolicy` decides whether that stops the service
//! (production) or is a loud warning (`TASKSTREAM_DEV=1`, set by the dev commands).

use std::fmt;
use std::str::FromStr;

#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// The fewest bytes a signing secret may have: an HS256 key shorter than the hash output (32
/// bytes) is weaker than the algorithm (RFC 7518, section 3.2).
pub const MIN_SECRET_BYTES: usize = 32;

/// Secrets everyone knows (compared without case and surrounding blanks): placeholders of example
/// and deploy files, and the dev secrets `./dev` uses.
pub const KNOWN_DEFAULTS: &[&str] = &[
    "change-me",
    "change-me-too",
    "changeme",
    "change_me",
    "changeit",
    "secret",
    "password",
    "jwt-secret",
    "your-secret",
    "your-256-bit-secret",
    "taskstream-dev-secret",
    "taskstream-dev-service-secret",
];

/// Why a secret must not be used outside development; the message names the variable and says
/// what to do (never the value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeakSecret {
    #[error("{var} is not set: set it to a random secret of at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -base64 48`)")]
    Missing { var: &'static str },
    #[error("{var} is a well-known default value (like change-me or a ./dev secret): set it to a random secret of at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -base64 48`)")]
    KnownDefault { var: &'static str },
    #[error("{var} is only {len} bytes long: it must have at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -base64 48`)")]
    TooShort { var: &'static str, len: usize },
}

/// Checks the secret configured in the environment variable `var` (`None`: not set).
pub fn check(var: &'static str, secret: Option<&Secret>) -> Result<(), WeakSecret> {
    let value = secret.map(Secret::expose).unwrap_or_default();
    if value.trim().is_empty() {
        return Err(WeakSecret::Missing { var });
    }
    if KNOWN_DEFAULTS.iter().any(|known| value.trim().eq_ignore_ascii_case(known)) {
        return Err(WeakSecret::KnownDefault { var });
    }
    if value.len() < MIN_SECRET_BYTES {
        return Err(WeakSecret::TooShort { var, len: value.len() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(value: Option<&str>) -> Result<(), WeakSecret> {
        check("AUTH_JWT_SECRET", value.map(Secret::new).as_ref())
    }

    #[test]
    fn a_missing_or_blank_secret_is_refused() {
        assert_eq!(checked(None), Err(WeakSecret::Missing { var: "AUTH_JWT_SECRET" }));
        assert_eq!(checked(Some("")), Err(WeakSecret::Missing { var: "AUTH_JWT_SECRET" }));
        assert_eq!(checked(Some("   ")), Err(WeakSecret::Missing { var: "AUTH_JWT_SECRET" }));
    }

    #[test]
    fn well_known_defaults_are_refused_whatever_their_case() {
        for known in ["change-me", "CHANGE-ME", " changeme ", "change-me-too", "secret", "Secret", "taskstream-dev-secret", "taskstream-dev-service-secret"] {
            assert_eq!(checked(Some(known)), Err(WeakSecret::KnownDefault { var: "AUTH_JWT_SECRET" }), "{known:?}");
        }
    }

    #[test]
    fn a_secret_shorter_than_32_bytes_is_refused() {
        assert_eq!(checked(Some("a-random-looking-31-byte-value!")), Err(WeakSecret::TooShort { var: "AUTH_JWT_SECRET", len: 31 }));
        // Bytes, not characters: 16 two-byte characters are 32 bytes.
        assert_eq!(checked(Some(&"é".repeat(16))), Ok(()));
        assert_eq!(checked(Some(&"x".repeat(MIN_SECRET_BYTES))), Ok(()));
        assert_eq!(checked(Some("kq3V8cXl0S2m9rTzB7wY1nE5uH4jP6aD+fG/Q==")), Ok(()));
    }

    #[test]
    fn the_message_names_the_variable_and_never_the_value() {
        let value = "short-but-private";
        let e = check("SERVICE_JWT_SECRET", Some(&Secret::new(value))).unwrap_err().to_string();
        assert!(e.starts_with("SERVICE_JWT_SECRET is only 17 bytes long"), "{e}");
        assert!(e.contains("at least 32 bytes"), "{e}");
        assert!(!e.contains(value), "{e}");
        let e = check("SERVICE_JWT_SECRET", None).unwrap_err().to_string();
        assert!(e.starts_with("SERVICE_JWT_SECRET is not set"), "{e}");
        let e = check("AUTH_JWT_SECRET", Some(&Secret::new("change-me"))).unwrap_err().to_string();
        assert!(e.starts_with("AUTH_JWT_SECRET is a well-known default value"), "{e}");
    }

    #[test]
    fn debug_never_prints_the_value() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "Secret(***)");
    }
}
