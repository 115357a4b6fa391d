//! What a run shows, per target: served share, errors by kind, what the upstream saw, the share
//! of Q used, fairness, and times per class — as JSON and as a Markdown table.
//!
//! Times (latencies, queue waits, time to first token) are given in scenario time: real time
//! multiplied by the scale, so that a scaled run reads like the workload it plays.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::fairness::{jain, jain_max_min};
use super::run::{attempts_by_tag, RunData};
use super::scenario::{Class, Scale, Scenario};
use super::stats::Percentiles;
use super::window::WindowCounter;
use super::workload::User;

/// Times of one class of requests.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ClassReport {
    /// Requests sent.
    pub issued: usize,
    /// Requests served.
    pub served: usize,
    /// From sending to the reply's end, of served requests.
    pub latency: Percentiles,
    /// From sending to the start of the upstream call that served it (waiting in queues,
    /// for quotas and between retries).
    pub queue_wait: Percentiles,
    /// From sending to the first token, of served streamed requests.
    pub first_token: Percentiles,
}

/// The series a run's plots are drawn from, in bins of `bin_s` scenario seconds.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Series {
    /// The bins' length, in scenario seconds.
    pub bin_s: f64,
    /// At the end of each bin: what the upstream admitted over the window ending there, as a
    /// share of Q (the larger of requests and tokens).
    pub q_share: Vec<f64>,
    /// 429s the upstream sent in each bin.
    pub throttled: Vec<u64>,
    /// At each sample (scenario seconds): requests waiting before the upstream.
    pub waiting: Vec<(f64, usize)>,
    /// The latencies of served requests per class, in scenario seconds, sorted.
    pub latency_s: BTreeMap<Class, Vec<f64>>,
}

/// What one target did in one scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetReport {
    /// The scenario.
    pub scenario: String,
    /// The target: `direct`, `tower`, `ours` or `gateway`.
    pub target: String,
    /// The scale the run was played at.
    pub scale: f64,
    /// Requests the users sent.
    pub issued: usize,
    /// Requests served whole.
    pub served: usize,
    /// `served / issued`.
    pub served_share: f64,
    /// Errors the users got, by kind.
    pub errors: BTreeMap<String, usize>,
    /// Requests the upstream received, retries included.
    pub upstream_attempts: usize,
    /// 429s the upstream sent.
    pub upstream_429s: usize,
    /// Those 429s by the limit they hit: `requests`, `tokens`, `concurrency`.
    pub upstream_429s_by_limit: BTreeMap<String, usize>,
    /// `upstream_attempts / served`.
    pub attempts_per_served: f64,
    /// Over the windows inside the scenario's saturated intervals, the mean share of Q's
    /// requests per minute the upstream admitted; `None` without such intervals.
    pub q_used_requests: Option<f64>,
    /// The same for tokens per minute.
    pub q_used_tokens: Option<f64>,
    /// The larger of the two: the share of the binding limit used.
    pub q_used: Option<f64>,
    /// The most requests, and tokens, the upstream admitted in any window.
    pub peak_per_window: (u64, u64),
    /// Jain's index of served requests across users, against each user's max-min fair share
    /// of all that was served given what they asked (see [`jain_max_min`]).
    pub jain_requests: f64,
    /// The same for served tokens.
    pub jain_tokens: f64,
    /// Plain Jain's index of served requests across users, whatever they asked.
    pub jain_plain: f64,
    /// Per user: requests sent, and served.
    pub per_user: BTreeMap<String, (usize, usize)>,
    /// Times per class.
    pub classes: BTreeMap<Class, ClassReport>,
    /// The process's peak memory during the run, in MiB, when known.
    pub peak_memory_mib: Option<f64>,
    /// How long the run took, in real seconds.
    pub wall_s: f64,
    /// For the plots.
    pub series: Series,
}

impl TargetReport {
    /// The report of `data`, a run of `scenario` at `scale` against `target`.
    pub fn new(scenario: &Scenario, scale: Scale, target: &str, data: &RunData) -> TargetReport {
        let users = User::all(scenario);
        let scenario_ms = |d: Duration| scale.scenario(d) * 1000.0;
        let in_scenario = |d: Duration| Duration::from_secs_f64(scenario_ms(d) / 1000.0);
        let by_tag = attempts_by_tag(&data.attempts);

        let mut errors = BTreeMap::new();
        let mut served = 0;
        let mut demand = vec![(0.0, 0.0); users.len()];
        let mut got = vec![(0.0, 0.0); users.len()];
        let mut times: BTreeMap<Class, Times> = BTreeMap::new();
        for record in &data.records {
            let entry = times.entry(record.class).or_default();
            entry.0.issued += 1;
            if let Some(d) = demand.get_mut(record.user) {
                d.0 += 1.0;
                d.1 += record.tokens as f64;
            }
            match &record.error {
                Some(kind) => *errors.entry(kind.clone()).or_insert(0) += 1,
                None => {
                    served += 1;
                    entry.0.served += 1;
                    if let Some(g) = got.get_mut(record.user) {
                        g.0 += 1.0;
                        g.1 += record.tokens as f64;
                    }
                    entry
                        .1
                        .push(in_scenario(record.ended.saturating_sub(record.issued)));
                    let start = by_tag.get(record.tag.as_str()).and_then(|attempts| {
                        attempts
                            .iter()
                            .rev()
                            .find(|a| a.outcome == "served")
                            .or(attempts.last())
                    });
                    if let Some(attempt) = start {
                        entry
                            .2
                            .push(in_scenario(attempt.at.saturating_sub(record.issued)));
                    }
                    if let (true, Some(first)) = (record.stream, record.first_token) {
                        entry
                            .3
                            .push(in_scenario(first.saturating_sub(record.issued)));
                    }
                }
            }
        }
        let latency_s: BTreeMap<Class, Vec<f64>> = times
            .iter()
            .map(|(class, (_, latency, _, _))| {
                let mut seconds: Vec<f64> = latency.iter().map(Duration::as_secs_f64).collect();
                seconds.sort_by(f64::total_cmp);
                (*class, seconds)
            })
            .collect();
        let classes = times
            .into_iter()
            .map(|(class, (mut report, latency, wait, first))| {
                report.latency = Percentiles::of(latency);
                report.queue_wait = Percentiles::of(wait);
                report.first_token = Percentiles::of(first);
                (class, report)
            })
            .collect();

        let quota = scenario.quota;
        let window = scale.window();
        let admitted = WindowCounter::new(
            window,
            data.attempts
                .iter()
                .filter(|a| a.admitted())
                .map(|a| (a.at, a.tokens))
                .collect(),
        );
        let limits = (quota.rpm, quota.tpm);
        let step = window / 30;
        let shares: Vec<(f64, f64)> = scenario
            .saturated
            .iter()
            .filter_map(|&[from, to]| {
                admitted.mean_share(scale.real(from), scale.real(to), step, limits)
            })
            .collect();
        let mean = |pick: fn(&(f64, f64)) -> f64| {
            (!shares.is_empty()).then(|| shares.iter().map(pick).sum::<f64>() / shares.len() as f64)
        };
        let q_used_requests = mean(|s| s.0);
        let q_used_tokens = mean(|s| s.1);
        let q_used = q_used_requests
            .zip(q_used_tokens)
            .map(|(requests, tokens)| requests.max(tokens));

        let issued = data.records.len();
        let upstream_attempts = data.attempts.len();
        let upstream_429s = data
            .attempts
            .iter()
            .filter(|a| a.outcome == "throttled")
            .count();
        let mut upstream_429s_by_limit = BTreeMap::new();
        for attempt in data.attempts.iter().filter(|a| a.outcome == "throttled") {
            let limit = attempt.limit.clone().unwrap_or_default();
            *upstream_429s_by_limit.entry(limit).or_insert(0) += 1;
        }
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let requests: Vec<f64> = got.iter().map(|g| g.0).collect();
        let tokens: Vec<f64> = got.iter().map(|g| g.1).collect();
        let asked_requests: Vec<f64> = demand.iter().map(|d| d.0).collect();
        let asked_tokens: Vec<f64> = demand.iter().map(|d| d.1).collect();

        TargetReport {
            scenario: scenario.name.clone(),
            target: target.to_string(),
            scale: scale.factor(),
            issued,
            served,
            served_share: ratio(served as f64, issued as f64),
            errors,
            upstream_attempts,
            upstream_429s,
            upstream_429s_by_limit,
            attempts_per_served: ratio(upstream_attempts as f64, served as f64),
            q_used_requests,
            q_used_tokens,
            q_used,
            peak_per_window: admitted.peak(),
            jain_requests: jain_max_min(&requests, &asked_requests),
            jain_tokens: jain_max_min(&tokens, &asked_tokens),
            jain_plain: jain(&requests),
            per_user: users
                .iter()
                .map(|u| {
                    let (asked, got) = (demand[u.index].0, got[u.index].0);
                    (u.name.to_string(), (asked as usize, got as usize))
                })
                .collect(),
            classes,
            peak_memory_mib: None,
            wall_s: data.wall.as_secs_f64(),
            series: Series {
                latency_s,
                ..series(scenario, scale, data, &admitted)
            },
        }
    }
}

/// A class's counts, and its latencies, queue waits and times to first token.
type Times = (ClassReport, Vec<Duration>, Vec<Duration>, Vec<Duration>);

fn series(scenario: &Scenario, scale: Scale, data: &RunData, admitted: &WindowCounter) -> Series {
    let bin = scale.window() / 12;
    let end = data
        .attempts
        .last()
        .map_or(data.wall, |a| a.at.max(data.wall));
    let bins = (end.as_secs_f64() / bin.as_secs_f64()).ceil() as usize + 1;
    let mut throttled = vec![0; bins];
    for attempt in data.attempts.iter().filter(|a| a.outcome == "throttled") {
        let i = (attempt.at.as_secs_f64() / bin.as_secs_f64()) as usize;
        if let Some(count) = throttled.get_mut(i) {
            *count += 1;
        }
    }
    let quota = scenario.quota;
    let q_share = (1..=bins)
        .map(|i| {
            let (requests, tokens) = admitted.at(bin * i as u32);
            (requests as f64 / quota.rpm as f64).max(tokens as f64 / quota.tpm as f64)
        })
        .collect();
    Series {
        bin_s: scale.scenario(bin),
        q_share,
        throttled,
        waiting: data
            .samples
            .iter()
            .map(|s| (scale.scenario(s.at), s.waiting()))
            .collect(),
        latency_s: BTreeMap::new(),
    }
}

fn percent(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

fn seconds(ms: f64) -> String {
    match ms {
        ms if ms < 1.0 => "0 s".to_string(),
        ms if ms < 10_000.0 => format!("{:.2} s", ms / 1000.0),
        ms => format!("{:.0} s", ms / 1000.0),
    }
}

/// The errors, largest first: `12 user_limit, 3 timeout`, or `—`.
fn errors(report: &TargetReport) -> String {
    let mut kinds: Vec<(&String, &usize)> = report.errors.iter().collect();
    kinds.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let text: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
    match text.is_empty() {
        true => "—".to_string(),
        false => text.join(", "),
    }
}

/// The 429s with the limits they hit: `12 (10 requests, 2 concurrency)`, or `0`.
fn throttled(report: &TargetReport) -> String {
    if report.upstream_429s == 0 {
        return "0".to_string();
    }
    let limits: Vec<String> = report
        .upstream_429s_by_limit
        .iter()
        .map(|(limit, n)| format!("{n} {limit}"))
        .collect();
    format!("{} ({})", report.upstream_429s, limits.join(", "))
}

fn class_cell(report: &TargetReport, pick: impl Fn(&ClassReport) -> String) -> String {
    let cells: Vec<String> = report
        .classes
        .iter()
        .filter(|(_, c)| c.served > 0)
        .map(|(class, c)| {
            let name = match (report.classes.len(), class) {
                (1, _) => String::new(),
                (_, Class::Interactive) => "i ".to_string(),
                (_, Class::Batch) => "b ".to_string(),
            };
            format!("{name}{}", pick(c))
        })
        .collect();
    match cells.is_empty() {
        true => "—".to_string(),
        false => cells.join(" · "),
    }
}

/// The Markdown table of `reports`: one row per target and scenario. Times in scenario
/// seconds; with two classes, `i` is interactive and `b` batch.
pub fn markdown(reports: &[TargetReport]) -> String {
    let mut out = String::from(
        "| scenario | target | served | errors to users | upstream 429s | attempts / served | Q used | Jain req / tok | latency p50 / p99 | queue wait p99 | first token p50 | peak MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let _ = writeln!(
            out,
            "| {} | {} | {} of {} ({}) | {} | {} | {:.2} | {} | {:.2} / {:.2} | {} | {} | {} | {} |",
            r.scenario,
            r.target,
            r.served,
            r.issued,
            percent(r.served_share),
            errors(r),
            throttled(r),
            r.attempts_per_served,
            r.q_used.map_or("—".to_string(), percent),
            r.jain_requests,
            r.jain_tokens,
            class_cell(r, |c| format!(
                "{} / {}",
                seconds(c.latency.p50_ms),
                seconds(c.latency.p99_ms)
            )),
            class_cell(r, |c| seconds(c.queue_wait.p99_ms)),
            class_cell(r, |c| match c.first_token.count {
                0 => "—".to_string(),
                _ => seconds(c.first_token.p50_ms),
            }),
            r.peak_memory_mib
                .map_or("—".to_string(), |m| format!("{m:.0}")),
        );
    }
    out
}

/// A target the issue sets for `ours` and `gateway`, and whether a report meets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// The report's scenario.
    pub scenario: String,
    /// The report's target.
    pub target: String,
    /// What is checked.
    pub what: String,
    /// The figure.
    pub value: f64,
    /// Whether it meets the target.
    pub met: bool,
}

/// The share of Q that `ours` and `gateway` should use wherever demand exceeds it.
pub const Q_USED_TARGET: f64 = 0.95;

/// The targets a report of `ours` or `gateway` should meet: no upstream 429; at least
/// [`Q_USED_TARGET`] of Q used where demand exceeds it; at most 1.05 upstream attempts per served
/// request in `storm` and `flaky`; Jain's index (max-min) at least 0.95 in `heavy-user`; in
/// `priority`, the interactive p99 queue wait below the batch p50.
pub fn checks(report: &TargetReport) -> Vec<Check> {
    checks_with(report, Q_USED_TARGET)
}

/// [`checks`] with another least share of Q used, for runs whose pace a loaded machine can
/// hold back (the tiny scenarios of the tests).
pub fn checks_with(report: &TargetReport, q_used_target: f64) -> Vec<Check> {
    let check = |what: &str, value: f64, met: bool| Check {
        scenario: report.scenario.clone(),
        target: report.target.clone(),
        what: what.to_string(),
        value,
        met,
    };
    let mut checks = vec![check(
        "no upstream 429",
        report.upstream_429s as f64,
        report.upstream_429s == 0,
    )];
    if let Some(used) = report.q_used {
        checks.push(check(
            &format!(
                "Q used >= {:.0}% under excess demand",
                q_used_target * 100.0
            ),
            used,
            used >= q_used_target,
        ));
    }
    if matches!(report.scenario.as_str(), "storm" | "flaky") {
        let n = report.attempts_per_served;
        checks.push(check("attempts per served <= 1.05", n, n <= 1.05));
    }
    if report.scenario == "heavy-user" {
        let j = report.jain_requests;
        checks.push(check("Jain (max-min) >= 0.95", j, j >= 0.95));
    }
    if let (Some(interactive), Some(batch)) = (
        report.classes.get(&Class::Interactive),
        report.classes.get(&Class::Batch),
    ) {
        let (i, b) = (interactive.queue_wait.p99_ms, batch.queue_wait.p50_ms);
        if report.scenario == "priority" {
            checks.push(check(
                "interactive p99 wait < batch p50 wait (ms)",
                i,
                i < b,
            ));
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::run::{Attempt, Record, Sample};

    fn scenario() -> Scenario {
        Scenario::parse(
            r#"
            name = "priority"
            duration_s = 120
            saturated = [[0, 120]]
            [quota]
            rpm = 10
            tpm = 1000
            concurrency = 2
            [[users]]
            name = "a"
            arrival = { kind = "poisson", per_minute = 5 }
            prompt_tokens = [10, 10]
            max_tokens = [10, 10]
            [[users]]
            name = "b"
            class = "batch"
            arrival = { kind = "poisson", per_minute = 5 }
            prompt_tokens = [10, 10]
            max_tokens = [10, 10]
            "#,
        )
        .unwrap()
    }

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn a_report_from_records_and_attempts() {
        let scenario = scenario();
        let record = |user, tag: &str, class, issued, ended, error: Option<&str>| Record {
            user,
            tag: tag.into(),
            class,
            stream: class == Class::Interactive,
            issued: s(issued),
            ended: s(ended),
            first_token: error.is_none().then(|| s(issued + 0.5)),
            error: error.map(str::to_string),
            tokens: 20,
        };
        let attempt = |at, tag: &str, outcome: &str| Attempt {
            at: s(at),
            tag: tag.into(),
            outcome: outcome.into(),
            tokens: 20,
            limit: (outcome == "throttled").then(|| "requests".to_string()),
        };
        let mut attempts = vec![
            attempt(0.5, "a#0", "throttled"),
            attempt(1.5, "a#0", "served"),
        ];
        // The upstream admits 10 requests in every minute from 0 to 120 s.
        for i in 0..20 {
            attempts.push(attempt(f64::from(i) * 6.0 + 3.0, "other", "served"));
        }
        attempts.push(attempt(10.0, "b#0", "served"));
        let data = RunData {
            records: vec![
                record(0, "a#0", Class::Interactive, 0.0, 2.0, None),
                record(1, "b#0", Class::Batch, 1.0, 11.0, None),
                record(1, "b#1", Class::Batch, 2.0, 62.0, Some("timeout")),
            ],
            attempts,
            samples: vec![Sample {
                at: s(1.0),
                outstanding: 3,
                upstream_in_flight: 1,
                issued: 3,
                served: 0,
            }],
            wall: s(120.0),
        };
        let report = TargetReport::new(&scenario, Scale::REAL, "ours", &data);
        assert_eq!((report.issued, report.served), (3, 2));
        assert_eq!(report.errors["timeout"], 1);
        assert_eq!(report.upstream_429s, 1);
        assert_eq!(report.upstream_429s_by_limit["requests"], 1);
        assert_eq!(report.upstream_attempts, 23);
        let interactive = &report.classes[&Class::Interactive];
        assert_eq!(
            interactive.queue_wait.p50_ms, 1500.0,
            "the served attempt's start"
        );
        assert_eq!(interactive.first_token.p50_ms, 500.0);
        assert_eq!(report.classes[&Class::Batch].queue_wait.p50_ms, 9000.0);
        assert_eq!(report.classes[&Class::Batch].first_token.count, 0);
        // One window fits from 60 s to 120 s; each holds 10 or 11 of the 10 allowed.
        let used = report.q_used_requests.unwrap();
        assert!((1.0..=1.1).contains(&used), "{used}");
        assert_eq!(report.q_used, report.q_used_requests);
        assert_eq!(report.series.waiting, vec![(1.0, 2)]);
        assert_eq!(report.series.throttled[0], 1);
        // a asked 1 and got it; b asked 2 and got 1, of 2 served: fair.
        assert_eq!(report.jain_requests, 1.0);
        let table = markdown(std::slice::from_ref(&report));
        assert!(
            table.contains("| priority | ours | 2 of 3 (67%) | 1 timeout | 1 (1 requests) |"),
            "{table}"
        );
        let checks = checks(&report);
        assert!(!checks[0].met, "a 429");
        assert!(checks
            .iter()
            .any(|c| c.what.contains("interactive") && c.met));
    }
}
