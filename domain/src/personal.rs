//! Which fields of the event data are personal: free text a user wrote (titles, descriptions,
//! tags), where their data goes (the webhook URL) and credentials (the webhook's signing secret).
//! The adapters seal these fields with the user's data key before anything reaches the log, so
//! that destroying the key erases them (crypto-shredding); every other field stays readable to
//! any consumer of the log. A new free-text field must be listed here.

/// The personal fields of the data of `event_type` (`ce_type`; `task.state` is the value of
/// `task-updates`). Each is a string or an array of strings; `null` stays `null`.
pub fn personal_fields(event_type: &str) -> &'static [&'static str] {
    match event_type {
        "task.created" | "task.updated" | "task.state" => &["title", "description", "tags"],
        // v2 calls the secret `signing_secret`, v1 `secret`.
        "webhook.registered" => &["url", "signing_secret", "secret"],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::DomainEvent;
    use crate::{TaskEvent, UserEvent};

    #[test]
    fn every_string_field_a_user_writes_is_personal() {
        for t in ["task.created", "task.updated", "task.state"] {
            assert_eq!(personal_fields(t), ["title", "description", "tags"]);
        }
        assert!(personal_fields("webhook.registered").contains(&"signing_secret"));
        // Events without free text have nothing to seal.
        for t in TaskEvent::TYPES.iter().chain(UserEvent::TYPES).filter(|t| !matches!(**t, "task.created" | "task.updated" | "webhook.registered")) {
            assert!(personal_fields(t).is_empty(), "{t}");
        }
    }
}
