//! The load harness's reusable parts: scenarios and their workloads, the in-process targets, a
//! runner that plays a workload against one of them with the mock provider as the upstream,
//! and the report — served share, errors, what the upstream saw, the share of its quota used,
//! fairness, times per class. `cargo run --release --example loadgen` drives them; see the
//! README's "Load harness".
//!
//! ```no_run
//! # async fn run() -> Result<(), tower::BoxError> {
//! use std::sync::Arc;
//! use tower_llm_queue_servers::loadgen::{self, targets, MockUpstream, Scale, Scenario};
//! use tower_llm_queue_servers::upstream::UpstreamClient;
//!
//! let scenario = Scenario::parse(&std::fs::read_to_string("steady.toml")?)?;
//! let scale = Scale::new(10.0)?;
//! let upstream = Arc::new(MockUpstream::start(loadgen::mock_config(&scenario, scale)).await?);
//! let client = UpstreamClient::new(upstream.base_url().parse()?, None)?;
//! let (llm, _handles) = targets::ours(client, &loadgen::target_settings(&scenario, scale));
//! let data = loadgen::run(&scenario, scale, upstream, targets::in_process(llm), |_| {}).await;
//! let report = loadgen::TargetReport::new(&scenario, scale, "ours", &data);
//! println!("{}", loadgen::markdown(&[report]));
//! # Ok(()) }
//! ```

mod fairness;
pub mod memory;
mod outcome;
mod report;
mod run;
mod scenario;
mod stats;
pub mod targets;
mod window;
mod workload;

pub use self::fairness::{jain, jain_max_min, max_min};
pub use self::outcome::{error_kind, read_reply, status_kind, Outcome};
pub use self::report::{
    checks, checks_with, markdown, Check, ClassReport, Series, TargetReport, Q_USED_TARGET,
};
pub use self::run::{
    attempts_by_tag, mock_config, run, Attempt, MockUpstream, Record, RunData, Sample,
};
pub use self::scenario::{
    Arrival, Class, Edge, Group, Outage, Phase, Quota, Scale, Scenario, ScenarioError, UpstreamSpec,
};
pub use self::stats::{percentile, Percentiles};
pub use self::targets::TargetSettings;
pub use self::window::WindowCounter;
pub use self::workload::{exponential, Ask, Asks, User};

/// What the targets need of `scenario` at `scale`. The mean tokens of a request are those of
/// the workload as it will be sent: each open-loop user's scheduled requests, and for a
/// closed-loop user as many as fit in the run with its pauses.
pub fn target_settings(scenario: &Scenario, scale: Scale) -> TargetSettings {
    let (mut tokens, mut n) = (0u64, 0u64);
    for user in User::all(scenario) {
        let count = match user.think() {
            Some((think_s, _)) => (scenario.duration_s / think_s.max(1.0)).ceil() as usize,
            None => user.arrivals(scenario).len(),
        };
        for ask in user.asks(scenario.seed).take(count) {
            tokens += ask.tokens();
            n += 1;
        }
    }
    TargetSettings {
        scale,
        quota: scenario.quota,
        patience_s: scenario.patience_s,
        mean_tokens: tokens as f64 / n.max(1) as f64,
        edge: scenario.edge,
    }
}
