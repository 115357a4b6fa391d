//! The chat server's settings, from the environment (seed 003's names and defaults).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tower_llm_queue::store::RedisStore;
use tower_llm_queue_servers::config::{ConfigError, Env};
use tower_llm_queue_servers::mock::MockConfig;
use tower_llm_queue_servers::upstream::{mock_quota, Provider, UpstreamConfig};

/// Everything the chat server reads from its environment. See the table in the README.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// `BIND` and `PORT` (default 127.0.0.1:3000).
    pub addr: SocketAddr,
    /// `MAX_CONCURRENT_CHATS` (5): upstream calls at once, for everybody.
    pub max_concurrent_chats: u64,
    /// `MAX_CONCURRENT_PER_USER` (3): one user's requests in flight.
    pub max_concurrent_per_user: u64,
    /// `REQUESTS_PER_MINUTE` (20): one user's requests per window.
    pub requests_per_minute: u64,
    /// `RATE_WINDOW_MS` (60000): the window of `REQUESTS_PER_MINUTE`, shorter in tests.
    pub rate_window: Duration,
    /// `CHAT_TIMEOUT` (300000 ms): the longest a request may take, waiting included.
    pub chat_timeout: Duration,
    /// `CHAT_RETRY_ATTEMPTS` (2): retries of a failed upstream call.
    pub retry_attempts: u32,
    /// `QUEUE_CAPACITY` (500): requests that may wait for the upstream.
    pub queue_capacity: u64,
    /// `UPSTREAM_RPM`: requests per minute the upstream allows (the mock's quota by default
    /// against the mock, none otherwise).
    pub upstream_rpm: Option<u64>,
    /// `UPSTREAM_TPM`: tokens per minute the upstream allows (as `UPSTREAM_RPM`).
    pub upstream_tpm: Option<u64>,
    /// `UPSTREAM_WINDOW_MS` (60000): the upstream's window of `UPSTREAM_RPM` and `UPSTREAM_TPM`
    /// (the mock's `MOCK_WINDOW_MS` by default against the mock); shorter in a load test that
    /// runs its clock faster.
    pub upstream_window: Duration,
    /// `UPSTREAM_PACE` (false): spread the quota's starts evenly over the window (see
    /// `StackConfig::pace`).
    pub upstream_pace: bool,
    /// `MAX_TOKENS` (512): the longest reply asked for, and the reply's share of a request's
    /// token estimate.
    pub max_tokens: u64,
    /// `BREAKER_OPEN_MS` (10000): how long the breaker stays open before probing.
    pub breaker_open_for: Duration,
    /// `MAX_BODY_BYTES` (65536): the largest request body accepted.
    pub max_body_bytes: u64,
    /// `SHUTDOWN_GRACE_MS` (30000): how long running streams may go on after Ctrl-C.
    pub shutdown_grace: Duration,
    /// Where the upstream is.
    pub upstream: UpstreamConfig,
    /// The in-process mock's settings, when no upstream is configured: a modest quota
    /// ([`mock_quota`]), which every `MOCK_*` variable can change.
    pub mock: MockConfig,
    /// `REDIS_URL`, `REDIS_PREFIX` (default [`REDIS_PREFIX`]) and the other `REDIS_*`
    /// variables: with them, every limit — the queue of upstream calls, the per-user limits,
    /// the upstream's quota — is shared with the other instances on the same Redis and
    /// prefix.
    pub redis: Option<RedisStore>,
}

/// The keys' prefix in Redis when `REDIS_PREFIX` is unset.
pub const REDIS_PREFIX: &str = "tlq:chat";

impl ChatConfig {
    /// Reads every setting; a bad value is an error naming its variable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let ip: IpAddr = env.parse("BIND", [127, 0, 0, 1].into(), "an IP address")?;
        let port: u16 = env.parse("PORT", 3000, "a port number")?;
        let upstream = UpstreamConfig::from_env(env)?;
        let mock = mock_quota().overridden(env)?;
        let (default_rpm, default_tpm, default_window) = match upstream.provider {
            Provider::Mock => (mock.rpm, mock.tpm, mock.window),
            _ => (None, None, Duration::from_secs(60)),
        };
        let retry_attempts = env.parse("CHAT_RETRY_ATTEMPTS", 2, "a whole number")?;
        Ok(ChatConfig {
            addr: SocketAddr::new(ip, port),
            max_concurrent_chats: env.positive("MAX_CONCURRENT_CHATS", 5)?,
            max_concurrent_per_user: env.positive("MAX_CONCURRENT_PER_USER", 3)?,
            requests_per_minute: env.positive("REQUESTS_PER_MINUTE", 20)?,
            rate_window: env.millis("RATE_WINDOW_MS", Duration::from_secs(60))?,
            chat_timeout: env.millis("CHAT_TIMEOUT", Duration::from_secs(300))?,
            retry_attempts,
            queue_capacity: env.positive("QUEUE_CAPACITY", 500)?,
            upstream_rpm: env.optional_positive("UPSTREAM_RPM")?.or(default_rpm),
            upstream_tpm: env.optional_positive("UPSTREAM_TPM")?.or(default_tpm),
            upstream_window: env.millis("UPSTREAM_WINDOW_MS", default_window)?,
            upstream_pace: env.parse("UPSTREAM_PACE", false, "true or false")?,
            max_tokens: env.positive("MAX_TOKENS", 512)?,
            breaker_open_for: env.millis("BREAKER_OPEN_MS", Duration::from_secs(10))?,
            max_body_bytes: env.positive("MAX_BODY_BYTES", 64 * 1024)?,
            shutdown_grace: env.millis("SHUTDOWN_GRACE_MS", Duration::from_secs(30))?,
            upstream,
            mock,
            redis: tower_llm_queue_servers::scale_out::store_from_env(env, REDIS_PREFIX)?,
        })
    }
}
