//! Every setting, in one place: each is a flag of `outrider serve` and an
//! `OUTRIDER_*` environment variable, with its default here.
//!
//! A bad value stops start-up with a message naming the flag.

use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::delivery::guard::AllowEntry;
use crate::delivery::policy::DEFAULT_SCHEDULE;

/// Settings shared by every subcommand that opens the database.
#[derive(Debug, Clone, Args)]
pub struct DatabaseConfig {
    /// Database URL; `sqlite://<path>` creates the file if missing.
    #[arg(
        long,
        env = "OUTRIDER_DATABASE_URL",
        default_value = "sqlite://outrider.db"
    )]
    pub database_url: String,

    /// Key that signing secrets are sealed under at rest (environment only).
    #[arg(skip = std::env::var(crate::secrets::KEY_ENV).ok().filter(|k| !k.is_empty()))]
    pub encryption_key: Option<String>,
}

/// Where local models live; shared by `serve` and `model`.
#[derive(Debug, Clone, Args)]
pub struct ModelsConfig {
    /// Directory of local model files [default: models under the data
    /// directory: $OUTRIDER_DATA_DIR, else $XDG_DATA_HOME/outrider, else
    /// ~/.local/share/outrider].
    #[arg(long, env = "OUTRIDER_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
}

impl ModelsConfig {
    pub fn dir(&self) -> PathBuf {
        self.models_dir
            .clone()
            .unwrap_or_else(crate::providers::local::models::default_models_dir)
    }
}

/// Settings of `outrider serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,

    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "OUTRIDER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// How long a client has to send a request's head, and then again its
    /// body (also how long an idle connection stays open).
    #[arg(long, env = "OUTRIDER_HEADER_TIMEOUT", default_value = "30s",
          value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Base URL clients reach this server at, used in `events_url`
    /// [default: http://<listen address>].
    #[arg(long, env = "OUTRIDER_PUBLIC_URL", value_parser = parse_public_url)]
    pub public_url: Option<String>,

    /// Comma-separated address ranges (CIDR or single IP) and exact host
    /// names that callbacks may reach although they are not public; a listed
    /// name may resolve to any address.
    #[arg(long, env = "OUTRIDER_CALLBACK_ALLOW", value_delimiter = ',',
          value_parser = parse_allow)]
    pub callback_allow: Vec<AllowEntry>,

    /// PEM file of extra root certificates trusted for callback TLS.
    #[arg(long, env = "OUTRIDER_CALLBACK_CA_FILE")]
    pub callback_ca_file: Option<PathBuf>,

    /// Comma-separated waits before each callback retry.
    #[arg(long, env = "OUTRIDER_RETRY_SCHEDULE", default_value = DEFAULT_SCHEDULE,
          value_delimiter = ',', value_parser = parse_duration)]
    pub retry_schedule: Vec<Duration>,

    /// Budget for one callback attempt: connect, TLS, headers and body.
    #[arg(long, env = "OUTRIDER_CALLBACK_TIMEOUT", default_value = "10s",
          value_parser = parse_duration)]
    pub callback_timeout: Duration,

    /// How long after a session ends its callback is still retried.
    #[arg(long, env = "OUTRIDER_CALLBACK_DEADLINE", default_value = "24h",
          value_parser = parse_duration)]
    pub callback_deadline: Duration,

    /// Callback attempts in flight at once in this process.
    #[arg(long, env = "OUTRIDER_DELIVERY_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub delivery_concurrency: u16,

    /// Callback attempts in flight at once to one host and port, so a slow
    /// receiver cannot hold every slot.
    #[arg(long, env = "OUTRIDER_DELIVERY_PER_DESTINATION", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub delivery_per_destination: u16,

    /// Failed callback attempts in a row to one host and port that open its
    /// circuit (its deliveries then wait for a probe); 0 turns this off.
    #[arg(long, env = "OUTRIDER_CIRCUIT_FAILURES", default_value_t = 5)]
    pub circuit_failures: u32,

    /// How long an opened circuit waits before its probe; doubles each time
    /// the probe fails, up to 16 times this.
    #[arg(long, env = "OUTRIDER_CIRCUIT_COOLDOWN", default_value = "30s",
          value_parser = parse_duration)]
    pub circuit_cooldown: Duration,

    /// Base URL of an OpenAI-compatible chat-completions API.
    #[arg(long, env = "OUTRIDER_OPENAI_BASE_URL", default_value = "https://api.openai.com/v1",
          value_parser = parse_public_url)]
    pub openai_base_url: String,

    /// API key for the OpenAI-compatible endpoint (environment only).
    #[arg(skip = std::env::var("OUTRIDER_OPENAI_API_KEY").ok().filter(|k| !k.is_empty()))]
    pub openai_api_key: Option<String>,

    /// Budget for one model call (for the local model, waiting for it
    /// included).
    #[arg(long, env = "OUTRIDER_MODEL_TIMEOUT", default_value = "120s",
          value_parser = parse_duration)]
    pub model_timeout: Duration,

    #[command(flatten)]
    pub models: ModelsConfig,

    /// Fetch a local model that an agent needs and that is not installed
    /// (`on` or `off`).
    #[arg(long, env = "OUTRIDER_MODEL_PULL", default_value = "on", value_parser = parse_switch,
          action = clap::ArgAction::Set)]
    pub model_pull: bool,

    /// Sessions run at once in this process; 0 runs no agents (API only).
    #[arg(long, env = "OUTRIDER_WORKERS", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub workers: u16,

    /// How long a claimed session stays claimed without renewal; a crashed
    /// worker's sessions are taken over after this.
    #[arg(long, env = "OUTRIDER_LEASE", default_value = "10s", value_parser = parse_lease)]
    pub lease: Duration,

    /// How long an interaction without `callback_url` waits for its result.
    #[arg(long, env = "OUTRIDER_SYNC_TIMEOUT", default_value = "60s",
          value_parser = parse_duration)]
    pub sync_timeout: Duration,
}

/// No setting waits longer than this; it keeps time arithmetic in range.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

fn parse_duration(raw: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(raw.trim()).map_err(|e| format!("{raw:?}: {e}"))?;
    if duration.is_zero() {
        return Err(format!("{raw:?}: must be more than zero"));
    }
    if duration > MAX_DURATION {
        return Err(format!("{raw:?}: must be at most 30 days"));
    }
    Ok(duration)
}

fn parse_lease(raw: &str) -> Result<Duration, String> {
    let lease = parse_duration(raw)?;
    if lease < Duration::from_secs(1) || lease > Duration::from_secs(3600) {
        return Err(format!("{raw:?}: must be from 1s to 1h"));
    }
    Ok(lease)
}

/// `on`/`off` (or `true`/`false`).
pub fn parse_switch(value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("{value:?}: expected on or off")),
    }
}

fn parse_allow(raw: &str) -> Result<AllowEntry, String> {
    raw.parse()
}

fn parse_public_url(raw: &str) -> Result<String, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{raw:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("{raw:?}: must be an http or https URL"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(format!(
            "{raw:?}: must not have a query, a fragment or a user name"
        ));
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_human_units() {
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("31days").is_err());
        assert!(parse_duration("500000000y").is_err());
    }

    #[test]
    fn allow_list_entries_are_ranges_addresses_or_host_names() {
        let net = |raw: &str| AllowEntry::Net(raw.parse().unwrap());
        let host = |raw: &str| AllowEntry::Host(raw.into());
        let cases = [
            ("127.0.0.0/8", net("127.0.0.0/8")),
            ("10.1.2.3/8", net("10.0.0.0/8")),
            (" ::1 ", net("::1/128")),
            ("192.168.1.1", net("192.168.1.1/32")),
            ("localhost", host("localhost")),
            ("Hooks.Internal.Example.", host("hooks.internal.example")),
            ("b\u{fc}cher.example", host("xn--bcher-kva.example")),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_allow(raw), Ok(want), "{raw:?}");
        }
    }

    #[test]
    fn allow_list_entries_that_are_no_range_address_or_name_are_refused() {
        let long_label = "a".repeat(64);
        let long_name = ["abcdefghi"; 26].join(".");
        let refused = [
            "",
            "*.example.com",
            "hooks.*",
            "a..b",
            "-a.example",
            "a-.example",
            "a_b.example",
            "exa mple.com",
            "https://example.com",
            "example.com:443",
            "10.0.0.0/33",
            "256.0.0.1",
            "1.2.3",
            "0x7f.1",
            "[::1]",
            &long_label,
            &long_name,
        ];
        for raw in refused {
            let error = parse_allow(raw).unwrap_err();
            assert!(error.contains("neither"), "{raw:?}: {error}");
        }
    }
}
