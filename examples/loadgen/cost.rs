//! `gateway-cost`: what the chat server's gateway adds to a call, against the same clients
//! calling the mock directly — the mock with no limits answering after a fixed 2 ms, open-loop
//! arrivals at each rate, streamed and not, both paths in the same run, alternating three times
//! (each figure the median of three; errors summed).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tower_llm_queue_servers::loadgen::{read_reply, Outcome, Percentiles};
use tower_llm_queue_servers::mock::{MockConfig, MockProvider};

use super::gateway::{http_client, Gateway};

/// The subcommand's options.
#[derive(Debug, Clone)]
pub struct Options {
    seconds: f64,
    rates: Vec<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            seconds: 5.0,
            rates: vec![1000, 5000],
        }
    }
}

impl Options {
    /// Sets `--seconds` or `--rates` from `text`.
    pub fn set(&mut self, flag: &str, text: &str) -> Result<(), String> {
        match flag {
            "--seconds" => {
                let seconds: f64 = text.parse().map_err(|_| format!("--seconds: {text:?}"))?;
                if !(seconds.is_finite() && (0.5..=600.0).contains(&seconds)) {
                    return Err("--seconds: from 0.5 to 600".into());
                }
                self.seconds = seconds;
            }
            _ => {
                let rates: Result<Vec<u32>, _> =
                    text.split(',').map(|r| r.trim().parse::<u32>()).collect();
                match rates {
                    Ok(rates) if rates.iter().all(|r| (1..=100_000).contains(r)) => {
                        self.rates = rates
                    }
                    _ => return Err(format!("--rates: {text:?} is not a list of 1 to 100000")),
                }
            }
        }
        Ok(())
    }
}

/// One path at one rate.
#[derive(Debug, Clone, Serialize)]
struct Measure {
    offered: u32,
    sent: usize,
    completed: usize,
    errors: usize,
    throughput: f64,
    latency: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    rate: u32,
    stream: bool,
    direct: Measure,
    gateway: Measure,
    added_p50_ms: f64,
    added_p99_ms: f64,
    throughput_ratio: f64,
}

/// The longest a call may take before it counts as an error: an open loop that the path cannot
/// keep up with piles calls up without end.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs of each path at each rate, alternating; each figure is the median of its runs.
const ROUNDS: usize = 3;

/// The median of each figure of `runs`, taken apart.
fn median(mut runs: Vec<Measure>) -> Measure {
    let mid = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let mut p50: Vec<f64> = runs.iter().map(|m| m.latency.p50_ms).collect();
    let mut p95: Vec<f64> = runs.iter().map(|m| m.latency.p95_ms).collect();
    let mut p99: Vec<f64> = runs.iter().map(|m| m.latency.p99_ms).collect();
    let mut throughput: Vec<f64> = runs.iter().map(|m| m.throughput).collect();
    let errors = runs.iter().map(|m| m.errors).sum();
    let mut first = runs.swap_remove(0);
    first.latency.p50_ms = mid(&mut p50);
    first.latency.p95_ms = mid(&mut p95);
    first.latency.p99_ms = mid(&mut p99);
    first.throughput = mid(&mut throughput);
    first.errors = errors;
    first
}

/// The time the mock waits before answering.
const UPSTREAM_LATENCY: Duration = Duration::from_millis(2);

pub async fn run(options: &Options, out: &Path) -> Result<(), tower::BoxError> {
    let mock = MockProvider::start(
        MockConfig {
            tokens_per_second: 0.0,
            time_to_first_token: UPSTREAM_LATENCY,
            ..MockConfig::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await?;
    let upstream = format!("{}/v1", mock.url());
    let unlimited = [
        ("MAX_CONCURRENT_CHATS", "100000".to_string()),
        ("QUEUE_CAPACITY", "100000".into()),
        ("MAX_CONCURRENT_PER_USER", "1000000".into()),
        ("REQUESTS_PER_MINUTE", "1000000000".into()),
        ("CHAT_TIMEOUT", "60000".into()),
    ];
    let gateway = Gateway::start(&upstream, &unlimited).await?;
    let mut rows = Vec::new();
    for &rate in &options.rates {
        for stream in [false, true] {
            let (mut directs, mut throughs) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                let direct_url = format!("{upstream}/chat/completions");
                directs.push(measure(&direct_url, rate, stream, options.seconds).await);
                let gateway_url = format!("{}/v1/chat/completions", gateway.url());
                throughs.push(measure(&gateway_url, rate, stream, options.seconds).await);
            }
            let (direct, through) = (median(directs), median(throughs));
            eprintln!(
                "{rate}/s {}: direct p50 {:.2} ms p99 {:.2} ms, gateway p50 {:.2} ms p99 {:.2} ms",
                if stream { "streamed" } else { "whole" },
                direct.latency.p50_ms,
                direct.latency.p99_ms,
                through.latency.p50_ms,
                through.latency.p99_ms
            );
            rows.push(Row {
                rate,
                stream,
                added_p50_ms: through.latency.p50_ms - direct.latency.p50_ms,
                added_p99_ms: through.latency.p99_ms - direct.latency.p99_ms,
                throughput_ratio: through.throughput / direct.throughput.max(f64::MIN_POSITIVE),
                direct,
                gateway: through,
            });
        }
    }
    gateway.stop().await;
    mock.stop().await;

    let mut table = format!(
        "The gateway's own cost: the mock answering after {} ms with no limits, open-loop clients for {} s at each rate, direct and through the gateway alternately {ROUNDS} times (medians), in one process on {}.\n\n\
         | offered | reply | direct p50 / p99 | via the gateway p50 / p99 | added p50 / p99 | throughput ratio | errors (direct, gateway) |\n\
         |---|---|---|---|---|---|---|\n",
        UPSTREAM_LATENCY.as_millis(),
        options.seconds,
        super::machine(),
    );
    for row in &rows {
        table.push_str(&format!(
            "| {}/s | {} | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.3} | {}, {} |\n",
            row.rate,
            if row.stream { "streamed" } else { "whole" },
            row.direct.latency.p50_ms,
            row.direct.latency.p99_ms,
            row.gateway.latency.p50_ms,
            row.gateway.latency.p99_ms,
            row.added_p50_ms,
            row.added_p99_ms,
            row.throughput_ratio,
            row.direct.errors,
            row.gateway.errors,
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

/// Sends `rate` requests a second to `url` for `seconds`, each at its scheduled time whatever
/// the others are doing (open loop), after half a second of warm-up; latency is from the
/// scheduled time to the reply's end, so that a late send counts against the path; a call not
/// answered within [`CALL_TIMEOUT`] is an error.
async fn measure(url: &str, rate: u32, stream: bool, seconds: f64) -> Measure {
    let client = http_client();
    let url: Arc<str> = url.into();
    let send = |i: usize| {
        let body = serde_json::json!({
            "model": "mock-llm",
            "messages": [{"role": "user", "content": format!("hello number {}", i % 64)}],
            "max_tokens": 16,
            "stream": stream,
        });
        let request = http::Request::post(&*url)
            .header("content-type", "application/json")
            .header("x-user-id", format!("user{}", i % 100))
            .body(Full::new(Bytes::from(body.to_string())));
        let client = client.clone();
        async move {
            let Ok(request) = request else { return false };
            match client.request(request).await {
                Ok(response) => {
                    matches!(read_reply(response, stream).await, Outcome::Served { .. })
                }
                Err(_) => false,
            }
        }
    };
    let gap = Duration::from_secs_f64(1.0 / f64::from(rate));
    // Warm-up: connections opened, caches filled.
    let warm = Instant::now();
    let mut warming = JoinSet::new();
    for i in 0..(rate as usize / 2) {
        sleep_until(warm + gap * i as u32).await;
        warming.spawn(send(i));
    }
    while warming.join_next().await.is_some() {}

    let total = (f64::from(rate) * seconds) as usize;
    let start = Instant::now();
    let mut calls = JoinSet::new();
    for i in 0..total {
        let at = start + gap.mul_f64(i as f64);
        if at > Instant::now() {
            sleep_until(at).await;
        }
        let call = send(i);
        calls.spawn(async move {
            let ok = tokio::time::timeout(CALL_TIMEOUT, call).await == Ok(true);
            (ok, at, Instant::now())
        });
    }
    let mut latencies = Vec::with_capacity(total);
    let (mut errors, mut last) = (0, start);
    while let Some(done) = calls.join_next().await {
        match done {
            Ok((true, at, end)) => {
                latencies.push(end - at);
                last = last.max(end);
            }
            _ => errors += 1,
        }
    }
    let completed = latencies.len();
    Measure {
        offered: rate,
        sent: total,
        completed,
        errors,
        throughput: completed as f64 / (last - start).as_secs_f64().max(1e-9),
        latency: Percentiles::of(latencies),
    }
}
