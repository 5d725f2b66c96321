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
        }))
    }

    /// Also accepts (and can issue) service tokens signed with `secret`.
    pub fn with_service_secret(mut self, secret: Option<&Secret>) -> Self {
        Arc::make_mut(&mut self.0).service = secret.map(|s| (DecodingKey::from_secret(s.expose().as_bytes()), EncodingKey::from_secret(s.expose().as_bytes())));
        self
    }

    /// Checks an `Authorization` header value: a user token, or a service token acting for a user.
    pub fn authenticate_caller(&self, header: Option<&str>) -> Result<Caller, AuthError> {
        let token = bearer(header)?;
        match self.verify(token) {
            Ok(user) => Ok(Caller { user, service: None }),
            Err(AuthError::Invalid) if self.0.service.is_some() => {
                let (key, _) = self.0.service.as_ref().expect("checked");
                let data = decode::<Claims>(token, key, &self.0.validation).map_err(|e| match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                    _ => AuthError::Invalid,
                })?;
                let user = data.claims.obo.ok_or(AuthError::Invalid)?;
                let user = UserId::parse(user).map_err(|_| AuthError::Invalid)?;
                Ok(Caller { user, service: Some(data.claims.sub) })
            }
            Err(e) => Err(e),
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

    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        let data = decode::<Claims>(token, &self.0.decoding, &self.0.validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid,
        })?;
        UserId::parse(data.claims.sub).map_err(|_| AuthError::Invalid)
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
