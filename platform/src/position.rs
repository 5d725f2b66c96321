//! The consistency token: where in the log a command's events landed. Opaque to clients
//! (`v1.<partition>.<offset>`, base64url), so its encoding can change.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub partition: i32,
    /// Offset of the last record the command appended.
    pub offset: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid consistency token")]
pub struct InvalidToken;

impl Position {
    pub fn token(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("v1.{}.{}", self.partition, self.offset))
    }

    pub fn from_token(token: &str) -> Result<Self, InvalidToken> {
        let raw = URL_SAFE_NO_PAD.decode(token.trim()).map_err(|_| InvalidToken)?;
        let raw = String::from_utf8(raw).map_err(|_| InvalidToken)?;
        let mut parts = raw.split('.');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("v1"), Some(p), Some(o), None) => {
                let partition: i32 = p.parse().map_err(|_| InvalidToken)?;
                let offset: i64 = o.parse().map_err(|_| InvalidToken)?;
                if partition < 0 || offset < 0 {
                    return Err(InvalidToken);
                }
                Ok(Self { partition, offset })
            }
            _ => Err(InvalidToken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let p = Position { partition: 7, offset: 123_456 };
        assert_eq!(Position::from_token(&p.token()), Ok(p));
        for bad in ["", "x", "djEuMS4y.", &URL_SAFE_NO_PAD.encode("v2.1.2"), &URL_SAFE_NO_PAD.encode("v1.-1.2")] {
            assert_eq!(Position::from_token(bad), Err(InvalidToken), "{bad}");
        }
    }
}
