//! Bearer-token authentication: HS256 JWTs whose `sub` is the user id and whose `exp` is enforced.

use std::sync::Arc;

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use domain::UserId;

use crate::secret::Secret;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Service tokens only: the user the service acts for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub obo: Option<String>,
}

/// Who is calling: a user, or a service acting on behalf of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user: UserId,
    /// The service (`sub` of a service token), when the call comes from one.
    pub service: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing Authorization header")]
    Missing,
    #[error("the Authorization header must be `Bearer <token>`")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token is invalid")]
    Invalid,
}

/// Verifies and issues tokens. Cheap to clone (the keys are shared): the HTTP layers take it from
/// the application state on every request.
#[derive(Clone)]
pub struct JwtAuth(Arc<Keys>);

#[derive(Clone)]
struct Keys {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    /// Service identity: tokens signed with a secret users never see (`SERVICE_JWT_SECRET`).
    service: Option<(DecodingKey, EncodingKey)>,
    /// Tokens verified before, with their caller and `exp`. A client sends the same token with
    /// every request, and the command API checks it twice per command (rate limit, then handler):
    /// the HS256 checks took 3.4 % of its CPU at saturation. Only verified tokens are kept (at most
    /// `VERIFIED_TOKENS`, each until unused for 5 minutes), and a kept token still expires at its
    /// `exp`, as a stateless JWT does.
    verified: moka::sync::Cache<String, (Caller, i64)>,
}

/// How many verified tokens are remembered.
const VERIFIED_TOKENS: u64 = 100_000;

/// An empty cache of verified tokens (each kept until unused for 5 minutes).
fn verified_tokens() -> moka::sync::Cache<String, (Caller, i64)> {
    moka::sync::Cache::builder().max_capacity(VERIFIED_TOKENS).time_to_idle(std::time::Duration::from_secs(300)).build()
}

impl JwtAuth {
    pub fn new(secret: &Secret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self(Arc::new(Keys {
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            validation,
            service: None,
            verified: verified_tokens(),
        }))
    }

    /// Also accepts (and can issue) service tokens signed with `secret`.
    pub fn with_service_secret(mut self, secret: Option<&Secret>) -> Self {
        let keys = Arc::make_mut(&mut self.0);
        keys.service = secret.map(|s| (DecodingKey::from_secret(s.expose().as_bytes()), EncodingKey::from_secret(s.expose().as_bytes())));
        // What the other keys verified says nothing about these.
        keys.verified = verified_tokens();
        self
    }

    /// Checks an `Authorization` header value: a user token, or a service token acting for a user.
    pub fn authenticate_caller(&self, header: Option<&str>) -> Result<Caller, AuthError> {
        self.check(bearer(header)?)
    }

    /// A token verified before answers from the cache (until its `exp`); any other is verified.
    fn check(&self, token: &str) -> Result<Caller, AuthError> {
        if let Some((caller, exp)) = self.0.verified.get(token) {
            return match exp.saturating_add(self.0.validation.leeway as i64) >= chrono::Utc::now().timestamp() {
                true => Ok(caller),
                false => Err(AuthError::Expired),
            };
        }
        let (caller, exp) = self.verify_signed(token)?;
        self.0.verified.insert(token.to_owned(), (caller.clone(), exp));
        Ok(caller)
    }

    /// The caller of a token signed with the user secret, or with the service secret (acting for a
    /// user), and its `exp`.
    fn verify_signed(&self, token: &str) -> Result<(Caller, i64), AuthError> {
        let expired_or_invalid = |e: jsonwebtoken::errors::Error| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid,
        };
        match decode::<Claims>(token, &self.0.decoding, &self.0.validation) {
            Ok(data) => Ok((Caller { user: UserId::parse(data.claims.sub).map_err(|_| AuthError::Invalid)?, service: None }, data.claims.exp)),
            Err(e) => match (expired_or_invalid(e), &self.0.service) {
                (AuthError::Invalid, Some((key, _))) => {
                    let data = decode::<Claims>(token, key, &self.0.validation).map_err(expired_or_invalid)?;
                    let user = UserId::parse(data.claims.obo.ok_or(AuthError::Invalid)?).map_err(|_| AuthError::Invalid)?;
                    Ok((Caller { user, service: Some(data.claims.sub) }, data.claims.exp))
                }
                (e, _) => Err(e),
            },
        }
    }

    /// Issues a service token for `service` acting on behalf of `user`.
    pub fn issue_service(&self, service: &str, user: &UserId, ttl_seconds: i64) -> Option<String> {
        let (_, key) = self.0.service.as_ref()?;
        let now = chrono::Utc::now().timestamp();
        let claims = Claims { sub: service.to_owned(), exp: now + ttl_seconds, iat: Some(now), obo: Some(user.to_string()) };
        encode(&Header::new(Algorithm::HS256), &claims, key).ok()
    }

    /// Checks an `Authorization` header value and returns the caller.
    pub fn authenticate(&self, header: Option<&str>) -> Result<UserId, AuthError> {
        self.verify(bearer(header)?)
    }

    /// The user of a user token (a service token is refused here).
    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        match self.check(token)? {
            Caller { user, service: None } => Ok(user),
            Caller { service: Some(_), .. } => Err(AuthError::Invalid),
        }
    }

    /// Issues a token (used by `./dev`-like tooling and tests).
    pub fn issue(&self, user: &str, ttl_seconds: i64) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims { sub: user.to_owned(), exp: now + ttl_seconds, iat: Some(now), obo: None };
        encode(&Header::new(Algorithm::HS256), &claims, &self.0.encoding).expect("HS256 signing cannot fail")
    }
}

fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    header.strip_prefix("Bearer ").or_else(|| header.strip_prefix("bearer ")).map(str::trim).filter(|t| !t.is_empty()).ok_or(AuthError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_and_fail_as_expected() {
        let auth = JwtAuth::new(&Secret::new("s3cret"));
        let t = auth.issue("alice", 60);
        assert_eq!(auth.authenticate(Some(&format!("Bearer {t}"))).unwrap().as_ref(), "alice");
        assert_eq!(auth.authenticate(None), Err(AuthError::Missing));
        assert_eq!(auth.authenticate(Some(&t)), Err(AuthError::Malformed));
        assert_eq!(auth.authenticate(Some("Bearer x.y.z")), Err(AuthError::Invalid));
        assert_eq!(auth.verify(&auth.issue("alice", -3600)), Err(AuthError::Expired));
        let other = JwtAuth::new(&Secret::new("other"));
        assert_eq!(other.verify(&t), Err(AuthError::Invalid));
    }

    #[test]
    fn a_remembered_token_still_expires_and_other_keys_do_not_share_what_was_verified() {
        let auth = JwtAuth::new(&Secret::new("s3cret"));
        let t = auth.issue("alice", 60);
        assert_eq!(auth.verify(&t).unwrap().as_ref(), "alice");
        let (caller, exp) = auth.0.verified.get(t.as_str()).expect("remembered once verified");
        // Once its `exp` (plus the leeway) is past, a remembered token is refused as expired.
        auth.0.verified.insert(t.clone(), (caller, exp - 60 - auth.0.validation.leeway as i64 - 1));
        assert_eq!(auth.verify(&t), Err(AuthError::Expired));
        // Tokens that fail are not remembered.
        assert_eq!(auth.verify("x.y.z"), Err(AuthError::Invalid));
        assert!(auth.0.verified.get("x.y.z").is_none());
        // A service token verified once is still not a user token.
        let svc_auth = JwtAuth::new(&Secret::new("user-secret")).with_service_secret(Some(&Secret::new("svc-secret")));
        let svc = svc_auth.issue_service("service:projector", &UserId::parse("bob".into()).unwrap(), 60).unwrap();
        assert!(svc_auth.authenticate_caller(Some(&format!("Bearer {svc}"))).is_ok());
        assert_eq!(svc_auth.verify(&svc), Err(AuthError::Invalid));
        // Another JwtAuth (another secret) verifies for itself.
        let good = auth.issue("carol", 60);
        assert!(auth.verify(&good).is_ok());
        assert_eq!(JwtAuth::new(&Secret::new("other")).verify(&good), Err(AuthError::Invalid));
    }

    #[test]
    fn service_tokens_act_for_a_user_and_users_cannot_mint_them() {
        let auth = JwtAuth::new(&Secret::new("user-secret")).with_service_secret(Some(&Secret::new("svc-secret")));
        let alice = UserId::parse("alice".into()).unwrap();
        let svc = auth.issue_service("service:projector", &alice, 60).unwrap();
        let caller = auth.authenticate_caller(Some(&format!("Bearer {svc}"))).unwrap();
        assert_eq!(caller, Caller { user: alice.clone(), service: Some("service:projector".into()) });
        // A user token, even with an `obo` claim, is just that user.
        let user_token = auth.issue("mallory", 60);
        assert_eq!(auth.authenticate_caller(Some(&format!("Bearer {user_token}"))).unwrap().service, None);
        // Without the service secret configured, service tokens are refused.
        let plain = JwtAuth::new(&Secret::new("user-secret"));
        assert_eq!(plain.authenticate_caller(Some(&format!("Bearer {svc}"))), Err(AuthError::Invalid));
    }
}
