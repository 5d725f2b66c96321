//! Upcasters: older schema versions of event data, read into today's shape. An event's data is
//! never rewritten in the log; a record says which version its data is in (`ce_dataschema`,
//! `urn:taskstream:schema:<type>:v<N>`, version 1 when absent), and the reader turns an older version
//! into the current type here, purely, before anything (a decider's restore, a projection, a
//! rebuild) sees it. So a renamed, retyped or newly required field is a new version plus one
//! upcaster, and every consumer of the domain types reads old and new records alike.
//!
//! Each older version keeps its own type (with its JSON Schema, which stays in the catalogue: the
//! records are still in the log) and a `From` into the current one.

use serde::{Deserialize, Serialize};

use crate::user::{WebhookRegistered, WebhookUrl};

/// `webhook.registered` v1: the signing secret was called `secret`. v2 calls it `signing_secret`
/// (the HMAC-SHA256 key that signs the deliveries, the `Taskstream-Signature` header), so that a consumer
/// does not take it for a credential of the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WebhookRegisteredV1 {
    pub url: WebhookUrl,
    /// The HMAC-SHA256 signing secret.
    pub secret: String,
}

impl From<WebhookRegisteredV1> for WebhookRegistered {
    fn from(v1: WebhookRegisteredV1) -> Self {
        WebhookRegistered { url: v1.url, secret: v1.secret }
    }
}

#[cfg(test)]
mod tests {
    use crate::aggregate::DomainEvent;
    use crate::user::UserEvent;
    use crate::values::UserId;

    fn alice() -> UserId {
        UserId::parse("alice".into()).unwrap()
    }

    #[test]
    fn a_v1_webhook_registration_reads_as_the_v2_event() {
        let v1 = br#"{"url": "https://example.com/hook", "secret": "0123456789abcdef"}"#;
        let e = UserEvent::from_versioned_json(&alice(), "webhook.registered", 1, v1).unwrap();
        let UserEvent::WebhookRegistered(w) = &e else { panic!("not a registration: {e:?}") };
        assert_eq!((w.url.as_ref(), w.secret.as_str()), ("https://example.com/hook", "0123456789abcdef"));
        // Written again, it is v2.
        assert_eq!(e.schema_version(), 2);
        let v2: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v2, serde_json::json!({"url": "https://example.com/hook", "signing_secret": "0123456789abcdef"}));
        assert_eq!(UserEvent::from_versioned_json(&alice(), "webhook.registered", 2, &e.to_json()).unwrap(), e);
    }

    #[test]
    fn each_version_reads_only_its_own_shape() {
        // v1 data labelled v2 (or v2 data labelled v1) lacks the field its version requires.
        assert!(UserEvent::from_versioned_json(&alice(), "webhook.registered", 2, br#"{"url": "https://a.example", "secret": "s"}"#).is_err());
        assert!(UserEvent::from_versioned_json(&alice(), "webhook.registered", 1, br#"{"url": "https://a.example", "signing_secret": "s"}"#).is_err());
        // A newer version than this code knows is read as the current one (new versions only add
        // optional fields, or come with an upcaster in the code that writes them).
        assert!(UserEvent::from_versioned_json(&alice(), "webhook.registered", 3, br#"{"url": "https://a.example", "signing_secret": "s", "x": 1}"#).is_ok());
        // Versions of other types are their own: notification.read v1 is the current one.
        assert!(UserEvent::from_versioned_json(&alice(), "notification.read", 1, br#"{"notification_id": "00000000-0000-0000-0000-000000000001"}"#).is_ok());
    }
}
