//! The mock's settings and how they are read from the environment.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

pub use crate::config::ConfigError;
use crate::config::Env;

/// How the mock behaves: its limits, its speed and the faults it injects.
///
/// The default has no limits and no faults, streams 50 tokens per second and waits 200 ms for
/// the first token. Its per-minute limits count over a sliding window of 60 seconds; `window`
/// makes it shorter or longer (a load test that runs its clock faster shortens it).
///
/// ```
/// use std::time::Duration;
/// use tower_llm_queue_servers::mock::{Faults, MockConfig};
///
/// let config = MockConfig {
///     rpm: Some(60),
///     concurrency: Some(4),
///     faults: Faults { error_503: 0.1, ..Faults::default() },
///     ..MockConfig::default()
/// };
/// assert_eq!(config.time_to_first_token, Duration::from_millis(200));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct MockConfig {
    /// Requests admitted in any sliding `window` (60 seconds by default); `None` for no limit.
    pub rpm: Option<u64>,
    /// Tokens (prompt and completion) admitted in any sliding `window`; `None` for no limit.
    pub tpm: Option<u64>,
    /// The length of the sliding window of `rpm` and `tpm`: 60 seconds by default, at least a
    /// millisecond. The wait a refusal by the concurrency limit suggests is a sixtieth of it.
    pub window: Duration,
    /// Requests in progress at once (a stream counts until it ends or its client goes away);
    /// `None` for no limit.
    pub concurrency: Option<usize>,
    /// How fast a reply is produced, in tokens per second. Zero, a negative number, NaN or
    /// infinity produce every token at once, as soon as the first one is due.
    pub tokens_per_second: f64,
    /// The wait before the first token of every reply.
    pub time_to_first_token: Duration,
    /// The faults injected into admitted requests.
    pub faults: Faults,
    /// The seed of the fault generator: the same seed gives the same faults for the same
    /// sequence of admitted requests.
    pub seed: u64,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            rpm: None,
            tpm: None,
            window: super::limits::WINDOW,
            concurrency: None,
            tokens_per_second: 50.0,
            time_to_first_token: Duration::from_millis(200),
            faults: Faults::default(),
            seed: 0,
        }
    }
}

/// Faults injected into admitted requests, each as a share of them, from 0.0 to 1.0.
///
/// Each admitted request draws two numbers from the seeded generator, whatever the shares: the
/// first picks at most one failure, in the order `error_500`, `error_503`, `overloaded_529`,
/// `cut_stream`, `error_event` (each takes the next slice of `0.0..1.0` of its size, so shares
/// adding up to more than 1.0 leave the later ones less than asked); the second decides on added
/// latency, independently of the failure (a request answered 500, 503 or 529 is answered at
/// once, without it). Throttled and malformed requests draw nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Faults {
    /// Answered at once with 500 and a `server_error` body.
    pub error_500: f64,
    /// Answered at once with 503 and a `server_error` body.
    pub error_503: f64,
    /// Answered at once with 529 and Anthropic's `overloaded_error` body.
    pub overloaded_529: f64,
    /// Wait `latency_amount` more before the first token.
    pub latency: f64,
    /// The latency added by the `latency` fault (default 2 s).
    pub latency_amount: Duration,
    /// The reply stops after half of its tokens and the connection is closed, without
    /// `[DONE]` or Ollama's `done` line (a non-streamed reply is cut halfway through its JSON).
    pub cut_stream: f64,
    /// After half of its tokens, a 200 stream carries an error (`data: {"error": ...}` or
    /// Ollama's `{"error": ...}` line) and ends. A non-streamed request is answered 500 at the
    /// time its half-way token would have been produced.
    pub error_event: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            error_500: 0.0,
            error_503: 0.0,
            overloaded_529: 0.0,
            latency: 0.0,
            latency_amount: Duration::from_secs(2),
            cut_stream: 0.0,
            error_event: 0.0,
        }
    }
}

/// A variable of the environment that the mock reads, for help texts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnvVar {
    /// Its name.
    pub name: &'static str,
    /// Its default, as it would be written.
    pub default: &'static str,
    /// What it sets.
    pub meaning: &'static str,
}

/// Every variable that [`MockConfig::from_env`] and [`addr_from_env`] read, with its default.
/// An unset or empty variable takes its default.
pub const ENV_VARS: &[EnvVar] = &[
    EnvVar {
        name: "MOCK_BIND",
        default: "127.0.0.1",
        meaning: "address to listen on (the standalone server)",
    },
    EnvVar {
        name: "MOCK_PORT",
        default: "8089",
        meaning: "port to listen on, 0 for any free one (the standalone server)",
    },
    EnvVar {
        name: "MOCK_RPM",
        default: "unset",
        meaning: "requests per sliding minute, at least 1; unset for no limit",
    },
    EnvVar {
        name: "MOCK_TPM",
        default: "unset",
        meaning: "tokens (prompt + completion) per sliding minute, at least 1; unset for no limit",
    },
    EnvVar {
        name: "MOCK_WINDOW_MS",
        default: "60000",
        meaning: "the sliding window of MOCK_RPM and MOCK_TPM, in milliseconds, at least 1",
    },
    EnvVar {
        name: "MOCK_CONCURRENCY",
        default: "unset",
        meaning: "requests in progress at once, at least 1; unset for no limit",
    },
    EnvVar {
        name: "MOCK_TOKENS_PER_SECOND",
        default: "50",
        meaning: "streaming speed; 0 or inf for the whole reply at once",
    },
    EnvVar {
        name: "MOCK_TTFT_MS",
        default: "200",
        meaning: "time to first token, in milliseconds",
    },
    EnvVar {
        name: "MOCK_FAULT_500",
        default: "0",
        meaning: "share of requests answered 500 (0.0 to 1.0)",
    },
    EnvVar {
        name: "MOCK_FAULT_503",
        default: "0",
        meaning: "share of requests answered 503 (0.0 to 1.0)",
    },
    EnvVar {
        name: "MOCK_FAULT_529",
        default: "0",
        meaning: "share of requests answered 529 overloaded (0.0 to 1.0)",
    },
    EnvVar {
        name: "MOCK_FAULT_LATENCY",
        default: "0",
        meaning: "share of requests with added latency before the first token (0.0 to 1.0)",
    },
    EnvVar {
        name: "MOCK_LATENCY_MS",
        default: "2000",
        meaning: "the added latency, in milliseconds",
    },
    EnvVar {
        name: "MOCK_FAULT_CUT",
        default: "0",
        meaning: "share of replies cut halfway, connection closed (0.0 to 1.0)",
    },
    EnvVar {
        name: "MOCK_FAULT_ERROR_EVENT",
        default: "0",
        meaning: "share of streams with an error event halfway (0.0 to 1.0)",
    },
    EnvVar {
        name: "MOCK_SEED",
        default: "0",
        meaning: "seed of the fault generator",
    },
];

impl MockConfig {
    /// Reads the configuration from the process environment (see [`ENV_VARS`]). Unset or
    /// empty variables take their defaults; any other value that is not a number in its
    /// range is an error naming the variable.
    pub fn from_env() -> Result<MockConfig, ConfigError> {
        MockConfig::read(&Env::process())
    }

    /// Reads the configuration from `lookup`, which returns the value of a variable by name,
    /// as [`MockConfig::from_env`] does from the environment.
    ///
    /// ```
    /// use tower_llm_queue_servers::mock::MockConfig;
    ///
    /// let config = MockConfig::from_lookup(|name| (name == "MOCK_RPM").then(|| "30".to_string()));
    /// assert_eq!(config.unwrap().rpm, Some(30));
    ///
    /// let error = MockConfig::from_lookup(|name| (name == "MOCK_FAULT_503").then(|| "2".into()));
    /// assert_eq!(error.unwrap_err().variable(), "MOCK_FAULT_503");
    /// ```
    pub fn from_lookup<F>(lookup: F) -> Result<MockConfig, ConfigError>
    where
        F: FnMut(&str) -> Option<String>,
    {
        MockConfig::read(&env_of(lookup))
    }

    /// Reads the configuration from `env`.
    pub fn read(env: &Env) -> Result<MockConfig, ConfigError> {
        MockConfig::default().overridden(env)
    }

    /// This configuration, with what `env` sets instead: how a server that runs the mock
    /// in-process gives it defaults of its own and still lets every `MOCK_*` variable change
    /// them.
    pub fn overridden(self, env: &Env) -> Result<MockConfig, ConfigError> {
        let defaults = self;
        let share = |name: &str, default: f64| {
            env.parse_where(
                name,
                default,
                "a share of requests from 0.0 to 1.0",
                |x: &f64| (0.0..=1.0).contains(x),
            )
        };
        let millis = |name: &str, default: Duration| {
            let default = u64::try_from(default.as_millis()).unwrap_or(u64::MAX);
            env.parse(name, default, "a whole number of milliseconds")
                .map(Duration::from_millis)
        };
        let concurrency = env
            .optional_positive("MOCK_CONCURRENCY")?
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        Ok(MockConfig {
            rpm: env.optional_positive("MOCK_RPM")?.or(defaults.rpm),
            tpm: env.optional_positive("MOCK_TPM")?.or(defaults.tpm),
            window: env.millis("MOCK_WINDOW_MS", defaults.window)?,
            concurrency: concurrency.or(defaults.concurrency),
            tokens_per_second: env.parse_where(
                "MOCK_TOKENS_PER_SECOND",
                defaults.tokens_per_second,
                "a number of tokens per second, 0 or more, or inf",
                |x: &f64| *x >= 0.0,
            )?,
            time_to_first_token: millis("MOCK_TTFT_MS", defaults.time_to_first_token)?,
            faults: Faults {
                error_500: share("MOCK_FAULT_500", defaults.faults.error_500)?,
                error_503: share("MOCK_FAULT_503", defaults.faults.error_503)?,
                overloaded_529: share("MOCK_FAULT_529", defaults.faults.overloaded_529)?,
                latency: share("MOCK_FAULT_LATENCY", defaults.faults.latency)?,
                latency_amount: millis("MOCK_LATENCY_MS", defaults.faults.latency_amount)?,
                cut_stream: share("MOCK_FAULT_CUT", defaults.faults.cut_stream)?,
                error_event: share("MOCK_FAULT_ERROR_EVENT", defaults.faults.error_event)?,
            },
            seed: env.parse(
                "MOCK_SEED",
                defaults.seed,
                "a whole number from 0 to 2^64 - 1",
            )?,
        })
    }
}

/// The mock's variables, as `lookup` gives them.
fn env_of(mut lookup: impl FnMut(&str) -> Option<String>) -> Env {
    Env::fixed(
        ENV_VARS
            .iter()
            .filter_map(|var| Some((var.name, lookup(var.name)?))),
    )
}

/// The address the standalone mock listens on: `MOCK_BIND` (default `127.0.0.1`) and
/// `MOCK_PORT` (default 8089) from the process environment.
pub fn addr_from_env() -> Result<SocketAddr, ConfigError> {
    addr_in(&Env::process())
}

/// [`addr_from_env`] with the variables read through `lookup`.
///
/// ```
/// use tower_llm_queue_servers::mock::addr_from_lookup;
///
/// let addr = addr_from_lookup(|_| None).unwrap();
/// assert_eq!(addr.to_string(), "127.0.0.1:8089");
/// assert!(addr_from_lookup(|name| (name == "MOCK_PORT").then(|| "http".into())).is_err());
/// ```
pub fn addr_from_lookup<F>(lookup: F) -> Result<SocketAddr, ConfigError>
where
    F: FnMut(&str) -> Option<String>,
{
    addr_in(&env_of(lookup))
}

/// The address in `env`: `MOCK_BIND` and `MOCK_PORT`.
pub fn addr_in(env: &Env) -> Result<SocketAddr, ConfigError> {
    let ip: IpAddr = env.parse(
        "MOCK_BIND",
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        "an IP address such as 127.0.0.1 or ::1",
    )?;
    let port: u16 = env.parse("MOCK_PORT", 8089, "a port number from 0 to 65535")?;
    Ok(SocketAddr::new(ip, port))
}
