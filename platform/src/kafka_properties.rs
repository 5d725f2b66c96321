//! librdkafka properties an operator gives every Kafka client of a service (producers, consumers,
//! admin clients), e.g. to reach a secured cluster: `security.protocol=SASL_SSL`,
//! `sasl.mechanism=SCRAM-SHA-512`, `sasl.username`, `sasl.password`, `ssl.ca.location`.
//!
//! Two sources, read once at start-up (`KafkaSettings::kafka_config`):
//!
//! - a Java-style properties file named by `KAFKA_CONFIG_FILE`: one `name=value` (or `name: value`)
//!   per line, blank lines and lines starting with `#` or `!` ignored, no line continuations;
//! - environment variables `KAFKA_CONFIG_<NAME>`: the property name upper-cased, each `.` written
//!   as `_` and each `_` as `__` (`KAFKA_CONFIG_SASL_PASSWORD` -> `sasl.password`,
//!   `KAFKA_CONFIG_LOG__LEVEL` -> `log_level`). A variable wins over the file for the same property.
//!
//! Every property is checked by librdkafka itself when the settings are read, so an unknown name or
//! a bad value stops the service at start-up with a message naming the variable or the file and
//! line. Properties taskstream sets itself because its correctness depends on them
//! ([`RESERVED`]: the brokers, client ids, consumer groups, transactions, idempotence, offsets) are
//! refused the same way; any other property applies to every client, except that a client which
//! sets a tuning property itself (e.g. the command API producer's `linger.ms`) keeps its own value.
//! Aliases are folded into one name first (`request.required.acks` is `acks`), so a property cannot
//! slip past either rule under its other name.
//!
//! Values of sensitive properties (passwords, secrets, private keys; [`is_sensitive`]) are never
//! printed: not by `Debug`, not in an error.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;

/// The prefix of the environment variables that set a property.
pub const ENV_PREFIX: &str = "KAFKA_CONFIG_";
/// The environment variable naming the properties file.
pub const FILE_VAR: &str = "KAFKA_CONFIG_FILE";

/// Properties taskstream sets itself, with the reason an operator may not change them.
pub const RESERVED: &[(&str, &str)] = &[
    ("bootstrap.servers", "the brokers are KAFKA_BROKERS"),
    ("client.id", "each client is named after its purpose (taskstream-command-api, taskstream-projector-dlq, ...)"),
    ("group.id", "the consumer groups are taskstream's own (the command API's partition ownership, the projector's group)"),
    ("group.instance.id", "the consumer groups are taskstream's own (one static id shared by every client would fence them)"),
    ("group.protocol", "the consumer groups use the protocol of KIP-848 (group.protocol=consumer)"),
    ("transactional.id", "the command API derives its transactional ids from KAFKA_TRANSACTIONAL_ID"),
    ("transaction.timeout.ms", "the command API sets it from KAFKA_TRANSACTION_TIMEOUT_MS"),
    ("enable.idempotence", "producers are idempotent: a retried send never duplicates an event"),
    ("acks", "a command is answered only once its events are on every in-sync replica (acks=all)"),
    ("isolation.level", "readers see committed transactions only (read_committed)"),
    ("enable.auto.commit", "consumers store their offsets with the work they did (in PostgreSQL or a transaction)"),
    ("enable.auto.offset.store", "consumers store their offsets with the work they did (in PostgreSQL or a transaction)"),
    ("auto.offset.reset", "each consumer decides where it starts reading"),
    ("enable.partition.eof", "the readers that read to the end of the log ask for it themselves"),
];

/// librdkafka's aliases (CONFIGURATION.md), each folded into the name taskstream uses.
const ALIASES: &[(&str, &str)] = &[
    ("metadata.broker.list", "bootstrap.servers"),
    ("request.required.acks", "acks"),
    ("auto.commit.enable", "enable.auto.commit"),
    ("queue.buffering.max.ms", "linger.ms"),
    ("delivery.timeout.ms", "message.timeout.ms"),
    ("fetch.message.max.bytes", "max.partition.fetch.bytes"),
    ("message.send.max.retries", "retries"),
    ("compression.codec", "compression.type"),
    ("max.in.flight", "max.in.flight.requests.per.connection"),
    ("sasl.mechanisms", "sasl.mechanism"),
    ("sasl.oauthbearer.client.credentials.client.id", "sasl.oauthbearer.client.id"),
    ("sasl.oauthbearer.client.credentials.client.secret", "sasl.oauthbearer.client.secret"),
];

/// Whether a property's value must never be printed: librdkafka's sensitive properties (passwords,
/// secrets, private keys and their locations, inline PEM, the SASL user name) and anything named
/// like them.
pub fn is_sensitive(name: &str) -> bool {
    const EXACT: &[&str] = &["sasl.username", "ssl.key.location", "ssl.ca.pem", "sasl.oauthbearer.config", "ssl_key"];
    const PARTS: &[&str] = &["password", "secret", "passphrase", "private.key", "key.pem", "jaas"];
    EXACT.contains(&name) || PARTS.iter().any(|p| name.contains(p))
}

/// Where a property was set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Env(String),
    File { path: PathBuf, line: usize },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Env(var) => write!(f, "{var}"),
            Origin::File { path, line } => write!(f, "{} line {line}", path.display()),
        }
    }
}

#[derive(Clone)]
struct Property {
    value: String,
    origin: Origin,
}

/// The operator's librdkafka properties, checked; applied by `platform::kafka::client_config`.
#[derive(Clone, Default)]
pub struct ClientProperties(BTreeMap<String, Property>);

/// Why the properties cannot be used: every problem found, each naming where it was set (never
/// a sensitive value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Kafka client settings (KAFKA_CONFIG_FILE / KAFKA_CONFIG_*): {}", .0.join("; "))]
pub struct PropertiesError(pub Vec<String>);

impl ClientProperties {
    /// The value parser of `KafkaSettings::kafka_config` (`--kafka-config-file`, env
    /// `KAFKA_CONFIG_FILE`, default empty): that file, if any, and the `KAFKA_CONFIG_*` variables
    /// of the process.
    pub fn parse_arg(file: &str) -> Result<Self, PropertiesError> {
        let file = (!file.is_empty()).then(|| PathBuf::from(file));
        Self::load(file.as_deref(), std::env::vars_os())
    }

    /// From a properties file (if any) and environment variables (`KAFKA_CONFIG_*`; the others,
    /// and `KAFKA_CONFIG_FILE`, are skipped); a variable wins over the file.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (OsString, OsString)>) -> Result<Self, PropertiesError> {
        let mut problems = Vec::new();
        let mut props = BTreeMap::new();
        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let mut seen: BTreeMap<String, Origin> = BTreeMap::new();
                    for (line, name, value) in parse_file(path, &text, &mut problems) {
                        let origin = Origin::File { path: path.to_owned(), line };
                        let name = canonical(&name);
                        if let Some(first) = seen.insert(name.clone(), origin.clone()) {
                            problems.push(format!("{origin}: {name} is already set on line {}", line_of(&first)));
                        }
                        props.insert(name, Property { value, origin });
                    }
                }
                Err(e) => problems.push(format!("{FILE_VAR}={}: cannot read it: {e}", path.display())),
            }
        }
        let mut vars: Vec<(String, String)> = Vec::new();
        for (key, value) in env {
            let Some(key) = key.to_str().filter(|k| k.starts_with(ENV_PREFIX) && *k != FILE_VAR).map(str::to_owned) else {
                continue;
            };
            match value.into_string() {
                Ok(value) => vars.push((key, value)),
                Err(_) => problems.push(format!("{key} is not valid UTF-8")),
            }
        }
        vars.sort();
        let mut from_env: BTreeMap<String, String> = BTreeMap::new();
        for (var, value) in vars {
            match property_of_var(&var) {
                Some(name) => {
                    let name = canonical(&name);
                    if let Some(other) = from_env.insert(name.clone(), var.clone()) {
                        problems.push(format!("{var} and {other} both set {name}"));
                    }
                    props.insert(name, Property { value, origin: Origin::Env(var) });
                }
                None => problems.push(format!(
                    "{var} names no property: write the librdkafka property name upper-cased after {ENV_PREFIX}, each '.' as '_' and each '_' as '__' (e.g. {ENV_PREFIX}SASL_MECHANISM for sasl.mechanism)"
                )),
            }
        }
        for (name, p) in &props {
            if let Some((_, why)) = RESERVED.iter().find(|(r, _)| r == name) {
                problems.push(format!("{} sets {name}, which taskstream sets itself: {why}", p.origin));
            } else if let Err(e) = check(name, &p.value) {
                problems.push(format!("{} sets {name}: {e}", p.origin));
            }
        }
        if problems.is_empty() && !props.is_empty() {
            // Some settings only fail together, when a client is made (a SASL mechanism this build
            // has no provider for, a CA file that cannot be read): make one now, without brokers.
            let props = Self(props);
            let mut config = ClientConfig::new();
            props.apply_to(&mut config);
            return match config.create::<rdkafka::consumer::BaseConsumer>() {
                Ok(_) => Ok(props),
                Err(e) => Err(PropertiesError(vec![format!("librdkafka cannot make a client with these settings: {e}")])),
            };
        }
        if problems.is_empty() {
            Ok(Self(props))
        } else {
            Err(PropertiesError(problems))
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of a property (canonical name), if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|p| p.value.as_str())
    }

    /// Sets every property on `config` (over what it holds).
    pub fn apply_to(&self, config: &mut ClientConfig) {
        for (name, p) in &self.0 {
            config.set(name, &p.value);
        }
    }

    /// `name=value` per property, sensitive values as `***`, for logs.
    pub fn redacted(&self) -> Vec<String> {
        self.0.iter().map(|(name, p)| format!("{name}={}", if is_sensitive(name) { "***" } else { p.value.as_str() })).collect()
    }
}

impl fmt::Debug for ClientProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.redacted()).finish()
    }
}

fn line_of(origin: &Origin) -> usize {
    match origin {
        Origin::File { line, .. } => *line,
        Origin::Env(_) => 0,
    }
}

/// `(line, name, value)` of each property line; malformed lines are problems (named by line
/// number only: the line may hold a secret).
fn parse_file(path: &Path, text: &str, problems: &mut Vec<String>) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('!') {
            continue;
        }
        let Some(at) = trimmed.find(['=', ':']) else {
            problems.push(format!("{} line {line}: expected name=value", path.display()));
            continue;
        };
        let (name, value) = (trimmed[..at].trim(), trimmed[at + 1..].trim());
        if name.is_empty() || name.contains(char::is_whitespace) {
            problems.push(format!("{} line {line}: expected name=value (a property name has no blanks)", path.display()));
            continue;
        }
        if value.ends_with('\\') {
            problems.push(format!("{} line {line}: line continuations (a trailing '\\') are not supported: write the value on one line", path.display()));
            continue;
        }
        out.push((line, name.to_owned(), value.to_owned()));
    }
    out
}

/// `KAFKA_CONFIG_SASL_MECHANISM` -> `sasl.mechanism`; `KAFKA_CONFIG_LOG__LEVEL` -> `log_level`.
fn property_of_var(var: &str) -> Option<String> {
    let rest = var.strip_prefix(ENV_PREFIX)?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    let mut name = String::with_capacity(rest.len());
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '_' {
            if chars.peek() == Some(&'_') {
                chars.next();
                name.push('_');
            } else {
                name.push('.');
            }
        } else {
            name.push(c.to_ascii_lowercase());
        }
    }
    let empty_part = name.split('.').any(str::is_empty);
    (!empty_part).then_some(name)
}

fn canonical(name: &str) -> String {
    ALIASES.iter().find(|(alias, _)| *alias == name).map_or(name, |(_, to)| to).to_owned()
}

/// Asks librdkafka whether it takes `name=value` (the same call `create()` makes later).
fn check(name: &str, value: &str) -> Result<(), String> {
    match ClientConfig::new().set(name, value).create_native_config() {
        Ok(_) => Ok(()),
        Err(KafkaError::ClientConfig(_, desc, _, _)) => Err(rejection(name, value, &desc)),
        Err(e) => Err(e.to_string()),
    }
}

/// librdkafka's message about a value it refused, with a sensitive value cut out.
fn rejection(name: &str, value: &str, desc: &str) -> String {
    if is_sensitive(name) && !value.is_empty() {
        desc.replace(value, "***")
    } else {
        desc.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))).collect()
    }

    fn file(text: &str) -> (tempfile_path::TempPath, PathBuf) {
        let t = tempfile_path::TempPath::new(text);
        let p = t.0.clone();
        (t, p)
    }

    /// A file deleted on drop (no tempfile crate for one helper).
    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new(text: &str) -> Self {
                let p = std::env::temp_dir().join(format!("kafka-props-{}.properties", uuid::Uuid::new_v4().simple()));
                std::fs::write(&p, text).expect("write temp file");
                Self(p)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn variable_names_map_to_property_names() {
        assert_eq!(property_of_var("KAFKA_CONFIG_SECURITY_PROTOCOL").as_deref(), Some("security.protocol"));
        assert_eq!(property_of_var("KAFKA_CONFIG_SSL_CA_LOCATION").as_deref(), Some("ssl.ca.location"));
        assert_eq!(property_of_var("KAFKA_CONFIG_LOG__LEVEL").as_deref(), Some("log_level"));
        assert_eq!(property_of_var("KAFKA_CONFIG_ssl_endpoint_identification_algorithm").as_deref(), Some("ssl.endpoint.identification.algorithm"));
        for bad in ["KAFKA_CONFIG_", "KAFKA_CONFIG__SASL", "KAFKA_CONFIG_SASL_", "KAFKA_CONFIG_A-B", "KAFKA_BROKERS"] {
            assert_eq!(property_of_var(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_secured_cluster_from_variables() {
        let props = ClientProperties::load(
            None,
            env(&[
                ("KAFKA_CONFIG_SECURITY_PROTOCOL", "SASL_SSL"),
                ("KAFKA_CONFIG_SASL_MECHANISM", "SCRAM-SHA-512"),
                ("KAFKA_CONFIG_SASL_USERNAME", "taskstream"),
                ("KAFKA_CONFIG_SASL_PASSWORD", "hunter2-hunter2"),
                ("KAFKA_CONFIG_SSL_CA_LOCATION", "probe"),
                ("KAFKA_BROKERS", "broker:9093"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(props.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(props.get("sasl.password"), Some("hunter2-hunter2"));
        assert_eq!(props.0.len(), 5, "only KAFKA_CONFIG_* variables: {props:?}");
        let mut cfg = ClientConfig::new();
        props.apply_to(&mut cfg);
        assert_eq!(cfg.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert!(cfg.create_native_config().is_ok());
    }

    #[test]
    fn secrets_never_print() {
        let props = ClientProperties::load(
            None,
            env(&[("KAFKA_CONFIG_SASL_PASSWORD", "hunter2-hunter2"), ("KAFKA_CONFIG_SSL_KEY_PASSWORD", "pem-pass"), ("KAFKA_CONFIG_SASL_USERNAME", "bob")]),
        )
        .unwrap();
        let shown = format!("{props:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("pem-pass") && !shown.contains("bob"), "{shown}");
        assert!(shown.contains("sasl.password=***"), "{shown}");
        // librdkafka repeats a refused value in its message: a sensitive one is cut out.
        let said = rejection("sasl.password", "hunter2-hunter2", "Invalid value \"hunter2-hunter2\" for configuration property \"sasl.password\"");
        assert_eq!(said, "Invalid value \"***\" for configuration property \"sasl.password\"");
        for name in ["sasl.password", "ssl.key.password", "ssl.keystore.password", "sasl.oauthbearer.client.secret", "ssl.key.pem", "sasl.username"] {
            assert!(is_sensitive(name), "{name}");
        }
        assert!(!is_sensitive("security.protocol") && !is_sensitive("ssl.ca.location"));
    }

    #[test]
    fn a_properties_file_with_comments_and_variables_that_win() {
        let (_t, path) = file(
            "# a secured cluster\n! also a comment\n\nsecurity.protocol = SASL_SSL\nsasl.mechanism: SCRAM-SHA-256\n  sasl.username=taskstream\nsasl.password=a=b;c\n",
        );
        let props = ClientProperties::load(Some(&path), env(&[("KAFKA_CONFIG_SASL_MECHANISM", "SCRAM-SHA-512")])).unwrap();
        assert_eq!(props.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(props.get("sasl.mechanism"), Some("SCRAM-SHA-512"), "the variable wins");
        assert_eq!(props.get("sasl.username"), Some("taskstream"));
        assert_eq!(props.get("sasl.password"), Some("a=b;c"), "split at the first '='");
    }

    #[test]
    fn a_malformed_file_names_the_file_and_line_but_not_the_line() {
        let (_t, path) = file("security.protocol=SASL_SSL\nsasl.password hunter2\nsasl.username=a\nsasl.username=b\nssl.ca.location=/x \\\n");
        let e = ClientProperties::load(Some(&path), env(&[])).unwrap_err().to_string();
        let shown = path.display().to_string();
        assert!(e.contains(&format!("{shown} line 2: expected name=value")), "{e}");
        assert!(e.contains(&format!("{shown} line 4: sasl.username is already set on line 3")), "{e}");
        assert!(e.contains(&format!("{shown} line 5: line continuations")), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let missing = ClientProperties::load(Some(Path::new("/nonexistent/client.properties")), env(&[])).unwrap_err().to_string();
        assert!(missing.contains("KAFKA_CONFIG_FILE=/nonexistent/client.properties: cannot read it"), "{missing}");
    }

    #[test]
    fn unknown_properties_and_bad_values_are_refused_by_librdkafka_with_their_source() {
        let e = ClientProperties::load(None, env(&[("KAFKA_CONFIG_SASL_MECHANISMZ", "PLAIN"), ("KAFKA_CONFIG_SECURITY_PROTOCOL", "SASL_TLS")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("KAFKA_CONFIG_SASL_MECHANISMZ sets sasl.mechanismz: No such configuration property"), "{e}");
        assert!(e.contains("KAFKA_CONFIG_SECURITY_PROTOCOL sets security.protocol: Invalid value \"SASL_TLS\""), "{e}");
        // A client.properties written for the Java client: librdkafka names what it does not take.
        let (_t, path) =
            file("sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\nssl.truststore.location=/etc/kafka/truststore.jks\n");
        let e = ClientProperties::load(Some(&path), env(&[])).unwrap_err().to_string();
        assert!(e.contains("line 1 sets sasl.jaas.config: Java JAAS configuration is not supported"), "{e}");
        assert!(e.contains("line 2 sets ssl.truststore.location: Java TrustStores are not supported, use `ssl.ca.location`"), "{e}");
        let e = ClientProperties::load(None, env(&[("KAFKA_CONFIG_", "x")])).unwrap_err().to_string();
        assert!(e.contains("KAFKA_CONFIG_ names no property"), "{e}");
    }

    #[test]
    fn settings_that_only_fail_together_are_refused_at_start_up_too() {
        let e = ClientProperties::load(None, env(&[("KAFKA_CONFIG_SECURITY_PROTOCOL", "SSL"), ("KAFKA_CONFIG_SSL_CA_LOCATION", "/nonexistent/ca.pem")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("librdkafka cannot make a client with these settings") && e.contains("ssl.ca.location"), "{e}");
        // SASL_SSL without a mechanism means GSSAPI (Kerberos), which this build leaves out.
        let e = ClientProperties::load(None, env(&[("KAFKA_CONFIG_SECURITY_PROTOCOL", "SASL_SSL")])).unwrap_err().to_string();
        assert!(e.contains("GSSAPI"), "{e}");
    }

    #[test]
    fn settings_taskstream_relies_on_are_refused_under_any_alias() {
        let e = ClientProperties::load(
            None,
            env(&[
                ("KAFKA_CONFIG_REQUEST_REQUIRED_ACKS", "1"),
                ("KAFKA_CONFIG_ISOLATION_LEVEL", "read_uncommitted"),
                ("KAFKA_CONFIG_METADATA_BROKER_LIST", "elsewhere:9092"),
                ("KAFKA_CONFIG_TRANSACTIONAL_ID", "mine"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("KAFKA_CONFIG_REQUEST_REQUIRED_ACKS sets acks, which taskstream sets itself"), "{e}");
        assert!(e.contains("KAFKA_CONFIG_ISOLATION_LEVEL sets isolation.level"), "{e}");
        assert!(e.contains("KAFKA_CONFIG_METADATA_BROKER_LIST sets bootstrap.servers, which taskstream sets itself: the brokers are KAFKA_BROKERS"), "{e}");
        assert!(e.contains("KAFKA_CONFIG_TRANSACTIONAL_ID sets transactional.id"), "{e}");
        // Every reserved name is one librdkafka knows (a typo here would refuse nothing).
        for (name, _) in RESERVED {
            assert!(!check(name, "1").err().unwrap_or_default().contains("No such configuration property"), "{name}");
        }
        // Two spellings of one property are one property.
        let e = ClientProperties::load(None, env(&[("KAFKA_CONFIG_LINGER_MS", "5"), ("KAFKA_CONFIG_QUEUE_BUFFERING_MAX_MS", "7")])).unwrap_err().to_string();
        assert!(e.contains("both set linger.ms"), "{e}");
    }
}
