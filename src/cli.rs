//! Command-line surface. Other tools (the overlays, the lab, k6 scripts) drive these names.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigFile, Overrides};

const ENV_HELP: &str = "\
Configuration precedence: built-in defaults < TOML file (--config or GRACEFUL_CONFIG) < OTEL_* env < GRACEFUL_* env < flags.

Environment:
  GRACEFUL_CONFIG                      TOML config file (same as --config)
  GRACEFUL_<SECTION>__<KEY>            any config key, e.g. GRACEFUL_SHUTDOWN__DRAIN_DELAY=5s,
                                       GRACEFUL_FEATURES__RETRY=false (see `graceful config`)
  POD_NAME, POD_NAMESPACE, POD_IP,     pod identity from the Downward API (fallback: hostname)
  NODE_NAME
  OTEL_EXPORTER_OTLP_ENDPOINT          OTLP base URL; unset = no trace export
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT   full traces URL (wins over the base URL)
  OTEL_EXPORTER_OTLP_PROTOCOL          http/protobuf (default) or grpc
  OTEL_EXPORTER_OTLP_(TRACES_)HEADERS  headers sent with every export, k=v,k2=v2 (percent-encoded)
  OTEL_SERVICE_NAME                    default graceful-<role>
  OTEL_RESOURCE_ATTRIBUTES             extra resource attributes k=v,k2=v2
  OTEL_TRACES_SAMPLER(_ARG)            always_on, traceidratio, parentbased_* ...
  OTEL_SDK_DISABLED                    true = no export
  OTEL_BSP_SCHEDULE_DELAY              ms between span exports (5000); OTEL_BSP_MAX_QUEUE_SIZE
                                       (2048 waiting, more are dropped and counted at exit),
                                       OTEL_BSP_MAX_EXPORT_BATCH_SIZE (512 per export)
  RUST_LOG                             log filter (wins over telemetry.log_level)";

#[derive(Debug, Parser)]
#[command(name = "graceful", version, about = "Shows and solves the Kubernetes graceful-shutdown race", after_help = ENV_HELP)]
pub struct Cli {
    /// TOML config file.
    #[arg(long, global = true, value_name = "FILE", env = "GRACEFUL_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The upstream service: /api/data does simulated work.
    #[command(after_help = ENV_HELP)]
    Backend(BackendArgs),
    /// The service users hit: calls the backend through the upstream client.
    #[command(after_help = ENV_HELP)]
    Frontend(FrontendArgs),
    /// The preStop task: drain the local pod, notify the backend, hold while endpoints propagate.
    ShutdownProbe(ProbeArgs),
    /// Print the effective configuration and where each value came from.
    #[command(after_help = ENV_HELP)]
    Config(ConfigArgs),
    /// Play Kubernetes' termination race on this machine: problem vs solution under load.
    Lab(Box<crate::lab::LabArgs>),
}

/// `--graceful`, `--retry`, `--timeouts`: `=true|false`, bare means true.
#[derive(Debug, Args, Default, Clone)]
pub struct Toggles {
    /// Lame-duck drain on SIGTERM (false = the naive app that exits at once).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub graceful: Option<bool>,
    /// Retry idempotent upstream calls on another pod.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub retry: Option<bool>,
    /// Bounded connect / attempt / overall timeouts on upstream calls.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub timeouts: Option<bool>,
    /// Lame-duck time before the listener closes (e.g. 5s, 250ms).
    #[arg(long, value_name = "DURATION")]
    pub drain_delay: Option<humantime::Duration>,
    /// Bound on in-flight requests after the listener closes.
    #[arg(long, value_name = "DURATION")]
    pub shutdown_timeout: Option<humantime::Duration>,
}

#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Public listener (default 0.0.0.0:5000).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Admin listener: probes, /metrics, /prestop (default 0.0.0.0:5001).
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub toggles: Toggles,
}

#[derive(Debug, Args)]
pub struct FrontendArgs {
    /// Public listener (default 0.0.0.0:8080).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Admin listener: probes, /metrics, /prestop (default 0.0.0.0:8081).
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin_listen: Option<SocketAddr>,
    /// The backend Service (default http://svc-backend:5000).
    #[arg(long, value_name = "URL")]
    pub backend_url: Option<String>,
    /// HOST:PORT:ADDR[:PORT] connect override, repeatable (like curl --resolve).
    #[arg(long, value_name = "HOST:PORT:ADDR")]
    pub resolve: Vec<String>,
    #[command(flatten)]
    pub toggles: Toggles,
}

#[derive(Debug, Args, Clone)]
pub struct ProbeArgs {
    /// Tell the local pod to enter lame-duck mode now (its admin /prestop URL).
    #[arg(long, value_name = "URL")]
    pub drain: Option<String>,
    /// POST a game-over notification here (bounded, one retry).
    #[arg(long, value_name = "URL")]
    pub game_over: Option<String>,
    /// Hold the hook open this long while endpoint removal propagates (e.g. 5s).
    #[arg(long, value_name = "DURATION")]
    pub sleep: Option<humantime::Duration>,
    /// Bound on each HTTP step.
    #[arg(long, value_name = "DURATION", default_value = "2s")]
    pub timeout: humantime::Duration,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Print JSON instead of an annotated table.
    #[arg(long)]
    pub json: bool,
}

impl Cli {
    pub fn config_file(&self) -> Option<ConfigFile> {
        let via = if std::env::var_os("GRACEFUL_CONFIG").is_some_and(|v| Some(PathBuf::from(v)) == self.config) {
            "GRACEFUL_CONFIG"
        } else {
            "--config"
        };
        self.config.clone().map(|path| ConfigFile { path, via })
    }
}

fn dur(d: Option<humantime::Duration>) -> Option<String> {
    d.map(|d| humantime::format_duration(Duration::from(d)).to_string())
}

impl Toggles {
    pub fn apply(&self, o: &mut Overrides) {
        o.set_opt("features.graceful", "--graceful", self.graceful);
        o.set_opt("features.retry", "--retry", self.retry);
        o.set_opt("features.timeouts", "--timeouts", self.timeouts);
        o.set_opt("shutdown.drain_delay", "--drain-delay", dur(self.drain_delay));
        o.set_opt("shutdown.shutdown_timeout", "--shutdown-timeout", dur(self.shutdown_timeout));
    }
}

impl BackendArgs {
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides::default();
        o.set_opt("backend.listen", "--listen", self.listen.map(|a| a.to_string()));
        o.set_opt("backend.admin_listen", "--admin-listen", self.admin_listen.map(|a| a.to_string()));
        self.toggles.apply(&mut o);
        o
    }
}

impl FrontendArgs {
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides::default();
        o.set_opt("frontend.listen", "--listen", self.listen.map(|a| a.to_string()));
        o.set_opt("frontend.admin_listen", "--admin-listen", self.admin_listen.map(|a| a.to_string()));
        o.set_opt("frontend.backend_url", "--backend-url", self.backend_url.clone());
        if !self.resolve.is_empty() {
            o.set("upstream.resolve", "--resolve", self.resolve.clone());
        }
        self.toggles.apply(&mut o);
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn toggles_take_equals_and_bare_forms() {
        let cli = Cli::try_parse_from(["graceful", "backend", "--graceful=false", "--retry"]).unwrap();
        let Command::Backend(b) = cli.command else { panic!("backend expected") };
        assert_eq!(b.toggles.graceful, Some(false));
        assert_eq!(b.toggles.retry, Some(true));
        assert_eq!(b.toggles.timeouts, None);
    }
}
