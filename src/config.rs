//! Layered configuration: built-in defaults < TOML file < `OTEL_*` env < `GRACEFUL_*` env < flags.
//!
//! Every value keeps its provenance (figment metadata), so errors and `graceful config` can name
//! the key *and* where it came from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};
use url::Url;

/// Environment prefix for our own keys; `__` separates sections: `GRACEFUL_SHUTDOWN__DRAIN_DELAY`.
pub const ENV_PREFIX: &str = "GRACEFUL_";

/// The `OTEL_TRACES_SAMPLER` values the head sampler implements (`sampling`).
pub const SAMPLERS: &[&str] = &[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub features: Features,
    pub shutdown: Shutdown,
    pub server: Server,
    pub backend: Backend,
    pub frontend: Frontend,
    pub upstream: Upstream,
    pub telemetry: Telemetry,
}

/// The three toggles the overlays flip. Defaults are the safe pattern; `problem` turns them off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Features {
    pub graceful: bool,
    pub retry: bool,
    pub timeouts: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    /// Lame-duck time: readiness fails, requests are still served with `Connection: close`.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Bound on in-flight requests once the listener is closed.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// A `/prestop` drain with no SIGTERM after this long returns to Serving (Kubernetes always
    /// follows preStop with SIGTERM). Unset: drain_delay + shutdown_timeout + 30s.
    #[serde(with = "humantime_serde")]
    pub prestop_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Server-side keep-alive; the upstream pool's idle time must stay below it.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// actix worker threads per listener.
    pub workers: usize,
    /// Bound on reading a request body once its head has arrived: slower senders get 408.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Accept `/prestop` from any address (kubelet's httpGet hook comes from the node), not only loopback.
    pub prestop_allow_remote: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backend {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    #[serde(with = "humantime_serde")]
    pub work_min: Duration,
    #[serde(with = "humantime_serde")]
    pub work_max: Duration,
    /// Largest accepted `/game-over` body, bytes.
    pub game_over_body_limit: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Frontend {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub backend_url: Url,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Per attempt, headers and body.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Whole call, all attempts and backoff included.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Pooled connections idle longer than this are not reused (must be < `server.keep_alive`).
    #[serde(with = "humantime_serde")]
    pub pool_idle: Duration,
    /// Attempts in total (1 = no retry).
    pub max_attempts: usize,
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// `HOST:PORT:ADDR[:PORT]` overrides, like curl's `--resolve` (the lab points Service names at its proxies).
    pub resolve: Vec<String>,
    /// Backend statuses worth another attempt (idempotent calls only); 500–599.
    pub retry_on: Vec<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stdout is not a terminal, pretty otherwise.
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    pub log_format: LogFormat,
    /// `tracing` filter directives, e.g. `info,graceful=debug` (`RUST_LOG` wins when set).
    pub log_level: String,
    /// Base OTLP endpoint (`/v1/traces` is appended for HTTP). Unset: no exporter at all.
    pub otlp_endpoint: Option<Url>,
    /// Full traces endpoint, used as is; wins over `otlp_endpoint`.
    pub otlp_traces_endpoint: Option<Url>,
    pub otlp_protocol: OtlpProtocol,
    /// Defaults to `graceful-<role>`.
    pub service_name: Option<String>,
    /// Extra resource attributes, `k=v,k2=v2`.
    pub resource_attributes: String,
    /// `always_on`, `always_off`, `traceidratio`, `parentbased_always_on`, `parentbased_always_off`,
    /// `parentbased_traceidratio`.
    pub sampler: String,
    pub sampler_arg: Option<f64>,
    /// `OTEL_SDK_DISABLED=true`: no exporter even when an endpoint is set.
    pub sdk_disabled: bool,
}

impl Shutdown {
    /// How long a preStop drain waits for SIGTERM before returning to Serving.
    pub fn prestop_bound(&self) -> Duration {
        self.prestop_timeout.unwrap_or(self.drain_delay + self.shutdown_timeout + PRESTOP_MARGIN)
    }
}

/// Added to drain_delay + shutdown_timeout for the default `shutdown.prestop_timeout`.
pub const PRESTOP_MARGIN: Duration = Duration::from_secs(30);

impl Default for Features {
    fn default() -> Self {
        Features { graceful: true, retry: true, timeouts: true }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            drain_delay: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            prestop_timeout: None,
        }
    }
}

impl Default for Server {
    fn default() -> Self {
        Server {
            keep_alive: Duration::from_secs(5),
            workers: 2,
            body_read_timeout: Duration::from_secs(5),
            prestop_allow_remote: false,
        }
    }
}

impl Default for Backend {
    fn default() -> Self {
        Backend {
            listen: "0.0.0.0:5000".parse().unwrap(),
            admin_listen: "0.0.0.0:5001".parse().unwrap(),
            work_min: Duration::from_millis(100),
            work_max: Duration::from_millis(200),
            game_over_body_limit: 4096,
        }
    }
}

impl Default for Frontend {
    fn default() -> Self {
        Frontend {
            listen: "0.0.0.0:8080".parse().unwrap(),
            admin_listen: "0.0.0.0:8081".parse().unwrap(),
            backend_url: Url::parse("http://svc-backend:5000").unwrap(),
        }
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            connect_timeout: Duration::from_millis(500),
            attempt_timeout: Duration::from_secs(1),
            deadline: Duration::from_secs(3),
            pool_idle: Duration::from_secs(3),
            max_attempts: 3,
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            resolve: Vec::new(),
            retry_on: vec![502, 503, 504],
        }
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            log_format: LogFormat::Auto,
            log_level: "info".into(),
            otlp_endpoint: None,
            otlp_traces_endpoint: None,
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            service_name: None,
            resource_attributes: String::new(),
            sampler: "parentbased_always_on".into(),
            sampler_arg: None,
            sdk_disabled: false,
        }
    }
}

/// Values set on the command line; `None` leaves the lower layers alone.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// (dotted key, value, flag name as typed)
    entries: Vec<(&'static str, Value, &'static str)>,
}

impl Overrides {
    pub fn set(&mut self, key: &'static str, flag: &'static str, value: impl Serialize) {
        let value = Value::serialize(value).expect("flag values serialize");
        self.entries.push((key, value, flag));
    }

    pub fn set_opt<T: Serialize>(&mut self, key: &'static str, flag: &'static str, value: Option<T>) {
        if let Some(v) = value {
            self.set(key, flag, v);
        }
    }
}

/// One figment provider per flag, so provenance names the exact flag.
struct FlagProvider {
    key: &'static str,
    value: Value,
    flag: &'static str,
}

impl Provider for FlagProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("command-line flag {}", self.flag))
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Serialized::default(self.key, self.value.clone()).data()
    }
}

/// Where the TOML file comes from, for messages.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub via: &'static str,
}

/// The `OTEL_*` variables we honour and the key each one feeds.
pub const OTEL_ENV: &[(&str, &str)] = &[
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "telemetry.otlp_endpoint"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "telemetry.otlp_traces_endpoint"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "telemetry.otlp_protocol"),
    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "telemetry.otlp_protocol"),
    ("OTEL_SERVICE_NAME", "telemetry.service_name"),
    ("OTEL_RESOURCE_ATTRIBUTES", "telemetry.resource_attributes"),
    ("OTEL_TRACES_SAMPLER", "telemetry.sampler"),
    ("OTEL_TRACES_SAMPLER_ARG", "telemetry.sampler_arg"),
    ("OTEL_SDK_DISABLED", "telemetry.sdk_disabled"),
];

/// A configuration error that names the culprit.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} ({via}) cannot be read: {reason}")]
    File { path: PathBuf, via: &'static str, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

pub struct Loaded {
    pub config: Config,
    pub figment: Figment,
}

/// Builds the layered figment without extracting it.
pub fn figment(file: Option<&ConfigFile>, overrides: &Overrides) -> Result<Figment, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    if let Some(file) = file {
        check_readable(&file.path, file.via)?;
        // file_exact: no silent search of parent folders for an explicitly named file.
        fig = fig.merge(Toml::file_exact(&file.path));
    }
    for (var, key) in OTEL_ENV {
        let key = *key;
        let var = *var;
        // Empty OTEL_* values mean "unset" by the spec.
        if std::env::var(var).map(|v| !v.is_empty()).unwrap_or(false) {
            fig = fig.merge(Env::raw().only(&[var]).map(move |_| key.into()).split("."));
        }
    }
    fig = fig.merge(Env::prefixed(ENV_PREFIX).ignore(&["CONFIG"]).split("__"));
    for (key, value, flag) in &overrides.entries {
        fig = fig.merge(FlagProvider { key, value: value.clone(), flag });
    }
    Ok(fig)
}

fn check_readable(path: &Path, via: &'static str) -> Result<(), ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(_) => Ok(()),
        Err(e) => Err(ConfigError::File { path: path.to_owned(), via, reason: e.to_string() }),
    }
}

/// Loads, extracts and validates. Nothing listens before this has succeeded.
pub fn load(file: Option<&ConfigFile>, overrides: &Overrides) -> Result<Loaded, ConfigError> {
    let figment = figment(file, overrides)?;
    let config: Config = figment.extract().map_err(|e| ConfigError::Invalid(describe_figment_error(e)))?;
    validate(&config, &figment)?;
    Ok(Loaded { config, figment })
}

/// figment's messages, reworded so each names the key and its source.
fn describe_figment_error(err: figment::Error) -> String {
    err.into_iter()
        .map(|e| {
            let path = e.path.join(".");
            let source =
                e.metadata.as_ref().map(|m| describe_source(m, &path)).unwrap_or_else(|| "unknown source".into());
            let key = if path.is_empty() { "(top level)".to_string() } else { path };
            format!("key `{key}` from {source}: {}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// "environment variable GRACEFUL_X__Y", "file /etc/graceful.toml", "command-line flag --listen", "built-in default".
pub fn describe_source(meta: &Metadata, key: &str) -> String {
    if meta.name.contains(ENV_PREFIX) {
        return format!("environment variable {}", env_var_for(key));
    }
    if meta.name.contains("environment") {
        let var = OTEL_ENV
            .iter()
            .rev()
            .filter(|(var, k)| *k == key && std::env::var(var).is_ok_and(|v| !v.is_empty()))
            .map(|(var, _)| *var)
            .next()
            .unwrap_or("OTEL_*");
        return format!("environment variable {var}");
    }
    match &meta.source {
        Some(figment::Source::File(p)) => format!("file {}", p.display()),
        Some(figment::Source::Code(_)) | None if meta.name.starts_with("command-line") => meta.name.to_string(),
        Some(figment::Source::Code(_)) => "built-in default".into(),
        Some(other) => other.to_string(),
        None => meta.name.to_string(),
    }
}

/// Where a key's effective value came from.
pub fn source_of(fig: &Figment, key: &str) -> String {
    match fig.find_metadata(key) {
        Some(meta) => describe_source(meta, key),
        None => "built-in default".into(),
    }
}

fn invalid(fig: &Figment, key: &str, msg: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid(format!("key `{key}` from {}: {msg}", source_of(fig, key)))
}

/// The documented range of every duration key (README's configuration table shows the same).
pub const DURATION_RANGES: &[(&str, Duration, Duration)] = &[
    ("shutdown.drain_delay", Duration::ZERO, Duration::from_secs(600)),
    ("shutdown.shutdown_timeout", Duration::ZERO, Duration::from_secs(600)),
    ("shutdown.prestop_timeout", Duration::from_secs(1), Duration::from_secs(3600)),
    ("server.keep_alive", Duration::from_millis(100), Duration::from_secs(3600)),
    ("server.body_read_timeout", Duration::from_millis(100), Duration::from_secs(600)),
    ("backend.work_min", Duration::ZERO, Duration::from_secs(60)),
    ("backend.work_max", Duration::ZERO, Duration::from_secs(60)),
    ("upstream.connect_timeout", Duration::from_millis(1), Duration::from_secs(600)),
    ("upstream.attempt_timeout", Duration::from_millis(1), Duration::from_secs(600)),
    ("upstream.deadline", Duration::from_millis(1), Duration::from_secs(600)),
    ("upstream.pool_idle", Duration::ZERO, Duration::from_secs(3600)),
    ("upstream.backoff_min", Duration::ZERO, Duration::from_secs(60)),
    ("upstream.backoff_max", Duration::ZERO, Duration::from_secs(60)),
];

/// The documented range of every integer key.
pub const INTEGER_RANGES: &[(&str, usize, usize)] =
    &[("server.workers", 1, 64), ("backend.game_over_body_limit", 1, 1024 * 1024), ("upstream.max_attempts", 1, 20)];

fn duration_of(c: &Config, key: &str) -> Option<Duration> {
    Some(match key {
        "shutdown.drain_delay" => c.shutdown.drain_delay,
        "shutdown.shutdown_timeout" => c.shutdown.shutdown_timeout,
        "shutdown.prestop_timeout" => c.shutdown.prestop_timeout?,
        "server.keep_alive" => c.server.keep_alive,
        "server.body_read_timeout" => c.server.body_read_timeout,
        "backend.work_min" => c.backend.work_min,
        "backend.work_max" => c.backend.work_max,
        "upstream.connect_timeout" => c.upstream.connect_timeout,
        "upstream.attempt_timeout" => c.upstream.attempt_timeout,
        "upstream.deadline" => c.upstream.deadline,
        "upstream.pool_idle" => c.upstream.pool_idle,
        "upstream.backoff_min" => c.upstream.backoff_min,
        "upstream.backoff_max" => c.upstream.backoff_max,
        _ => return None,
    })
}

fn integer_of(c: &Config, key: &str) -> usize {
    match key {
        "server.workers" => c.server.workers,
        "backend.game_over_body_limit" => c.backend.game_over_body_limit,
        "upstream.max_attempts" => c.upstream.max_attempts,
        other => unreachable!("no integer key {other}"),
    }
}

fn check_ranges(c: &Config, fig: &Figment) -> Result<(), ConfigError> {
    let fmt = |d: Duration| humantime::format_duration(d).to_string();
    for &(key, min, max) in DURATION_RANGES {
        if let Some(d) = duration_of(c, key) {
            if d < min || d > max {
                let range = format!("{} to {}", fmt(min), fmt(max));
                return Err(invalid(fig, key, format!("{} is outside the allowed range {range}", fmt(d))));
            }
        }
    }
    for &(key, min, max) in INTEGER_RANGES {
        let n = integer_of(c, key);
        if n < min || n > max {
            return Err(invalid(fig, key, format!("{n} is outside the allowed range {min} to {max}")));
        }
    }
    Ok(())
}

/// Port 0 means "any free port": fine when a flag asks for it (tests, the benchmark), a mistake
/// in a file or the environment, where nobody could know where the pod listens.
fn check_listeners(c: &Config, fig: &Figment) -> Result<(), ConfigError> {
    for (key, addr) in [
        ("backend.listen", c.backend.listen),
        ("backend.admin_listen", c.backend.admin_listen),
        ("frontend.listen", c.frontend.listen),
        ("frontend.admin_listen", c.frontend.admin_listen),
    ] {
        if addr.port() == 0 && !source_of(fig, key).starts_with("command-line flag") {
            return Err(invalid(
                fig,
                key,
                format!("`{addr}` has port 0 (any free port); only a command-line flag may ask for that"),
            ));
        }
    }
    Ok(())
}

fn validate(c: &Config, fig: &Figment) -> Result<(), ConfigError> {
    check_ranges(c, fig)?;
    check_listeners(c, fig)?;
    if c.backend.work_min > c.backend.work_max {
        return Err(invalid(fig, "backend.work_min", "must not exceed backend.work_max"));
    }
    if c.upstream.backoff_min > c.upstream.backoff_max {
        return Err(invalid(fig, "upstream.backoff_min", "must not exceed upstream.backoff_max"));
    }
    if c.upstream.deadline < c.upstream.attempt_timeout {
        return Err(invalid(
            fig,
            "upstream.deadline",
            format!(
                "{} is shorter than upstream.attempt_timeout ({}): no attempt could use its full bound",
                humantime::format_duration(c.upstream.deadline),
                humantime::format_duration(c.upstream.attempt_timeout)
            ),
        ));
    }
    if c.upstream.retry_on.is_empty() {
        return Err(invalid(
            fig,
            "upstream.retry_on",
            "must name at least one status (features.retry = false turns retries off)",
        ));
    }
    if let Some(s) = c.upstream.retry_on.iter().find(|s| !(500..=599).contains(*s)) {
        return Err(invalid(
            fig,
            "upstream.retry_on",
            format!("{s} is not a 5xx status: only 500-599 may be retried (a 4xx is the caller's own error)"),
        ));
    }
    if c.upstream.pool_idle >= c.server.keep_alive {
        return Err(invalid(
            fig,
            "upstream.pool_idle",
            format!(
                "must stay below server.keep_alive ({}), or the client reuses connections the server is closing",
                humantime::format_duration(c.server.keep_alive)
            ),
        ));
    }
    let url = &c.frontend.backend_url;
    if url.scheme() != "http" || url.host_str().is_none() {
        return Err(invalid(fig, "frontend.backend_url", format!("`{url}` must be an http:// URL with a host")));
    }
    // Requests go to fixed paths on this base: a path or query here would be silently dropped.
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(invalid(
            fig,
            "frontend.backend_url",
            format!("`{url}` must be scheme://host[:port] only (no path, query, fragment or user)"),
        ));
    }
    for (key, url) in [
        ("telemetry.otlp_endpoint", &c.telemetry.otlp_endpoint),
        ("telemetry.otlp_traces_endpoint", &c.telemetry.otlp_traces_endpoint),
    ] {
        if let Some(u) = url {
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                return Err(invalid(fig, key, format!("`{u}` must be an http:// or https:// URL with a host")));
            }
        }
    }
    for (i, entry) in c.upstream.resolve.iter().enumerate() {
        if let Err(e) = ResolveRule::parse(entry) {
            return Err(invalid(fig, "upstream.resolve", format!("entry {i} `{entry}`: {e}")));
        }
    }
    if let Some(arg) = c.telemetry.sampler_arg {
        if !(0.0..=1.0).contains(&arg) {
            return Err(invalid(fig, "telemetry.sampler_arg", format!("{arg} is not a ratio in [0, 1]")));
        }
    }
    if !SAMPLERS.contains(&c.telemetry.sampler.as_str()) {
        return Err(invalid(
            fig,
            "telemetry.sampler",
            format!("`{}` is not one of {}", c.telemetry.sampler, SAMPLERS.join(", ")),
        ));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&c.telemetry.log_level) {
        return Err(invalid(fig, "telemetry.log_level", e));
    }
    Ok(())
}

/// `HOST:PORT:ADDR` or `HOST:PORT:ADDR:PORT2`: connect to ADDR (PORT2, or PORT) when a URL names HOST:PORT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveRule {
    pub host: String,
    pub port: u16,
    pub addr: SocketAddr,
}

impl ResolveRule {
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.splitn(3, ':').collect();
        if parts.len() != 3 || parts[0].is_empty() {
            return Err("expected HOST:PORT:ADDR or HOST:PORT:ADDR:PORT".into());
        }
        let port: u16 = parts[1].parse().map_err(|_| format!("`{}` is not a port", parts[1]))?;
        let addr = match parts[2].parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                let ip: std::net::IpAddr =
                    parts[2].parse().map_err(|_| format!("`{}` is not an IP address or IP:PORT", parts[2]))?;
                SocketAddr::new(ip, port)
            }
        };
        Ok(ResolveRule { host: parts[0].to_ascii_lowercase(), port, addr })
    }
}

/// Every leaf key with its effective value and source, for `graceful config`.
pub fn explain(loaded: &Loaded) -> Vec<(String, String, String)> {
    let value = Value::serialize(&loaded.config).expect("config serializes");
    let mut out = Vec::new();
    flatten("", &value, &mut out);
    out.into_iter()
        .map(|(key, val)| {
            let src = source_of(&loaded.figment, &key);
            (key, val, src)
        })
        .collect()
}

fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Dict(_, dict) => {
            for (k, v) in dict {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => {
            let json = serde_json::to_string(other).unwrap_or_default();
            out.push((prefix.to_string(), json));
        }
    }
}

/// The environment variable that sets a dotted key.
pub fn env_var_for(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "__").to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_rules_parse_and_reject() {
        let r = ResolveRule::parse("svc-backend:5000:127.0.9.1").unwrap();
        assert_eq!(r.addr, "127.0.9.1:5000".parse().unwrap());
        let r = ResolveRule::parse("svc-backend:5000:127.0.0.1:41000").unwrap();
        assert_eq!(r.addr.port(), 41000);
        assert!(ResolveRule::parse("svc-backend:x:127.0.0.1").is_err());
        assert!(ResolveRule::parse("svc-backend:5000:nowhere").is_err());
        assert!(ResolveRule::parse("svc-backend").is_err());
    }

    #[test]
    fn env_var_names_follow_sections() {
        assert_eq!(env_var_for("shutdown.drain_delay"), "GRACEFUL_SHUTDOWN__DRAIN_DELAY");
    }

    #[test]
    fn defaults_are_valid() {
        let loaded = load(None, &Overrides::default()).unwrap();
        assert!(loaded.config.upstream.pool_idle < loaded.config.server.keep_alive);
    }

    #[test]
    fn flags_win_and_are_named() {
        let mut o = Overrides::default();
        o.set("shutdown.drain_delay", "--drain-delay", "250ms");
        let loaded = load(None, &o).unwrap();
        assert_eq!(loaded.config.shutdown.drain_delay, Duration::from_millis(250));
        assert_eq!(source_of(&loaded.figment, "shutdown.drain_delay"), "command-line flag --drain-delay");
    }
}
