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
            if let Err(why) = check_url(u) {
                eprintln!("shutdown-probe: {flag} `{u}` is not a usable http:// URL: {why}");
                return ExitCode::from(2);
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

/// A hook's URL is typed by a person into a manifest: anything the URL parser would quietly
/// repair (an empty host, a space, a non-ASCII name) is a usage error, not a failed step.
fn check_url(raw: &str) -> Result<(), &'static str> {
    if !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("it contains a space, a control or a non-ASCII character");
    }
    let rest = raw.get(..7).filter(|p| p.eq_ignore_ascii_case("http://")).map(|_| &raw[7..]);
    let Some(rest) = rest else { return Err("it must start with http://") };
    if rest.is_empty() || rest.starts_with(['/', '?', '#', ':']) {
        return Err("it has no host");
    }
    match url::Url::parse(raw) {
        Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
        _ => Err("it does not parse as scheme://host[:port]/path"),
    }
}

/// awc's wording ("connector has been disconnected") said as what happened on the wire.
fn describe(e: awc::error::SendRequestError) -> String {
    use crate::upstream::ErrorType;
    let detail = e.to_string();
    match crate::upstream::classify_send(e).kind {
        ErrorType::ConnectionRefused => "connection refused (nothing listens there)".into(),
        ErrorType::ClosedBeforeResponse => "the server closed the connection without answering".into(),
        ErrorType::ConnectionReset => "the connection was reset by the server".into(),
        ErrorType::Timeout => "timed out".into(),
        _ => detail,
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
            let mut resp = send.await.map_err(describe)?;
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

#[cfg(test)]
mod tests {
    use super::check_url;

    #[test]
    fn urls_a_person_got_wrong_are_refused() {
        assert!(check_url("http://127.0.0.1:5001/prestop").is_ok());
        assert!(check_url("HTTP://svc-backend:5000/game-over").is_ok());
        for bad in ["http:///prestop", "http://bücher.invalid/", "http://a b/", "https://x/", "http://", "http://:80/"]
        {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }
}
