//! Value types. Each is parsed once at the edge (`parse` / `TryFrom`); the rest of the code cannot
//! hold a value that today's rules refuse, except one read back from the log.
//!
//! Deserializing reads facts: events that were valid when they were appended. It keeps what the
//! event says without re-checking today's limits (a title longer than a later, stricter limit, a tag
//! list longer than today's maximum, a rule a newer `rrule` would refuse), so that a stricter
//! validator can never make old events unreadable; only data that cannot be represented at all (a
//! number where a string belongs, a duration that is not ISO 8601, an unknown time zone) is refused.
//! Input from users never goes through `Deserialize` into these types: requests are parsed into
//! plain fields and then through `parse`.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeZone as _, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a single value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

impl ValidationError {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// A refused field of a command, as reported to clients (`{field, message}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

fn has_control_chars(s: &str, allow_newlines: bool) -> bool {
    s.chars().any(|c| c.is_control() && !(allow_newlines && matches!(c, '\n' | '\r' | '\t')))
}

macro_rules! string_newtype {
    ($name:ident) => {
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::parse(s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
    };
}

/// Deserializes a string newtype as the fact it is (see the module doc): no re-validation.
macro_rules! fact_string {
    ($name:ident) => {
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d).map(Self)
            }
        }
    };
}

/// A task id: a UUID, chosen by the client or generated (v7, time-ordered) by the command API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(Uuid);

impl TaskId {
    pub fn new_v7() -> Self {
        Self(Uuid::now_v7())
    }
    pub fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TaskId {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self).map_err(|_| ValidationError::new("must be a UUID"))
    }
}

/// The owner of a task: the `sub` of the caller's token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);
string_newtype!(UserId);

impl UserId {
    pub const MAX_LEN: usize = 255;
    pub fn parse(s: String) -> Result<Self, ValidationError> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(ValidationError::new(format!("must be 1..={} bytes", Self::MAX_LEN)));
        }
        if has_control_chars(&s, false) {
            return Err(ValidationError::new("must not contain control characters"));
        }
        Ok(Self(s))
    }
}

/// A task title: 1..=200 characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Title(String);
string_newtype!(Title);
fact_string!(Title);

impl Title {
    pub const MAX_CHARS: usize = 200;
    pub fn parse(s: String) -> Result<Self, ValidationError> {
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Err(ValidationError::new("must not be empty"));
        }
        if trimmed.chars().count() > Self::MAX_CHARS {
            return Err(ValidationError::new(format!("must be at most {} characters", Self::MAX_CHARS)));
        }
        if has_control_chars(trimmed, false) {
            return Err(ValidationError::new("must not contain control characters"));
        }
        Ok(Self(if trimmed.len() == s.len() { s } else { trimmed.to_owned() }))
    }
}

/// A task description: at most 10 000 characters (newlines and tabs allowed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Description(String);
string_newtype!(Description);
fact_string!(Description);

impl Description {
    pub const MAX_CHARS: usize = 10_000;
    pub fn parse(s: String) -> Result<Self, ValidationError> {
        if s.chars().count() > Self::MAX_CHARS {
            return Err(ValidationError::new(format!("must be at most {} characters", Self::MAX_CHARS)));
        }
        if has_control_chars(&s, true) {
            return Err(ValidationError::new("must not contain control characters other than newlines and tabs"));
        }
        Ok(Self(s))
    }
}

/// Task priority; `rank()` orders them (low = 0 .. urgent = 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Medium,
    High,
    Urgent,
}

impl Priority {
    pub const ALL: [Priority; 4] = [Priority::Low, Priority::Medium, Priority::High, Priority::Urgent];
    pub fn rank(self) -> i16 {
        self as i16
    }
    pub fn from_rank(rank: i16) -> Option<Self> {
        Self::ALL.get(usize::try_from(rank).ok()?).copied()
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Medium => "medium",
            Priority::High => "high",
            Priority::Urgent => "urgent",
        }
    }
}

impl FromStr for Priority {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| ValidationError::new("must be one of low, medium, high, urgent"))
    }
}

/// An IANA time zone name (e.g. `Europe/Berlin`); recurrence is evaluated in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TimeZone(chrono_tz::Tz);

impl TimeZone {
    pub const UTC: TimeZone = TimeZone(chrono_tz::Tz::UTC);
    pub fn parse(s: String) -> Result<Self, ValidationError> {
        s.parse::<chrono_tz::Tz>().map(Self).map_err(|_| ValidationError::new("must be an IANA time zone name, e.g. Europe/Berlin"))
    }
    pub fn tz(&self) -> chrono_tz::Tz {
        self.0
    }
    pub fn name(&self) -> &'static str {
        self.0.name()
    }
}

impl Default for TimeZone {
    fn default() -> Self {
        Self::UTC
    }
}

impl TryFrom<String> for TimeZone {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<TimeZone> for String {
    fn from(tz: TimeZone) -> String {
        tz.name().to_owned()
    }
}

/// An RFC 5545 recurrence rule (the RRULE value only, e.g. `FREQ=WEEKLY;BYDAY=MO`), validated with
/// the `rrule` crate and stored in its canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Recurrence(String);
string_newtype!(Recurrence);
fact_string!(Recurrence);

impl Recurrence {
    pub const MAX_LEN: usize = 1000;
    pub fn parse(s: String) -> Result<Self, ValidationError> {
        let raw = s.trim();
        let raw = raw.strip_prefix("RRULE:").unwrap_or(raw);
        if raw.is_empty() {
            return Err(ValidationError::new("must not be empty"));
        }
        if raw.len() > Self::MAX_LEN {
            return Err(ValidationError::new(format!("must be at most {} characters", Self::MAX_LEN)));
        }
        if raw.contains(['\n', '\r']) || raw.to_ascii_uppercase().contains("DTSTART") {
            return Err(ValidationError::new("must be a single RRULE value without DTSTART (the start is the task's due_at)"));
        }
        let rule: rrule::RRule<rrule::Unvalidated> = raw.parse().map_err(|e: rrule::RRuleError| ValidationError::new(format!("invalid RRULE: {e}")))?;
        // Validate against a fixed start; the real start (due_at in the task's zone) is applied
        // when occurrences are computed.
        let start = rrule::Tz::UTC.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).single().expect("valid fixed date");
        let canonical = rule.to_string();
        rule.validate(start).map_err(|e| ValidationError::new(format!("invalid RRULE: {e}")))?;
        Ok(Self(canonical))
    }
}

/// How long before `due_at` the reminder fires: an ISO 8601 duration with fixed-length units only
/// (`PnW`, or `PnDTnHnMnS`; years and months have no fixed length and are refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct RemindBefore {
    text: String,
    seconds: i64,
}

impl RemindBefore {
    pub const MAX_SECONDS: i64 = 366 * 24 * 3600;
    pub fn parse(s: String) -> Result<Self, ValidationError> {
        let seconds = parse_iso8601_duration(&s)?;
        if seconds <= 0 {
            return Err(ValidationError::new("must be longer than zero"));
        }
        if seconds > Self::MAX_SECONDS {
            return Err(ValidationError::new("must be at most 366 days"));
        }
        Ok(Self { text: s, seconds })
    }
    pub fn seconds(&self) -> i64 {
        self.seconds
    }
    pub fn as_duration(&self) -> chrono::Duration {
        chrono::Duration::seconds(self.seconds)
    }
    /// When the reminder fires for a task due at `due_at`.
    pub fn remind_at(&self, due_at: DateTime<Utc>) -> DateTime<Utc> {
        due_at - self.as_duration()
    }
}

impl AsRef<str> for RemindBefore {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl<'de> Deserialize<'de> for RemindBefore {
    /// The duration as recorded: it must be ISO 8601 (to be read at all), but today's range
    /// (more than zero, at most 366 days) is not applied to a fact.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let seconds = parse_iso8601_duration(&text).map_err(serde::de::Error::custom)?;
        Ok(Self { text, seconds })
    }
}

impl TryFrom<String> for RemindBefore {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<RemindBefore> for String {
    fn from(v: RemindBefore) -> String {
        v.text
    }
}

fn parse_iso8601_duration(s: &str) -> Result<i64, ValidationError> {
    let bad = || ValidationError::new("must be an ISO 8601 duration such as PT30M, PT1H30M, P1D or P1W");
    let rest = s.strip_prefix('P').ok_or_else(bad)?;
    if rest.is_empty() {
        return Err(bad());
    }
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) if !t.is_empty() => (d, Some(t)),
        Some(_) => return Err(bad()),
        None => (rest, None),
    };
    let mut total: i64 = 0;
    let mut parse_part = |part: &str, units: &[(char, i64)]| -> Result<(), ValidationError> {
        let mut num = String::new();
        let mut next_unit = 0;
        for c in part.chars() {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            if matches!(c, 'Y') || (c == 'M' && units[0].0 == 'W') {
                return Err(ValidationError::new("years and months have no fixed length; use weeks, days, hours, minutes or seconds"));
            }
            let pos = units.iter().position(|(u, _)| *u == c).ok_or_else(bad)?;
            if num.is_empty() || pos < next_unit {
                return Err(bad());
            }
            let n: i64 = num.parse().map_err(|_| bad())?;
            total = n.checked_mul(units[pos].1).and_then(|v| total.checked_add(v)).ok_or_else(|| ValidationError::new("is too long"))?;
            num.clear();
            next_unit = pos + 1;
        }
        if !num.is_empty() {
            return Err(bad());
        }
        Ok(())
    };
    parse_part(date, &[('W', 7 * 86_400), ('D', 86_400)])?;
    if let Some(time) = time {
        parse_part(time, &[('H', 3_600), ('M', 60), ('S', 1)])?;
    }
    Ok(total)
}

/// A tag: 1..=50 characters after trimming.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "String")]
pub struct Tag(String);
string_newtype!(Tag);
fact_string!(Tag);

impl Tag {
    pub const MAX_CHARS: usize = 50;
    pub fn parse(s: String) -> Result<Self, ValidationError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(ValidationError::new("tags must not be empty"));
        }
        if t.chars().count() > Self::MAX_CHARS {
            return Err(ValidationError::new(format!("tags must be at most {} characters", Self::MAX_CHARS)));
        }
        if has_control_chars(t, false) {
            return Err(ValidationError::new("tags must not contain control characters"));
        }
        Ok(Self(t.to_owned()))
    }
}

/// At most 20 distinct tags, in the order given (duplicates are dropped).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(into = "Vec<String>")]
pub struct Tags(Vec<Tag>);

impl<'de> Deserialize<'de> for Tags {
    /// The tags as recorded (a fact: neither today's count nor today's length limits apply).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<String>::deserialize(d).map(|v| Self(v.into_iter().map(Tag).collect()))
    }
}

impl Tags {
    pub const MAX: usize = 20;
    pub fn parse(raw: Vec<String>) -> Result<Self, ValidationError> {
        if raw.len() > Self::MAX {
            return Err(ValidationError::new(format!("at most {} tags", Self::MAX)));
        }
        let mut tags: Vec<Tag> = Vec::with_capacity(raw.len());
        for s in raw {
            let tag = Tag::parse(s)?;
            if !tags.contains(&tag) {
                tags.push(tag);
            }
        }
        Ok(Self(tags))
    }
    pub fn iter(&self) -> impl Iterator<Item = &Tag> {
        self.0.iter()
    }
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|t| t.0.clone()).collect()
    }
}

impl TryFrom<Vec<String>> for Tags {
    type Error = ValidationError;
    fn try_from(v: Vec<String>) -> Result<Self, Self::Error> {
        Self::parse(v)
    }
}

impl From<Tags> for Vec<String> {
    fn from(t: Tags) -> Self {
        t.0.into_iter().map(|t| t.0).collect()
    }
}

/// The JSON Schema of a value type (`schemas/`, generated from these impls), inlined where it is used.
/// It accepts what the log's reader accepts (see the module doc): what cannot be represented at all
/// (a non-UUID id, an unknown priority, a duration that is not ISO 8601) is refused by keywords;
/// today's input limits are stated in the description only, since an older fact may exceed a later,
/// stricter limit and must stay valid.
macro_rules! value_schema {
    ($name:ident, $($schema:tt)+) => {
        impl schemars::JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn inline_schema() -> bool {
                true
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!($($schema)+)
            }
        }
    };
}

/// ISO 8601 durations with fixed-length units, as `RemindBefore` reads them: `PnW`, `PnD`, `PnWnD`,
/// optionally followed by `T` and hours, minutes, seconds in that order (at least one unit).
pub const ISO_DURATION_PATTERN: &str =
    r"^P(?:(?:[0-9]+W)?(?:[0-9]+D)?T(?:[0-9]+H(?:[0-9]+M)?(?:[0-9]+S)?|[0-9]+M(?:[0-9]+S)?|[0-9]+S)|[0-9]+W(?:[0-9]+D)?|[0-9]+D)$";

value_schema!(TaskId, {"type": "string", "format": "uuid", "description": "A task id (UUID): the record key and ce_subject of the task's events."});
value_schema!(UserId, {"type": "string", "minLength": 1, "maxLength": 255, "description": "A user id: the `sub` of the user's token (1..=255 bytes, no control characters)."});
value_schema!(Title, {"type": "string", "description": "The task title (written trimmed, 1..=200 characters, no control characters)."});
value_schema!(Description, {"type": "string", "description": "The task description (written with at most 10 000 characters; newlines and tabs allowed)."});
value_schema!(Priority, {"type": "string", "enum": ["low", "medium", "high", "urgent"], "description": "The task priority."});
value_schema!(TimeZone, {"type": "string", "description": "An IANA time zone name, e.g. Europe/Berlin (recurrence is evaluated in it); an unknown name is refused."});
value_schema!(Recurrence, {"type": "string", "description": "An RFC 5545 RRULE value without DTSTART, e.g. FREQ=WEEKLY;BYDAY=MO (the series starts at due_at)."});
value_schema!(RemindBefore, {"type": "string", "pattern": ISO_DURATION_PATTERN, "description": "How long before due_at the reminder fires: an ISO 8601 duration with fixed-length units (weeks, days, hours, minutes, seconds), e.g. PT30M; written within (0, 366 days]."});
value_schema!(Tag, {"type": "string", "description": "A tag (written trimmed, 1..=50 characters)."});
value_schema!(Tags, {"type": "array", "items": {"type": "string"}, "description": "Tags in the order given, without duplicates (written with at most 20, each 1..=50 characters)."});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn title_is_trimmed_and_bounded() {
        assert_eq!(Title::parse("  hi  ".into()).unwrap().as_ref(), "hi");
        assert!(Title::parse("   ".into()).is_err());
        assert!(Title::parse("x".repeat(200)).is_ok());
        assert!(Title::parse("é".repeat(201)).is_err());
        assert!(Title::parse("a\u{0}b".into()).is_err());
    }

    #[test]
    fn description_allows_newlines_but_not_other_controls() {
        assert!(Description::parse("a\nb\tc".into()).is_ok());
        assert!(Description::parse("a\u{7}".into()).is_err());
        assert!(Description::parse("x".repeat(10_001)).is_err());
    }

    #[test]
    fn durations_have_fixed_units_only() {
        let secs = |s: &str| RemindBefore::parse(s.into()).map(|d| d.seconds());
        assert_eq!(secs("PT30M"), Ok(1800));
        assert_eq!(secs("PT1H30M"), Ok(5400));
        assert_eq!(secs("P1D"), Ok(86_400));
        assert_eq!(secs("P1W"), Ok(604_800));
        assert_eq!(secs("P1DT1S"), Ok(86_401));
        for bad in ["", "P", "PT", "30M", "PT30", "P1M", "P1Y", "PTM", "PT1M1H", "PT0S", "P400D", "pt30m"] {
            assert!(secs(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn recurrence_is_validated_and_canonical() {
        assert_eq!(Recurrence::parse("FREQ=WEEKLY;BYDAY=MO".into()).unwrap().as_ref(), "FREQ=WEEKLY;BYDAY=MO");
        assert!(Recurrence::parse("RRULE:FREQ=DAILY;COUNT=3".into()).is_ok());
        for bad in ["", "FREQ=SOMETIMES", "BYDAY=MO", "FREQ=DAILY;BYMONTH=13", "FREQ=DAILY;COUNT=x", "DTSTART:20200101T000000Z\nRRULE:FREQ=DAILY"] {
            assert!(Recurrence::parse(bad.into()).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn tags_are_bounded_and_deduplicated() {
        let t = Tags::parse(vec!["a".into(), " a ".into(), "b".into()]).unwrap();
        assert_eq!(t.to_strings(), vec!["a", "b"]);
        assert!(Tags::parse((0..21).map(|i| i.to_string()).collect()).is_err());
        assert!(Tags::parse(vec!["x".repeat(51)]).is_err());
        assert!(Tags::parse(vec!["".into()]).is_err());
    }

    #[test]
    fn timezone_and_priority_parse() {
        assert_eq!(TimeZone::parse("America/New_York".into()).unwrap().name(), "America/New_York");
        assert!(TimeZone::parse("Mars/Olympus".into()).is_err());
        assert_eq!("urgent".parse::<Priority>(), Ok(Priority::Urgent));
        assert!("URGENT".parse::<Priority>().is_err());
        assert_eq!(Priority::from_rank(2), Some(Priority::High));
    }
}
