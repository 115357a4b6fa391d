//! The classify server's settings, from the environment (seed 004's values by default).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tower_llm_queue_servers::config::{ConfigError, Env};
use tower_llm_queue_servers::mock::MockConfig;
use tower_llm_queue_servers::upstream::UpstreamConfig;

/// Everything the classify server reads from its environment. See the README's table.
#[derive(Debug, Clone)]
pub struct ClassifyConfig {
    /// `BIND` and `PORT` (127.0.0.1:8080): the HTTP API.
    pub http: SocketAddr,
    /// `BIND` and `GRPC_PORT` (50051): the gRPC API.
    pub grpc: SocketAddr,
    /// `WORKERS` (50): upstream calls at once, for both protocols together.
    pub workers: u64,
    /// `QUEUE_SIZE` (1000): items that may wait for a worker.
    pub queue_size: u64,
    /// `REQUEST_TIMEOUT_MS` (30000): the longest a request may take, waiting included.
    pub request_timeout: Duration,
    /// `RATE_PER_SECOND` (100): requests per second, for both protocols together.
    pub rate_per_second: u64,
    /// `BURST` (200): requests at once above that rate.
    pub burst: u64,
    /// `MAX_BATCH` (100): texts in one batch.
    pub max_batch: u64,
    /// `MAX_TEXT_BYTES` (8192): the longest text.
    pub max_text_bytes: u64,
    /// `LABELS` (`billing,bug,feature,praise,question`): what a text is classified as.
    pub labels: Vec<String>,
    /// `SHUTDOWN_GRACE_MS` (30000): how long running and waiting requests may finish after
    /// Ctrl-C or SIGTERM.
    pub shutdown_grace: Duration,
    /// `LAYERS` (`on`): `off` serves the same handlers with no layers at all — no token
    /// bucket, no timeout, no queue — to measure what the layers cost.
    pub layers: bool,
    /// Where the upstream is.
    pub upstream: UpstreamConfig,
    /// The in-process mock's settings, when no upstream is configured: an answer at once after
    /// 50 ms and no quota, which every `MOCK_*` variable can change.
    pub mock: MockConfig,
}

impl ClassifyConfig {
    /// Reads every setting; a bad value is an error naming its variable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let ip: IpAddr = env.parse("BIND", [127, 0, 0, 1].into(), "an IP address")?;
        let port: u16 = env.parse("PORT", 8080, "a port number")?;
        let grpc_port: u16 = env.parse("GRPC_PORT", 50051, "a port number")?;
        let labels: Vec<String> = env
            .get("LABELS")
            .unwrap_or_else(|| "billing,bug,feature,praise,question".into())
            .split(',')
            .map(|label| label.trim().to_string())
            .filter(|label| !label.is_empty())
            .collect();
        if labels.len() < 2 {
            let value = env.get("LABELS").unwrap_or_default();
            return Err(ConfigError::new(
                "LABELS",
                &value,
                "at least two labels, separated by commas",
            ));
        }
        Ok(ClassifyConfig {
            http: SocketAddr::new(ip, port),
            grpc: SocketAddr::new(ip, grpc_port),
            workers: env.positive("WORKERS", 50)?,
            queue_size: env.positive("QUEUE_SIZE", 1000)?,
            request_timeout: env.millis("REQUEST_TIMEOUT_MS", Duration::from_secs(30))?,
            rate_per_second: env.positive("RATE_PER_SECOND", 100)?,
            burst: env.positive("BURST", 200)?,
            max_batch: env.positive("MAX_BATCH", 100)?,
            max_text_bytes: env.positive("MAX_TEXT_BYTES", 8192)?,
            labels,
            shutdown_grace: env.millis("SHUTDOWN_GRACE_MS", Duration::from_secs(30))?,
            layers: match env.get("LAYERS").as_deref() {
                None | Some("on") => true,
                Some("off") => false,
                Some(other) => return Err(ConfigError::new("LAYERS", other, "on or off")),
            },
            upstream: UpstreamConfig::from_env(env)?,
            mock: MockConfig {
                tokens_per_second: 0.0,
                time_to_first_token: Duration::from_millis(50),
                ..MockConfig::default()
            }
            .overridden(env)?,
        })
    }
}
