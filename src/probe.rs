//! `graceful shutdown-probe`: the preStop task, runnable as an exec hook in an image with no shell.
//!
//! Steps, each bounded: drain the local pod (readiness fails at once), notify the backend
//! (one retry), hold the hook open while endpoint removal propagates. Every step runs even if an
//! earlier one failed (the sleep matters most); the exit status and one line say what happened.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::cli::ProbeArgs;
use crate::identity::Identity;

struct Step {
    name: &'static str,
    ok: bool,
    what: String,
}

pub fn run(args: ProbeArgs) -> ExitCode {
    if args.drain.is_none() && args.game_over.is_none() && args.sleep.is_none() {
        eprintln!("shutdown-probe: nothing to do: give --drain URL, --game-over URL and/or --sleep DURATION");
        return ExitCode::from(2);
    }
    for (flag, url) in [("--drain", &args.drain), ("--game-over", &args.game_over)] {
        if let Some(u) = url {
            match url::Url::parse(u) {
                Ok(p) if p.scheme() == "http" && p.host_str().is_some() => {}
                _ => {
                    eprintln!("shutdown-probe: {flag} `{u}` is not an http:// URL");
                    return ExitCode::from(2);
                }
            }
        }
    }
    let steps = actix_web::rt::System::new().block_on(steps(args));
    let failed = steps.iter().any(|s| !s.ok);
    let line = steps
        .iter()
        .map(|s| format!("{} {}: {}", s.name, if s.ok { "ok" } else { "FAILED" }, s.what))
        .collect::<Vec<_>>()
        .join("; ");
    if failed {
        eprintln!("shutdown-probe: {line}");
        ExitCode::FAILURE
    } else {
        println!("shutdown-probe: {line}");
        ExitCode::SUCCESS
    }
}

async fn steps(args: ProbeArgs) -> Vec<Step> {
    let timeout: Duration = args.timeout.into();
    let client = awc::Client::builder().timeout(timeout).disable_redirects().finish();
    let pod = Identity::from_env().pod_name;
    let mut out = Vec::new();
    if let Some(url) = &args.drain {
        out.push(post(&client, "drain", url, String::new(), 1, timeout).await);
    }
    if let Some(url) = &args.game_over {
        let body = serde_json::json!({"from": pod, "message": "preStop"}).to_string();
        out.push(post(&client, "game-over", url, body, 2, timeout).await);
    }
    if let Some(d) = args.sleep {
        let d: Duration = d.into();
        tokio::time::sleep(d).await;
        out.push(Step { name: "sleep", ok: true, what: humantime::format_duration(d).to_string() });
    }
    out
}

async fn post(
    client: &awc::Client,
    name: &'static str,
    url: &str,
    body: String,
    tries: usize,
    timeout: Duration,
) -> Step {
    let mut last = String::new();
    for attempt in 1..=tries {
        let started = Instant::now();
        let send = client.post(url).insert_header(("content-type", "application/json")).send_body(body.clone());
        // The client timeout covers headers only; bound the whole exchange too.
        let res = tokio::time::timeout(timeout, async {
            let mut resp = send.await.map_err(|e| e.to_string())?;
            let _ = resp.body().limit(64 * 1024).await;
            Ok::<_, String>(resp.status())
        })
        .await;
        let ms = started.elapsed().as_millis();
        match res {
            Ok(Ok(status)) if status.is_success() => {
                return Step { name, ok: true, what: format!("{url} answered {} in {ms} ms", status.as_u16()) }
            }
            Ok(Ok(status)) => last = format!("{url} answered {} (try {attempt})", status.as_u16()),
            Ok(Err(e)) => last = format!("{url}: {e} (try {attempt})"),
            Err(_) => last = format!("{url}: no answer within {} (try {attempt})", humantime::format_duration(timeout)),
        }
        if attempt < tries {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Step { name, ok: false, what: last }
}
