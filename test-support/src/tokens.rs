//! Bearer tokens for tests, signed by `platform::auth::JwtAuth`: the code the services verify them
//! with, so a test token is exactly what a client would send.

use domain::UserId;
use platform::auth::JwtAuth;
use platform::secret::Secret;

/// The user-token secret (`AUTH_JWT_SECRET`) the tests configure the services with: strong enough
/// (at least 32 bytes, not a known default) that the services start without dev mode.
pub const USER_SECRET: &str = "taskstream-test-user-secret-4mX9qT2vR7wK";
/// The service-token secret (`SERVICE_JWT_SECRET`) the tests configure the services with (as strong).
pub const SERVICE_SECRET: &str = "taskstream-test-service-secret-8pL3nZ6cH1yD";
/// The key-encryption key of the test stacks (`TASKSTREAM_KEK`: id:base64 of 32 bytes).
pub const TEST_KEK: &str = "test1:dGFza3N0cmVhbS10ZXN0LWtlay0xLTMyLWJ5dGVzISE";

/// How long a test token is valid.
const TTL_SECONDS: i64 = 3600;

/// Signs user and service tokens with the test secrets (or another user secret, to play a
/// foreign issuer).
#[derive(Clone)]
pub struct Tokens {
    auth: JwtAuth,
}

impl Default for Tokens {
    fn default() -> Self {
        Self::signed_with(USER_SECRET)
    }
}

impl Tokens {
    /// Tokens signed with `secret` instead of the test secret: a service configured with the
    /// test secret refuses them.
    pub fn signed_with(secret: &str) -> Self {
        Self { auth: JwtAuth::new(&Secret::new(secret)).with_service_secret(Some(&Secret::new(SERVICE_SECRET))) }
    }

    /// The verifier an app under test is built with: user tokens of this signer, and service
    /// tokens signed with `SERVICE_SECRET`.
    pub fn auth(&self) -> JwtAuth {
        self.auth.clone()
    }

    /// A token of `user`, valid for an hour.
    pub fn user(&self, user: &str) -> String {
        self.auth.issue(user, TTL_SECONDS)
    }

    /// `Bearer <token of user>`, an `Authorization` header value.
    pub fn bearer(&self, user: &str) -> String {
        format!("Bearer {}", self.user(user))
    }

    /// A token of `user` that expired an hour ago.
    pub fn expired(&self, user: &str) -> String {
        self.auth.issue(user, -TTL_SECONDS)
    }

    /// A service token: `service` acting on behalf of `user`, valid for an hour.
    pub fn service(&self, service: &str, user: &str) -> String {
        let user = UserId::parse(user.to_owned()).expect("a valid user id");
        self.auth.issue_service(service, &user, TTL_SECONDS).expect("a signer with a service secret")
    }
}

#[cfg(test)]
mod tests {
    use platform::auth::AuthError;

    use super::Tokens;

    #[test]
    fn tokens_verify_as_the_services_verify_them() {
        let tokens = Tokens::default();
        let auth = tokens.auth();
        assert_eq!(auth.verify(&tokens.user("alice")).unwrap().as_ref(), "alice");
        assert_eq!(auth.authenticate(Some(&tokens.bearer("alice"))).unwrap().as_ref(), "alice");
        assert_eq!(auth.verify(&tokens.expired("alice")), Err(AuthError::Expired));
        assert_eq!(auth.verify(&Tokens::signed_with("another secret").user("alice")), Err(AuthError::Invalid));
        let caller = auth.authenticate_caller(Some(&format!("Bearer {}", tokens.service("service:projector", "alice")))).unwrap();
        assert_eq!((caller.user.as_ref(), caller.service.as_deref()), ("alice", Some("service:projector")));
    }

    #[test]
    fn the_test_secrets_pass_the_production_rules() {
        for (var, secret) in [("AUTH_JWT_SECRET", super::USER_SECRET), ("SERVICE_JWT_SECRET", super::SERVICE_SECRET)] {
            assert_eq!(platform::secret::check(var, Some(&platform::secret::Secret::new(secret))), Ok(()));
        }
    }
}
