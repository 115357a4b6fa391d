//! The load harness: simulated users against a throttled mock upstream, through four targets
//! side by side — `direct` (no protection, seed 002's naive retry), `tower` (tower's own
//! layers), `ours` (this crate's layers in process) and `gateway` (the chat server over HTTP).
//!
//! ```text
//! cargo run --release --example loadgen -- all                 # every scenario, ~8 minutes
//! cargo run --release --example loadgen -- steady storm        # some of them
//! cargo run --release --example loadgen -- path/to/mine.toml   # a scenario of one's own
//! cargo run --release --example loadgen -- --scale 1 steady    # on the real clock
//! cargo run --release --example loadgen -- gateway-cost        # what the gateway adds
//! ```
//!
//! Options: `--scale N` (default 10: the upstream's minute lasts 6 s and every time in the
//! scenario is divided by 10), `--targets direct,tower,ours,gateway`, `--out DIR` (default
//! `target/loadgen`). It prints a Markdown table and writes, per scenario, the reports as JSON
//! and two SVG plots. The exit status is 0 whatever the figures; 2 for bad arguments or a bad
//! scenario file.

#[path = "../chat_server/main.rs"]
#[allow(dead_code, unused_imports)]
mod chat_server;
mod cost;
mod gateway;
mod plot;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tower_llm_queue_servers::loadgen::{
    self, checks, markdown, memory, targets, MockUpstream, Scale, Scenario, TargetReport,
};
use tower_llm_queue_servers::upstream::UpstreamClient;

use self::gateway::Gateway;

/// The scenarios that come with the harness, by name.
const SCENARIOS: &[(&str, &str)] = &[
    ("steady", include_str!("scenarios/steady.toml")),
    ("overload", include_str!("scenarios/overload.toml")),
    ("heavy-user", include_str!("scenarios/heavy-user.toml")),
    ("priority", include_str!("scenarios/priority.toml")),
    ("flaky", include_str!("scenarios/flaky.toml")),
    ("storm", include_str!("scenarios/storm.toml")),
];

const TARGETS: &[&str] = &["direct", "tower", "ours", "gateway"];

/// The default scale: the upstream's minute in 6 s.
const DEFAULT_SCALE: f64 = 10.0;

struct Args {
    scale: Scale,
    targets: Vec<String>,
    out: PathBuf,
    scenarios: Vec<Scenario>,
    cost: Option<cost::Options>,
    /// Internal: play one scenario (a JSON file) against one target in this process, and write
    /// its report to a file.
    child: Option<(PathBuf, String, PathBuf)>,
}

fn usage() -> String {
    let names: Vec<&str> = SCENARIOS.iter().map(|(name, _)| *name).collect();
    format!(
        "usage: loadgen [--scale N] [--targets {}] [--out DIR] <scenario|all|FILE.toml>...\n\
         \x20      loadgen gateway-cost [--seconds N] [--rounds N] [--rates 1000,5000] [--mode paired|alternate] [--out DIR]\n\
         \x20      loadgen gateway-cost --serial N --path direct|gateway --reply whole|streamed\n\n\
         scenarios: {}\n",
        TARGETS.join(","),
        names.join(", ")
    )
}

fn default_out() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir).join("loadgen"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/loadgen"),
    }
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        scale: Scale::new(DEFAULT_SCALE).map_err(|e| e.to_string())?,
        targets: TARGETS.iter().map(|t| t.to_string()).collect(),
        out: default_out(),
        scenarios: Vec::new(),
        cost: None,
        child: None,
    };
    let value = |args: &mut dyn Iterator<Item = String>, flag: &str| {
        args.next().ok_or_else(|| format!("{flag} needs a value"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--scale" => {
                let text = value(&mut args, "--scale")?;
                let factor: f64 = text
                    .parse()
                    .map_err(|_| format!("--scale: {text:?} is not a number"))?;
                parsed.scale = Scale::new(factor).map_err(|e| e.to_string())?;
            }
            "--targets" => {
                let text = value(&mut args, "--targets")?;
                parsed.targets = text.split(',').map(|t| t.trim().to_string()).collect();
                if let Some(bad) = parsed
                    .targets
                    .iter()
                    .find(|t| !TARGETS.contains(&t.as_str()))
                {
                    return Err(format!("--targets: unknown target {bad:?}"));
                }
            }
            "--out" => parsed.out = value(&mut args, "--out")?.into(),
            flag if cost::FLAGS.contains(&flag) => {
                let options = parsed
                    .cost
                    .as_mut()
                    .ok_or(format!("{arg} is for gateway-cost"))?;
                let text = value(&mut args, &arg)?;
                options.set(&arg, &text)?;
            }
            "gateway-cost" => parsed.cost = Some(cost::Options::default()),
            "--child" => {
                let scenario = value(&mut args, "--child")?;
                let target = value(&mut args, "--child")?;
                let report = value(&mut args, "--child")?;
                parsed.child = Some((scenario.into(), target, report.into()));
                return Ok(parsed);
            }
            "all" => {
                for (name, text) in SCENARIOS {
                    let scenario = Scenario::parse(text).map_err(|e| format!("{name}: {e}"))?;
                    parsed.scenarios.push(scenario);
                }
            }
            name => {
                let text = match SCENARIOS.iter().find(|(n, _)| *n == name) {
                    Some((_, text)) => text.to_string(),
                    None if name.ends_with(".toml") => std::fs::read_to_string(name)
                        .map_err(|e| format!("{name}: cannot read it: {e}"))?,
                    None => return Err(format!("unknown scenario {name:?}")),
                };
                let scenario = Scenario::parse(&text).map_err(|e| format!("{name}: {e}"))?;
                parsed.scenarios.push(scenario);
            }
        }
    }
    if let Some(bad) = parsed
        .targets
        .iter()
        .find(|t| !TARGETS.contains(&t.as_str()))
    {
        return Err(format!("--targets: unknown target {bad:?}"));
    }
    if parsed.scenarios.is_empty() && parsed.cost.is_none() {
        return Err("name a scenario, `all`, or `gateway-cost`".into());
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("loadgen: {message}\n");
            }
            eprint!("{}", usage());
            return ExitCode::from(if message.is_empty() { 0 } else { 2 });
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("loadgen: no runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(err) = std::fs::create_dir_all(&args.out) {
        eprintln!("loadgen: cannot create {}: {err}", args.out.display());
        return ExitCode::FAILURE;
    }
    let result = runtime.block_on(async {
        if let Some((scenario, target, report)) = &args.child {
            return child(args.scale, scenario, target, report).await;
        }
        if let Some(options) = &args.cost {
            cost::run(options, &args.out).await?;
        }
        if !args.scenarios.is_empty() {
            suite(&args).await?;
        }
        Ok::<_, tower::BoxError>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loadgen: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn suite(args: &Args) -> Result<(), tower::BoxError> {
    let started = Instant::now();
    let mut all = Vec::new();
    for scenario in &args.scenarios {
        let mut reports = Vec::new();
        for target in &args.targets {
            let report = in_child(scenario, args.scale, target, &args.out).await?;
            reports.push(report);
        }
        let json = serde_json::to_string_pretty(&reports)?;
        let base = args.out.join(&scenario.name);
        std::fs::write(base.with_extension("json"), json)?;
        plot::timeline(
            &reports,
            &args.out.join(format!("{}-timeline.svg", scenario.name)),
        )
        .map_err(|e| format!("plotting: {e}"))?;
        plot::latency(
            &reports,
            &args.out.join(format!("{}-latency.svg", scenario.name)),
        )
        .map_err(|e| format!("plotting: {e}"))?;
        all.extend(reports);
    }
    let elapsed = started.elapsed();
    let machine = machine();
    let mut summary = format!(
        "Scale {} (the upstream's minute in {:.1} s), {} on {machine}, {:.0} s in all. Times in scenario seconds.\n\n",
        args.scale.factor(),
        args.scale.window().as_secs_f64(),
        env!("CARGO_PKG_NAME"),
        elapsed.as_secs_f64(),
    );
    summary.push_str(&markdown(&all));
    summary.push_str("\nTargets of `ours` and `gateway`:\n\n");
    for check in all
        .iter()
        .filter(|r| r.target == "ours" || r.target == "gateway")
        .flat_map(checks)
    {
        summary.push_str(&format!(
            "- {} {} / {}: {} = {:.3}\n",
            if check.met { "met" } else { "NOT MET" },
            check.scenario,
            check.target,
            check.what,
            check.value
        ));
    }
    println!("{summary}");
    std::fs::write(args.out.join("summary.md"), &summary)?;
    eprintln!("written to {}", args.out.display());
    Ok(())
}

/// Plays `scenario` against `target` in a process of its own, so that each run starts from the
/// same state and its peak memory is its own (the harness, the mock and the target together).
async fn in_child(
    scenario: &Scenario,
    scale: Scale,
    target: &str,
    out: &Path,
) -> Result<TargetReport, tower::BoxError> {
    let scenario_file = out.join(format!(".{}.scenario.json", scenario.name));
    let report_file = out.join(format!(".{}.{target}.report.json", scenario.name));
    std::fs::write(&scenario_file, serde_json::to_vec(scenario)?)?;
    let status = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--scale")
        .arg(scale.factor().to_string())
        .arg("--child")
        .arg(&scenario_file)
        .arg(target)
        .arg(&report_file)
        .stdout(std::process::Stdio::null())
        .status()
        .await?;
    if !status.success() {
        return Err(format!("{} against {target} failed: {status}", scenario.name).into());
    }
    let report = serde_json::from_slice(&std::fs::read(&report_file)?)?;
    let _ = std::fs::remove_file(&report_file);
    let _ = std::fs::remove_file(&scenario_file);
    Ok(report)
}

/// The child's side of [`in_child`].
async fn child(
    scale: Scale,
    scenario: &Path,
    target: &str,
    report: &Path,
) -> Result<(), tower::BoxError> {
    let scenario: Scenario = serde_json::from_slice(&std::fs::read(scenario)?)?;
    scenario.check()?;
    let played = play(&scenario, scale, target).await?;
    std::fs::write(report, serde_json::to_vec(&played)?)?;
    Ok(())
}

/// This machine, for the reports: its CPU model and count.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "an unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cores} cores of {model}")
}

/// Plays `scenario` against `target`, with a progress bar.
async fn play(
    scenario: &Scenario,
    scale: Scale,
    target: &str,
) -> Result<TargetReport, tower::BoxError> {
    let settings = loadgen::target_settings(scenario, scale);
    let upstream = Arc::new(MockUpstream::start(loadgen::mock_config(scenario, scale)).await?);
    let client = UpstreamClient::new(upstream.base_url().parse()?, None)?;
    let mut gateway = None;
    let send = match target {
        "direct" => targets::in_process(targets::direct(client, &settings)),
        "tower" => targets::in_process(targets::tower_stack(client, &settings)),
        "ours" => targets::in_process(targets::ours(client, &settings).0),
        _ => {
            let running = Gateway::for_scenario(&upstream.base_url(), scenario, &settings).await?;
            let send = gateway::sender(running.url());
            gateway = Some(running);
            send
        }
    };
    let total = scale.real(scenario.duration_s);
    let bar = ProgressBar::new(total.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>20} [{bar:30}] {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{} {target}", scenario.name));
    let data = loadgen::run(scenario, scale, upstream.clone(), send, |sample| {
        bar.set_position((sample.at.min(total)).as_millis() as u64);
        bar.set_message(format!(
            "sent {}, served {}, waiting {}",
            sample.issued,
            sample.served,
            sample.waiting()
        ));
    })
    .await;
    let peak = memory::peak_mib();
    bar.finish_and_clear();
    if let Some(gateway) = gateway {
        gateway.stop().await;
    }
    if let Ok(upstream) = Arc::try_unwrap(upstream) {
        upstream.stop().await;
    }
    let mut report = TargetReport::new(scenario, scale, target, &data);
    report.peak_memory_mib = peak;
    eprintln!(
        "{:>12} {:>8}: served {} of {}, {} upstream 429s, {:.0} s",
        scenario.name, target, report.served, report.issued, report.upstream_429s, report.wall_s
    );
    // A moment for the sockets of this run to close before the next.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(report)
}
