//! Scenarios: who sends what, when, against which quota — read from small TOML files.
//!
//! Every time in a scenario is scenario time, in seconds; a run divides it by its [`Scale`].
//!
//! ```toml
//! name = "steady"
//! description = "demand at 0.8 Q, Poisson arrivals"
//! duration_s = 180        # how long users send
//! seed = 1                # the same seed, the same workload
//! patience_s = 60         # a user gives up on a request after this (default 60)
//! saturated = [[0, 90]]   # where demand exceeds Q: the share of Q used is measured there
//!
//! [quota]                 # Q: what the upstream allows per minute, and streams at once
//! rpm = 240
//! tpm = 60000
//! concurrency = 8
//!
//! [upstream]              # the mock's speed and faults (all optional)
//! time_to_first_token_ms = 300
//! tokens_per_second = 40
//! error_503 = 0.05        # share of admitted requests answered 503
//! outages = [{ at_s = 60, for_s = 10 }]
//!
//! [edge]                  # optional: per-user limits before the queue
//! per_user_concurrency = 4
//! per_user_rpm = 30
//!
//! [[phases]]              # optional: open-loop rates multiplied by `demand` until `until_s`
//! until_s = 90
//! demand = 3.0
//!
//! [[users]]               # a group of identical users
//! name = "light"
//! count = 10
//! class = "interactive"   # or "batch" (a lower queue level); streams by default, batch not
//! arrival = { kind = "poisson", per_minute = 12 }   # per user
//! # arrival = { kind = "bursts", size = 5, every_s = 30 }
//! # arrival = { kind = "closed", think_s = 5, together = true }
//! prompt_tokens = [50, 250]   # drawn uniformly
//! max_tokens = [16, 64]
//! ```
//!
//! A field of the wrong type or an unknown one is an error with its line; a value out of its
//! range is an error naming the field (`users[1].arrival.per_minute: ...`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A scenario, as its file says it, checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name, for reports.
    pub name: String,
    /// What it shows.
    #[serde(default)]
    pub description: String,
    /// How long users send, in scenario seconds.
    pub duration_s: f64,
    /// The seed of every random draw: arrivals, prompts, replies' lengths, the mock's faults.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// How long a user waits for a request before giving up, in scenario seconds.
    #[serde(default = "default_patience")]
    pub patience_s: f64,
    /// The intervals `[from_s, to_s]` in which demand exceeds the quota.
    #[serde(default)]
    pub saturated: Vec<[f64; 2]>,
    /// The upstream's quota, Q.
    pub quota: Quota,
    /// The mock upstream's speed and faults.
    #[serde(default)]
    pub upstream: UpstreamSpec,
    /// Per-user limits at the edge, if any.
    #[serde(default)]
    pub edge: Option<Edge>,
    /// Multipliers of the open-loop rates over time.
    #[serde(default)]
    pub phases: Vec<Phase>,
    /// The users, by groups.
    pub users: Vec<Group>,
}

fn default_seed() -> u64 {
    1
}

fn default_patience() -> f64 {
    60.0
}

/// The upstream's quota, Q.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Requests per minute.
    pub rpm: u64,
    /// Tokens (prompt and reply) per minute.
    pub tpm: u64,
    /// Streams at once.
    pub concurrency: usize,
}

/// The mock upstream's behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    /// The wait before a reply's first token, in scenario milliseconds.
    #[serde(default = "default_ttft")]
    pub time_to_first_token_ms: u64,
    /// Tokens streamed per scenario second.
    #[serde(default = "default_tps")]
    pub tokens_per_second: f64,
    /// The share of admitted requests answered 503.
    #[serde(default)]
    pub error_503: f64,
    /// When the upstream is down: stopped, connections closed, then started again on the same
    /// address.
    #[serde(default)]
    pub outages: Vec<Outage>,
}

fn default_ttft() -> u64 {
    300
}

fn default_tps() -> f64 {
    40.0
}

impl Default for UpstreamSpec {
    fn default() -> Self {
        UpstreamSpec {
            time_to_first_token_ms: default_ttft(),
            tokens_per_second: default_tps(),
            error_503: 0.0,
            outages: Vec::new(),
        }
    }
}

/// An interval in which the upstream is down.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// When it goes down, in scenario seconds.
    pub at_s: f64,
    /// For how long.
    pub for_s: f64,
}

/// Per-user limits at the edge, before the queue.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    /// Requests one user may have in flight; the excess is refused at once.
    pub per_user_concurrency: Option<usize>,
    /// Requests one user may start per minute; the excess is refused at once.
    pub per_user_rpm: Option<u64>,
}

/// A phase of the run: open-loop rates are multiplied by `demand` until `until_s`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Its end, in scenario seconds.
    pub until_s: f64,
    /// The multiplier.
    pub demand: f64,
}

/// A user's class: its priority level, and whether it streams by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Somebody waits for it: the first level, streamed.
    Interactive,
    /// Background work: a lower level, not streamed.
    Batch,
}

impl Class {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Interactive => "interactive",
            Class::Batch => "batch",
        }
    }

    /// Its queue level (1 is the first).
    pub fn level(self) -> u8 {
        match self {
            Class::Interactive => 1,
            Class::Batch => 3,
        }
    }
}

/// How a user sends.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Arrival {
    /// Open loop: requests at random times, `per_minute` on average (times the phase's demand).
    Poisson {
        /// Requests per scenario minute.
        per_minute: f64,
    },
    /// Open loop: `size` requests at once every `every_s`, at a phase of its own for each user.
    Bursts {
        /// Requests per burst.
        size: u32,
        /// Scenario seconds between bursts.
        every_s: f64,
    },
    /// Closed loop: one request at a time, then a pause of `think_s` on average (exponential).
    /// With `together`, every such user sends its first request at the same instant, the start;
    /// otherwise at a random time within the first `think_s`.
    Closed {
        /// The mean pause, in scenario seconds.
        think_s: f64,
        /// Whether all start at once.
        #[serde(default)]
        together: bool,
    },
}

/// A group of identical users.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// The group's name; its users are `name-00`, `name-01`, ... (or `name` alone).
    pub name: String,
    /// How many users.
    #[serde(default = "one")]
    pub count: usize,
    /// Their class.
    #[serde(default = "interactive")]
    pub class: Class,
    /// Whether their requests stream; by default interactive ones do, batch ones do not.
    #[serde(default)]
    pub stream: Option<bool>,
    /// How they send.
    pub arrival: Arrival,
    /// The range of their prompts' tokens, drawn uniformly.
    pub prompt_tokens: [u64; 2],
    /// The range of the longest replies they ask for (`max_tokens`), drawn uniformly. The mock's
    /// replies are 20 to 60 tokens before that cap.
    pub max_tokens: [u64; 2],
}

fn one() -> usize {
    1
}

fn interactive() -> Class {
    Class::Interactive
}

impl Group {
    /// Whether the group's requests stream.
    pub fn streams(&self) -> bool {
        self.stream.unwrap_or(self.class == Class::Interactive)
    }
}

/// A scenario that cannot be used: its field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError {
    field: String,
    message: String,
}

impl ScenarioError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ScenarioError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The field at fault (`users[1].arrival.per_minute`), or `""` for a file that is not
    /// TOML of the expected shape (the message then says where).
    pub fn field(&self) -> &str {
        &self.field
    }
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field.is_empty() {
            true => write!(f, "{}", self.message),
            false => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

impl std::error::Error for ScenarioError {}

/// The longest scenario time accepted anywhere: a day.
const MAX_SECONDS: f64 = 86_400.0;

fn positive(field: &str, value: f64) -> Result<(), ScenarioError> {
    if value.is_finite() && value > 0.0 && value <= MAX_SECONDS {
        return Ok(());
    }
    Err(ScenarioError::new(
        field,
        format!("must be a number of seconds above 0 and at most {MAX_SECONDS}, not {value}"),
    ))
}

fn not_negative(field: &str, value: f64) -> Result<(), ScenarioError> {
    if value.is_finite() && (0.0..=MAX_SECONDS).contains(&value) {
        return Ok(());
    }
    Err(ScenarioError::new(
        field,
        format!("must be a number from 0 to {MAX_SECONDS}, not {value}"),
    ))
}

fn range(field: &str, [low, high]: [u64; 2], min: u64, max: u64) -> Result<(), ScenarioError> {
    if min <= low && low <= high && high <= max {
        return Ok(());
    }
    Err(ScenarioError::new(
        field,
        format!("must be [low, high] with {min} <= low <= high <= {max}, not [{low}, {high}]"),
    ))
}

impl Scenario {
    /// Reads and checks a scenario in TOML.
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|err| {
            let message = err.to_string();
            ScenarioError::new("", message.trim_end().to_string())
        })?;
        scenario.check()?;
        Ok(scenario)
    }

    /// Checks every value's range.
    pub fn check(&self) -> Result<(), ScenarioError> {
        if self.name.trim().is_empty() {
            return Err(ScenarioError::new("name", "must not be empty"));
        }
        positive("duration_s", self.duration_s)?;
        positive("patience_s", self.patience_s)?;
        for (i, &[from, to]) in self.saturated.iter().enumerate() {
            let field = format!("saturated[{i}]");
            not_negative(&field, from)?;
            not_negative(&field, to)?;
            if from >= to {
                return Err(ScenarioError::new(
                    field,
                    "must be [from_s, to_s] with from_s < to_s",
                ));
            }
        }
        let quota = &self.quota;
        for (name, value) in [("quota.rpm", quota.rpm), ("quota.tpm", quota.tpm)] {
            if value == 0 {
                return Err(ScenarioError::new(name, "must be at least 1"));
            }
        }
        if !(1..=100_000).contains(&quota.concurrency) {
            return Err(ScenarioError::new(
                "quota.concurrency",
                format!("must be from 1 to 100000, not {}", quota.concurrency),
            ));
        }
        let upstream = &self.upstream;
        if !(upstream.tokens_per_second.is_finite() && upstream.tokens_per_second > 0.0) {
            return Err(ScenarioError::new(
                "upstream.tokens_per_second",
                format!("must be above 0, not {}", upstream.tokens_per_second),
            ));
        }
        if upstream.time_to_first_token_ms > 3_600_000 {
            return Err(ScenarioError::new(
                "upstream.time_to_first_token_ms",
                "must be at most an hour",
            ));
        }
        if !(0.0..=1.0).contains(&upstream.error_503) {
            return Err(ScenarioError::new(
                "upstream.error_503",
                format!(
                    "must be a share from 0.0 to 1.0, not {}",
                    upstream.error_503
                ),
            ));
        }
        for (i, outage) in upstream.outages.iter().enumerate() {
            not_negative(&format!("upstream.outages[{i}].at_s"), outage.at_s)?;
            positive(&format!("upstream.outages[{i}].for_s"), outage.for_s)?;
        }
        if let Some(edge) = &self.edge {
            if edge.per_user_concurrency == Some(0) {
                return Err(ScenarioError::new(
                    "edge.per_user_concurrency",
                    "must be at least 1",
                ));
            }
            if edge.per_user_rpm == Some(0) {
                return Err(ScenarioError::new(
                    "edge.per_user_rpm",
                    "must be at least 1",
                ));
            }
        }
        let mut previous = 0.0;
        for (i, phase) in self.phases.iter().enumerate() {
            positive(&format!("phases[{i}].until_s"), phase.until_s)?;
            if phase.until_s <= previous {
                return Err(ScenarioError::new(
                    format!("phases[{i}].until_s"),
                    "must be later than the phase before",
                ));
            }
            previous = phase.until_s;
            not_negative(&format!("phases[{i}].demand"), phase.demand)?;
        }
        if self.users.is_empty() {
            return Err(ScenarioError::new("users", "must list at least one group"));
        }
        for (i, group) in self.users.iter().enumerate() {
            let field = |name: &str| format!("users[{i}].{name}");
            if group.name.trim().is_empty() {
                return Err(ScenarioError::new(field("name"), "must not be empty"));
            }
            if !(1..=10_000).contains(&group.count) {
                return Err(ScenarioError::new(
                    field("count"),
                    format!("must be from 1 to 10000, not {}", group.count),
                ));
            }
            range(&field("prompt_tokens"), group.prompt_tokens, 1, 100_000)?;
            range(&field("max_tokens"), group.max_tokens, 1, 100_000)?;
            match group.arrival {
                Arrival::Poisson { per_minute } => {
                    if !(per_minute.is_finite() && per_minute > 0.0 && per_minute <= 1e6) {
                        return Err(ScenarioError::new(
                            field("arrival.per_minute"),
                            format!("must be above 0 and at most 1000000, not {per_minute}"),
                        ));
                    }
                }
                Arrival::Bursts { size, every_s } => {
                    if !(1..=100_000).contains(&size) {
                        return Err(ScenarioError::new(
                            field("arrival.size"),
                            format!("must be from 1 to 100000, not {size}"),
                        ));
                    }
                    positive(&field("arrival.every_s"), every_s)?;
                }
                Arrival::Closed { think_s, .. } => {
                    not_negative(&field("arrival.think_s"), think_s)?;
                }
            }
        }
        Ok(())
    }

    /// The open-loop demand multiplier at scenario time `t`: the phase's, or 1 after the last.
    pub fn demand_at(&self, t: f64) -> f64 {
        self.phases
            .iter()
            .find(|phase| t < phase.until_s)
            .map_or(1.0, |phase| phase.demand)
    }
}

/// How much faster than scenario time a run goes: scenario times are divided by it, and so is
/// the upstream's minute (the mock's window, and the layers' windows with it). Q's numbers stay
/// the same per window, so the upstream allows `scale` times as much per real second, and the
/// users ask `scale` times as often: the same workload, played faster.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scale(f64);

impl Scale {
    /// Real time.
    pub const REAL: Scale = Scale(1.0);

    /// A factor of at least 1 and at most 1000.
    pub fn new(factor: f64) -> Result<Scale, ScenarioError> {
        if factor.is_finite() && (1.0..=1000.0).contains(&factor) {
            return Ok(Scale(factor));
        }
        Err(ScenarioError::new(
            "--scale",
            format!("must be a factor from 1 to 1000, not {factor}"),
        ))
    }

    /// The factor.
    pub fn factor(self) -> f64 {
        self.0
    }

    /// The real duration of `seconds` of scenario time.
    pub fn real(self, seconds: f64) -> Duration {
        Duration::try_from_secs_f64(seconds.max(0.0) / self.0).unwrap_or(Duration::MAX)
    }

    /// The real duration of `d` of scenario time.
    pub fn real_duration(self, d: Duration) -> Duration {
        self.real(d.as_secs_f64())
    }

    /// The scenario time, in seconds, of the real duration `d`.
    pub fn scenario(self, d: Duration) -> f64 {
        d.as_secs_f64() * self.0
    }

    /// The upstream's minute, in real time.
    pub fn window(self) -> Duration {
        self.real(60.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEADY: &str = r#"
        name = "steady"
        duration_s = 120
        saturated = [[0, 60]]

        [quota]
        rpm = 240
        tpm = 60000
        concurrency = 8

        [[phases]]
        until_s = 60
        demand = 3

        [[users]]
        name = "light"
        count = 10
        arrival = { kind = "poisson", per_minute = 12 }
        prompt_tokens = [50, 250]
        max_tokens = [16, 64]

        [[users]]
        name = "nightly"
        class = "batch"
        arrival = { kind = "closed", think_s = 5, together = true }
        prompt_tokens = [400, 800]
        max_tokens = [60, 60]
    "#;

    #[test]
    fn a_scenario_with_its_defaults() {
        let scenario = Scenario::parse(STEADY).unwrap();
        assert_eq!(scenario.seed, 1);
        assert_eq!(scenario.patience_s, 60.0);
        assert_eq!(scenario.upstream, UpstreamSpec::default());
        assert_eq!(scenario.edge, None);
        assert_eq!(scenario.users[0].count, 10);
        assert_eq!(scenario.users[0].class, Class::Interactive);
        assert!(scenario.users[0].streams());
        assert_eq!(scenario.users[1].count, 1);
        assert!(
            !scenario.users[1].streams(),
            "batch work is not streamed by default"
        );
        assert_eq!(
            scenario.users[1].arrival,
            Arrival::Closed {
                think_s: 5.0,
                together: true
            }
        );
        assert_eq!(scenario.demand_at(0.0), 3.0);
        assert_eq!(scenario.demand_at(60.0), 1.0);
    }

    fn error_of(text: &str) -> ScenarioError {
        Scenario::parse(text).unwrap_err()
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (
                "per_minute = 12",
                "per_minute = -3",
                "users[0].arrival.per_minute",
            ),
            ("duration_s = 120", "duration_s = 0", "duration_s"),
            ("rpm = 240", "rpm = 0", "quota.rpm"),
            ("concurrency = 8", "concurrency = 0", "quota.concurrency"),
            (
                "prompt_tokens = [50, 250]",
                "prompt_tokens = [250, 50]",
                "users[0].prompt_tokens",
            ),
            ("count = 10", "count = 0", "users[0].count"),
            (
                "saturated = [[0, 60]]",
                "saturated = [[60, 0]]",
                "saturated[0]",
            ),
            ("demand = 3", "demand = -1", "phases[0].demand"),
            ("think_s = 5", "think_s = inf", "users[1].arrival.think_s"),
        ];
        for (from, to, field) in cases {
            let text = STEADY.replacen(from, to, 1);
            assert_ne!(text, STEADY, "{from}");
            let error = error_of(&text);
            assert_eq!(error.field(), field, "{error}");
            assert!(error.to_string().starts_with(field), "{error}");
        }
    }

    #[test]
    fn bad_shapes_say_where() {
        let error = error_of(&STEADY.replacen("rpm = 240", "rpm = \"many\"", 1));
        assert_eq!(error.field(), "");
        let text = error.to_string();
        assert!(text.contains("line 7") && text.contains("rpm"), "{text}");

        let error = error_of(&STEADY.replacen("rpm = 240", "rpm = 240\nburst = 3", 1));
        assert!(error.to_string().contains("burst"), "{error}");

        let error = error_of(&STEADY.replacen("\"poisson\"", "\"sometimes\"", 1));
        assert!(error.to_string().contains("sometimes"), "{error}");

        let error = error_of(&STEADY.replacen("[quota]", "[quotas]", 1));
        assert!(error.to_string().contains("quota"), "{error}");
        assert!(error_of("not toml at all").to_string().contains("line 1"));
    }

    #[test]
    fn scale_divides_scenario_time() {
        let scale = Scale::new(10.0).unwrap();
        assert_eq!(scale.window(), Duration::from_secs(6));
        assert_eq!(scale.real(90.0), Duration::from_secs(9));
        assert_eq!(scale.scenario(Duration::from_millis(1500)), 15.0);
        assert_eq!(Scale::REAL.window(), Duration::from_secs(60));
        for bad in [0.5, 0.0, f64::NAN, 1e9] {
            assert_eq!(Scale::new(bad).unwrap_err().field(), "--scale");
        }
    }
}
