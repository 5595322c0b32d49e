//! Entry point: parse flags, load and validate config (before anything listens), set up
//! telemetry, run the chosen role.

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::config::{self, Overrides};
use crate::identity::Identity;
use crate::{backend, frontend, lab, probe, telemetry};

pub fn main() -> ExitCode {
    // Before parsing anything: a SIGTERM now must not be lost (see `signals`).
    if crate::signals::serving_role(std::env::args_os()) {
        crate::signals::install_early();
    }
    let cli = Cli::parse();
    let file = cli.config_file();
    let (role, overrides) = match &cli.command {
        Command::Backend(a) => ("backend", a.overrides()),
        Command::Frontend(a) => ("frontend", a.overrides()),
        Command::Config(_) => ("config", Overrides::default()),
        Command::ShutdownProbe(a) => return probe::run(a.clone()),
        Command::Lab(_) => ("lab", Overrides::default()),
    };
    if role == "lab" {
        let Command::Lab(args) = cli.command else { unreachable!() };
        return match lab::run(*args, file) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("graceful lab: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let loaded = match config::load(file.as_ref(), &overrides) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("graceful {role}: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::Config(args) = &cli.command {
        return print_config(&loaded, args.json);
    }
    let cfg = loaded.config;
    if let Err(e) = telemetry::init(role, &cfg, &Identity::from_env()) {
        eprintln!("graceful {role}: telemetry: {e:#}");
        return ExitCode::from(2);
    }
    match cli.command {
        Command::Backend(_) => backend::run(cfg),
        Command::Frontend(_) => frontend::run(cfg),
        _ => unreachable!("handled above"),
    }
}

fn print_config(loaded: &config::Loaded, json: bool) -> ExitCode {
    let rows = config::explain(loaded);
    if json {
        let out: Vec<_> = rows
            .iter()
            .map(|(k, v, s)| {
                serde_json::json!({
                    "key": k,
                    "value": serde_json::from_str::<serde_json::Value>(v).unwrap_or(serde_json::Value::Null),
                    "source": s,
                    "env": config::env_var_for(k),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        let mut table = comfy_table::Table::new();
        table.load_style(comfy_table::presets::NOTHING).set_header(["key", "value", "source", "env"]);
        for (k, v, s) in rows {
            let env = config::env_var_for(&k);
            table.add_row([k, v, s, env]);
        }
        println!("{table}");
    }
    ExitCode::SUCCESS
}
