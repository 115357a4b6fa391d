//! `gateway-cost`: what the chat server's gateway adds to a call, against the same clients
//! calling the mock directly — the mock with no limits answering after a fixed 2 ms, open-loop
//! arrivals at each rate, streamed and not.
//!
//! # How it measures
//!
//! On a shared machine the background (another build, a noisy neighbour) moves latency by more
//! than the gateway costs, and it moves from one second to the next: two paths measured one
//! after the other compare two backgrounds as much as two paths. So both paths run **in the
//! same window**, each at the offered rate: one open-loop schedule at twice the rate whose
//! arrivals go alternately to the mock and to the gateway. Each path gets its rate, evenly
//! spaced, and both see the same background, the same load generator and the same mock; which
//! path leads each pair alternates from one round to the next. The price is that the machine
//! carries both paths at once (2,000 calls a second in the 1,000/s row): the CPU the gateway
//! takes slows the direct calls as much as its own, so the difference is what the gateway
//! adds to a call, not what its load costs its neighbours — the CPU time per call (below) says
//! that. And a rate at which the two paths together saturate the machine describes the pair:
//! the throughput ratio then tells how the two shared the machine.
//!
//! `--mode alternate` runs each path alone instead, in a window of its own, the two one after
//! the other and the order alternating from round to round: the machine carries one path at a
//! time, which a rate near its capacity needs (at 5,000/s per path the pair is 10,000 calls a
//! second), but the difference then compares two windows, and whatever the background did in
//! one and not the other lands in it.
//!
//! A row is several rounds (`--rounds`, each `--seconds` long, after a half-second warm-up).
//! Beside it, what else the machine did meanwhile, from the kernel's accounting: the share of
//! its CPU time that other processes used, and the host's steal.
//! Each round yields both paths' percentiles and their difference; the table shows the median
//! over the rounds and, for the added p99, its range, so that a reader sees how far one round
//! may be from the next. Latency runs from the scheduled time to the reply's end, so that a late
//! send counts against the path.
//!
//! An open loop that a path cannot keep up with piles calls up without end, and each call holds
//! sockets (two for a direct call, four through the gateway). A path keeps at most
//! [`in_flight_bound`] calls open: an arrival beyond is not sent and counts as **shed**; a call
//! not answered within [`CALL_TIMEOUT`], or answered with an error, counts as **failed**.
//!
//! Before the loaded rounds, each path and reply is called one at a time, in blocks of
//! [`BLOCK_CALLS`] alternating between the paths, [`BLOCKS`] blocks each, and the process's CPU
//! time per call (user and kernel, load generator and mock included) is taken from the
//! kernel's per-thread accounting: the median over a path's blocks is what a call costs the
//! machine. The background moves it less than latency, but on a shared virtual machine it
//! still moves it (a vCPU waiting for its host counts as running); instruction counts
//! (`--serial`, below) do not move at all.
//!
//! `--serial N --path direct|gateway --reply whole|streamed` makes only N calls one at a time
//! over one path and exits: the driver for counting instructions per call with callgrind (two
//! runs with different N; the difference of the totals over the difference of N).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tower_llm_queue_servers::loadgen::{read_reply, Outcome, Percentiles};
use tower_llm_queue_servers::mock::{MockConfig, MockProvider};

use super::gateway::{http_client, Gateway};

/// The two paths compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The clients call the mock.
    Direct,
    /// The clients call the gateway, which calls the mock.
    Gateway,
}

/// The subcommand's options.
#[derive(Debug, Clone)]
pub struct Options {
    seconds: f64,
    rounds: usize,
    rates: Vec<u32>,
    alternate: bool,
    serial: Option<usize>,
    route: Route,
    stream: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            seconds: 3.0,
            rounds: 7,
            rates: vec![1000, 5000],
            alternate: false,
            serial: None,
            route: Route::Gateway,
            stream: false,
        }
    }
}

/// The flags [`Options::set`] reads.
pub const FLAGS: &[&str] = &[
    "--seconds",
    "--rounds",
    "--rates",
    "--mode",
    "--serial",
    "--path",
    "--reply",
];

impl Options {
    /// Sets one of [`FLAGS`] from `text`.
    pub fn set(&mut self, flag: &str, text: &str) -> Result<(), String> {
        let count = |range: std::ops::RangeInclusive<usize>| match text.parse::<usize>() {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(format!("{flag}: from {} to {}", range.start(), range.end())),
        };
        match flag {
            "--seconds" => {
                let seconds: f64 = text.parse().map_err(|_| format!("--seconds: {text:?}"))?;
                if !(seconds.is_finite() && (0.5..=600.0).contains(&seconds)) {
                    return Err("--seconds: from 0.5 to 600".into());
                }
                self.seconds = seconds;
            }
            "--rounds" => self.rounds = count(1..=100)?,
            "--serial" => self.serial = Some(count(1..=10_000_000)?),
            "--mode" => {
                self.alternate = one_of(flag, text, [("paired", false), ("alternate", true)])?
            }
            "--path" => {
                self.route = one_of(
                    flag,
                    text,
                    [("direct", Route::Direct), ("gateway", Route::Gateway)],
                )?
            }
            "--reply" => self.stream = one_of(flag, text, [("whole", false), ("streamed", true)])?,
            "--rates" => {
                let rates: Result<Vec<u32>, _> =
                    text.split(',').map(|r| r.trim().parse::<u32>()).collect();
                match rates {
                    Ok(rates) if rates.iter().all(|r| (1..=100_000).contains(r)) => {
                        self.rates = rates
                    }
                    _ => return Err(format!("--rates: {text:?} is not a list of 1 to 100000")),
                }
            }
            _ => return Err(format!("{flag} is not a gateway-cost option")),
        }
        Ok(())
    }
}

/// The value named `text` among a flag's two `choices`.
fn one_of<T>(flag: &str, text: &str, choices: [(&str, T); 2]) -> Result<T, String> {
    let [(first, _), (second, _)] = &choices;
    let error = format!("{flag}: {first} or {second}, not {text:?}");
    choices
        .into_iter()
        .find(|(name, _)| *name == text)
        .map(|(_, value)| value)
        .ok_or(error)
}

/// One path at one rate.
#[derive(Debug, Clone, Default, Serialize)]
struct Measure {
    /// Arrivals scheduled.
    scheduled: usize,
    completed: usize,
    /// Calls sent that failed or timed out.
    failed: usize,
    /// Arrivals not sent: the path had [`in_flight_bound`] calls open.
    shed: usize,
    /// Completed calls per second, from the first arrival to the last reply.
    throughput: f64,
    latency: Percentiles,
}

/// One round: both paths in the same window.
#[derive(Debug, Clone, Serialize)]
struct Round {
    direct: Measure,
    gateway: Measure,
    added_p50_ms: f64,
    added_p99_ms: f64,
    throughput_ratio: f64,
}

impl Round {
    fn of(direct: Measure, gateway: Measure) -> Round {
        Round {
            added_p50_ms: gateway.latency.p50_ms - direct.latency.p50_ms,
            added_p99_ms: gateway.latency.p99_ms - direct.latency.p99_ms,
            throughput_ratio: gateway.throughput / direct.throughput.max(f64::MIN_POSITIVE),
            direct,
            gateway,
        }
    }
}

/// The median and the range of a figure over the rounds.
#[derive(Debug, Clone, Copy, Serialize)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: impl IntoIterator<Item = f64>) -> Spread {
        let mut values: Vec<f64> = values.into_iter().collect();
        values.sort_by(f64::total_cmp);
        Spread {
            median: values.get(values.len() / 2).copied().unwrap_or(0.0),
            min: values.first().copied().unwrap_or(0.0),
            max: values.last().copied().unwrap_or(0.0),
        }
    }
}

/// CPU time of the process per call, made one at a time, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
struct CpuPerCall {
    direct_us: f64,
    gateway_us: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    rate: u32,
    stream: bool,
    /// Each path's median percentiles and throughput over the rounds; its counts summed.
    direct: Measure,
    gateway: Measure,
    added_p50_ms: Spread,
    added_p99_ms: Spread,
    throughput_ratio: Spread,
    cpu_per_call: CpuPerCall,
    background: Background,
    rounds: Vec<Round>,
}

/// The longest a call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Calls in a block of calls made one at a time, for the CPU time per call.
const BLOCK_CALLS: usize = 50;

/// Blocks of [`BLOCK_CALLS`] per path and reply, alternating between the paths.
const BLOCKS: usize = 9;

/// The time the mock waits before answering.
const UPSTREAM_LATENCY: Duration = Duration::from_millis(2);

/// Each path's figures, as the median over `runs` of each, apart; the counts summed.
fn median(runs: &[Measure]) -> Measure {
    let mid = |figure: fn(&Measure) -> f64| Spread::of(runs.iter().map(figure)).median;
    Measure {
        scheduled: runs.iter().map(|m| m.scheduled).sum(),
        completed: runs.iter().map(|m| m.completed).sum(),
        failed: runs.iter().map(|m| m.failed).sum(),
        shed: runs.iter().map(|m| m.shed).sum(),
        throughput: mid(|m| m.throughput),
        latency: Percentiles {
            count: runs.iter().map(|m| m.latency.count).sum(),
            p50_ms: mid(|m| m.latency.p50_ms),
            p95_ms: mid(|m| m.latency.p95_ms),
            p99_ms: mid(|m| m.latency.p99_ms),
        },
    }
}

/// Raises the soft limit of open files to the hard one, and returns how many calls one path
/// may keep open: with both paths at their bound (two descriptors a direct call, four through
/// the gateway) and as many connections again lingering, an eighth of the limit each, less a
/// reserve for the rest of the process.
pub fn in_flight_bound() -> usize {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    (limit.saturating_sub(256) / 8).max(16)
}

/// The mock (no limits, answering after [`UPSTREAM_LATENCY`]) and the gateway in front of it,
/// with limits that never bind.
async fn servers() -> Result<(tower_llm_queue_servers::mock::RunningMock, Gateway), tower::BoxError>
{
    let mock = MockProvider::start(
        MockConfig {
            tokens_per_second: 0.0,
            time_to_first_token: UPSTREAM_LATENCY,
            ..MockConfig::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await?;
    let unlimited = [
        ("MAX_CONCURRENT_CHATS", "100000".to_string()),
        ("QUEUE_CAPACITY", "100000".into()),
        ("MAX_CONCURRENT_PER_USER", "1000000".into()),
        ("REQUESTS_PER_MINUTE", "1000000000".into()),
        ("CHAT_TIMEOUT", "60000".into()),
    ];
    let gateway = Gateway::start(&format!("{}/v1", mock.url()), &unlimited).await?;
    Ok((mock, gateway))
}

/// Runs the subcommand: prints the table and writes it, with every round's figures as JSON,
/// into `out`; or, with `--serial`, only makes the calls.
pub async fn run(options: &Options, out: &Path) -> Result<(), tower::BoxError> {
    let bound = in_flight_bound();
    let (mock, gateway) = servers().await?;
    let targets = [
        Target::new(format!("{}/v1/chat/completions", mock.url()), bound),
        Target::new(format!("{}/v1/chat/completions", gateway.url()), bound),
    ];
    if let Some(calls) = options.serial {
        let target = &targets[usize::from(options.route == Route::Gateway)];
        let started = std::time::Instant::now();
        let served = target.serial(calls, options.stream).await;
        eprintln!(
            "{served} of {calls} {} calls served over the {:?} path, one at a time, in {:.2} s",
            if options.stream { "streamed" } else { "whole" },
            options.route,
            started.elapsed().as_secs_f64()
        );
        gateway.stop().await;
        mock.stop().await;
        return Ok(());
    }

    let load_before = load_average();
    let mut cpu = Vec::new();
    for stream in [false, true] {
        cpu.push(cpu_per_call(&targets, stream).await);
    }
    let mut rows = Vec::new();
    for &rate in &options.rates {
        for stream in [false, true] {
            let cpu_per_call = cpu[usize::from(stream)];
            warm_up(&targets, rate, stream).await;
            let mut rounds = Vec::with_capacity(options.rounds);
            let before = Ticks::now();
            for r in 0..options.rounds {
                let (direct, gateway) = if options.alternate {
                    let order = [r % 2, 1 - r % 2];
                    let mut alone = [Measure::default(), Measure::default()];
                    for path in order {
                        let mut measures =
                            round(&[&targets[path]], rate, stream, options.seconds, 0).await;
                        alone[path] = measures.remove(0);
                    }
                    let [direct, gateway] = alone;
                    (direct, gateway)
                } else {
                    let both = [&targets[0], &targets[1]];
                    let mut measures = round(&both, rate, stream, options.seconds, r % 2).await;
                    let gateway = measures.remove(1);
                    (measures.remove(0), gateway)
                };
                rounds.push(Round::of(direct, gateway));
            }
            let background = Background::between(before, Ticks::now());
            let directs: Vec<Measure> = rounds.iter().map(|r| r.direct.clone()).collect();
            let gateways: Vec<Measure> = rounds.iter().map(|r| r.gateway.clone()).collect();
            let row = Row {
                rate,
                stream,
                direct: median(&directs),
                gateway: median(&gateways),
                added_p50_ms: Spread::of(rounds.iter().map(|r| r.added_p50_ms)),
                added_p99_ms: Spread::of(rounds.iter().map(|r| r.added_p99_ms)),
                throughput_ratio: Spread::of(rounds.iter().map(|r| r.throughput_ratio)),
                cpu_per_call,
                background,
                rounds,
            };
            eprintln!(
                "{rate}/s {}: direct p50 {:.2} ms p99 {:.2} ms, gateway p50 {:.2} ms p99 {:.2} ms, added p99 {:.2} ms ({:.2} to {:.2})",
                if stream { "streamed" } else { "whole" },
                row.direct.latency.p50_ms,
                row.direct.latency.p99_ms,
                row.gateway.latency.p50_ms,
                row.gateway.latency.p99_ms,
                row.added_p99_ms.median,
                row.added_p99_ms.min,
                row.added_p99_ms.max,
            );
            rows.push(row);
        }
    }
    let load_after = load_average();
    gateway.stop().await;
    mock.stop().await;

    let windows = if options.alternate {
        "clients call the mock directly in one window and through the gateway in the next, at the offered rate, the order alternating"
    } else {
        "open-loop clients call the mock directly and through the gateway in the same window, at the offered rate each, arrivals alternating"
    };
    let mut table = format!(
        "The gateway's own cost: the mock answering after {} ms with no limits; per row, {} rounds of {} s in which {windows}; medians over the rounds (the added p99's range in brackets); at most {bound} calls open per path. {}, load average {} before and {} after.\n\n\
         | offered per path | reply | direct p50 / p99 | via the gateway p50 / p99 | added p50 | added p99 [range] | served/s: direct, gateway (ratio) | CPU per call, one at a time: direct / gateway | failed + shed: direct, gateway | other processes / steal |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        UPSTREAM_LATENCY.as_millis(),
        options.rounds,
        options.seconds,
        super::machine(),
        load_before,
        load_after,
    );
    for row in &rows {
        table.push_str(&format!(
            "| {}/s | {} | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.2} ms | {:.2} ms [{:.2}, {:.2}] | {:.0}, {:.0} ({:.3}) | {:.0} / {:.0} µs | {} + {}, {} + {} | {:.0}% / {:.0}% |\n",
            row.rate,
            if row.stream { "streamed" } else { "whole" },
            row.direct.latency.p50_ms,
            row.direct.latency.p99_ms,
            row.gateway.latency.p50_ms,
            row.gateway.latency.p99_ms,
            row.added_p50_ms.median,
            row.added_p99_ms.median,
            row.added_p99_ms.min,
            row.added_p99_ms.max,
            row.direct.throughput,
            row.gateway.throughput,
            row.throughput_ratio.median,
            row.cpu_per_call.direct_us,
            row.cpu_per_call.gateway_us,
            row.direct.failed,
            row.direct.shed,
            row.gateway.failed,
            row.gateway.shed,
            row.background.others_pct,
            row.background.steal_pct,
        ));
    }
    println!("{table}");
    std::fs::write(out.join("gateway-cost.md"), &table)?;
    std::fs::write(
        out.join("gateway-cost.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    Ok(())
}

/// The load average over the last minute, as the kernel reports it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// The machine's CPU time so far, in the kernel's ticks: in all, busy, taken by the host for
/// others (steal), and this process's share of the busy.
#[derive(Debug, Clone, Copy)]
struct Ticks {
    total: u64,
    busy: u64,
    steal: u64,
    ours: u64,
}

impl Ticks {
    /// From `/proc/stat` and `/proc/self/stat`.
    fn now() -> Option<Ticks> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|n| n.parse().ok())
            .collect::<Option<_>>()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = cpu.try_into().ok()?;
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        // After the command's name in brackets: state is field 3, utime 14 and stime 15.
        let fields: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
        let time = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
        Some(Ticks {
            total: user + nice + system + idle + iowait + irq + softirq + steal,
            busy: user + nice + system + irq + softirq,
            steal,
            ours: time(14)? + time(15)?,
        })
    }
}

/// What else the machine did while a row was measured, as shares of all its CPU time (every
/// core): other processes, and the host's steal (a vCPU waiting while the host runs others).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Background {
    others_pct: f64,
    steal_pct: f64,
}

impl Background {
    fn between(before: Option<Ticks>, after: Option<Ticks>) -> Background {
        let (Some(before), Some(after)) = (before, after) else {
            return Background::default();
        };
        let total = after.total.saturating_sub(before.total).max(1) as f64;
        let busy = after.busy.saturating_sub(before.busy);
        let ours = after.ours.saturating_sub(before.ours);
        Background {
            others_pct: 100.0 * busy.saturating_sub(ours) as f64 / total,
            steal_pct: 100.0 * after.steal.saturating_sub(before.steal) as f64 / total,
        }
    }
}

/// CPU time used so far by every thread of this process, from `/proc/self/task/*/schedstat`.
fn process_cpu() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(text) = std::fs::read_to_string(task.ok()?.path().join("schedstat")) else {
            continue;
        };
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// One path: where to send, with its own connection pool and its bound of calls open.
struct Target {
    url: Arc<str>,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    open: Arc<Semaphore>,
}

/// How one call ended.
enum Ending {
    /// After this long from its scheduled time, at this instant.
    Served(Duration, Instant),
    Failed,
    Shed,
}

impl Target {
    fn new(url: String, bound: usize) -> Target {
        Target {
            url: url.into(),
            client: http_client(),
            open: Arc::new(Semaphore::new(bound)),
        }
    }

    /// Call `i`: whether it was served.
    fn call(&self, i: usize, stream: bool) -> impl std::future::Future<Output = bool> + 'static {
        let body = serde_json::json!({
            "model": "mock-llm",
            "messages": [{"role": "user", "content": format!("hello number {}", i % 64)}],
            "max_tokens": 16,
            "stream": stream,
        });
        let request = http::Request::post(&*self.url)
            .header("content-type", "application/json")
            .header("x-user-id", format!("user{}", i % 100))
            .body(Full::new(Bytes::from(body.to_string())));
        let client = self.client.clone();
        async move {
            let Ok(request) = request else { return false };
            match client.request(request).await {
                Ok(response) => {
                    matches!(read_reply(response, stream).await, Outcome::Served { .. })
                }
                Err(_) => false,
            }
        }
    }

    /// Makes `calls` calls one after the other; returns how many were served.
    async fn serial(&self, calls: usize, stream: bool) -> usize {
        let mut served = 0;
        for i in 0..calls {
            served += usize::from(self.call(i, stream).await);
        }
        served
    }

    /// Sends call `i` at `at` unless the path has its bound of calls open.
    fn send(
        &self,
        i: usize,
        stream: bool,
        at: Instant,
    ) -> impl std::future::Future<Output = Ending> + Send + 'static {
        let permit = self.open.clone().try_acquire_owned();
        let call = permit.map(|permit| (permit, self.call(i, stream)));
        async move {
            let Ok((_permit, call)) = call else {
                return Ending::Shed;
            };
            match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(true) => Ending::Served(at.elapsed(), Instant::now()),
                _ => Ending::Failed,
            }
        }
    }
}

/// The process's CPU time per call made one at a time over each path, in µs: the median over
/// [`BLOCKS`] blocks of [`BLOCK_CALLS`] calls, the paths' blocks alternating.
async fn cpu_per_call(targets: &[Target; 2], stream: bool) -> CpuPerCall {
    let mut blocks: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for target in targets {
        target.serial(BLOCK_CALLS, stream).await;
    }
    for _ in 0..BLOCKS {
        for (path, target) in targets.iter().enumerate() {
            let before = process_cpu();
            target.serial(BLOCK_CALLS, stream).await;
            if let (Some(before), Some(after)) = (before, process_cpu()) {
                let cpu = after.saturating_sub(before).as_secs_f64() * 1e6;
                blocks[path].push(cpu / BLOCK_CALLS as f64);
            }
        }
    }
    let [direct, gateway] = blocks.map(|block| Spread::of(block).median);
    CpuPerCall {
        direct_us: direct,
        gateway_us: gateway,
    }
}

/// Half a second of both paths at `rate`: connections opened, caches filled.
async fn warm_up(targets: &[Target; 2], rate: u32, stream: bool) {
    round(&[&targets[0], &targets[1]], rate, stream, 0.5, 0).await;
}

/// `paths` at `rate` each for `seconds`: one open-loop schedule at `rate` times their number,
/// arrival `k` to path `(k + lead) % paths.len()`, each sent at its time whatever the others
/// are doing; a measure per path.
async fn round(
    paths: &[&Target],
    rate: u32,
    stream: bool,
    seconds: f64,
    lead: usize,
) -> Vec<Measure> {
    let n = paths.len();
    let gap = Duration::from_secs_f64(1.0 / (f64::from(rate) * n as f64));
    let per_path = (f64::from(rate) * seconds) as usize;
    let start = Instant::now();
    let mut calls = JoinSet::new();
    for k in 0..n * per_path {
        let at = start + gap.mul_f64(k as f64);
        if at > Instant::now() {
            sleep_until(at).await;
        }
        let path = (k + lead) % n;
        let call = paths[path].send(k / n, stream, at);
        calls.spawn(async move { (path, call.await) });
    }
    let mut latencies = vec![Vec::with_capacity(per_path); n];
    let mut measures = vec![Measure::default(); n];
    let mut last = vec![start; n];
    while let Some(done) = calls.join_next().await {
        let Ok((path, ending)) = done else { continue };
        match ending {
            Ending::Served(latency, end) => {
                latencies[path].push(latency);
                last[path] = last[path].max(end);
            }
            Ending::Failed => measures[path].failed += 1,
            Ending::Shed => measures[path].shed += 1,
        }
    }
    for (path, measure) in measures.iter_mut().enumerate() {
        let latencies = std::mem::take(&mut latencies[path]);
        measure.scheduled = per_path;
        measure.completed = latencies.len();
        measure.throughput =
            measure.completed as f64 / (last[path] - start).as_secs_f64().max(1e-9);
        measure.latency = Percentiles::of(latencies);
    }
    measures
}
