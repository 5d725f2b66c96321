//! Logging set-up, one style for every binary: `RUST_LOG` filters; `LOG_FORMAT=json` (default) or
//! `pretty`.

use tracing_subscriber::{fmt, EnvFilter};

pub fn init(service: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let pretty = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("pretty"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if pretty { builder.compact().try_init() } else { builder.json().flatten_event(true).try_init() };
    if result.is_ok() {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
    }
}
