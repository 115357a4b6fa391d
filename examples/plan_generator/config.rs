//! The plan generator's settings, from the environment. Each has a default; a value that cannot
//! be used stops the server at start-up with a message naming its variable.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tower_llm_queue::store::RedisStore;
use tower_llm_queue_servers::config::{ConfigError, Env};
use tower_llm_queue_servers::mock::MockConfig;
use tower_llm_queue_servers::upstream::{mock_quota, UpstreamConfig};

/// Seed 001's limit: two plan generations in flight per user.
pub const SEED_PER_USER: u64 = 2;

/// Everything the plan generator reads from its environment. See the table in the README.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    /// `BIND` and `PORT` (default 127.0.0.1:8081).
    pub addr: SocketAddr,
    /// `DATABASE_URL`: a `sqlite:` URL (default: `plan_generator.db` in the OS's temporary
    /// directory, created if missing) or a `postgres://` URL.
    pub database: DatabaseUrl,
    /// `MAX_CONCURRENT_PER_USER` (2, seed 001): one user's plan requests in flight.
    pub max_concurrent_per_user: u64,
    /// `RATE_LIMIT_PER_MINUTE` (30): plan requests per client address in any 60 seconds.
    pub rate_limit_per_minute: u64,
    /// `PLAN_CACHE_TTL_MS` (300000, seed 001's five minutes): how long a generated plan answers
    /// the same request of the same user without a new upstream call.
    pub cache_ttl: Duration,
    /// `PLAN_TIMEOUT_MS` (60000): the longest a generation may take, retries included, before
    /// the offline plan is served.
    pub plan_timeout: Duration,
    /// `PLAN_RETRY_ATTEMPTS` (3, seed 000): retries of a failed upstream call.
    pub retry_attempts: u32,
    /// `PLAN_RETRY_BACKOFF_MS` (500): the first retry's backoff, doubling up to 8 s, jittered.
    pub retry_backoff: Duration,
    /// `PLAN_MAX_RETRY_WAIT_MS` (10000): the longest wait the upstream may ask for that the
    /// retry layer honours; a longer one is an offline plan at once.
    pub max_retry_wait: Duration,
    /// `BREAKER_OPEN_MS` (30000): how long the breaker stays open before probing.
    pub breaker_open_for: Duration,
    /// `PLAN_MAX_TOKENS` (1500): the longest reply asked for.
    pub max_tokens: u64,
    /// `MAX_BODY_BYTES` (16384): the largest request body; a larger one is a 413.
    pub max_body_bytes: u64,
    /// `SHUTDOWN_GRACE_MS` (30000): how long generations in progress may finish after Ctrl-C.
    pub shutdown_grace: Duration,
    /// Where the upstream is: the same variables as the chat server's.
    pub upstream: UpstreamConfig,
    /// The in-process mock's settings, when no upstream is configured: the chat server's
    /// modest quota, which every `MOCK_*` variable can change.
    pub mock: MockConfig,
    /// `REDIS_URL`, `REDIS_PREFIX` (default [`REDIS_PREFIX`]) and the other `REDIS_*`
    /// variables: with them, the per-user limit, the per-address window and the plan cache
    /// are shared with the other instances on the same Redis and prefix.
    pub redis: Option<RedisStore>,
}

/// The keys' prefix in Redis when `REDIS_PREFIX` is unset.
pub const REDIS_PREFIX: &str = "tlq:plans";

impl PlanConfig {
    /// Reads every setting; a bad value is an error naming its variable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let ip: IpAddr = env.parse("BIND", [127, 0, 0, 1].into(), "an IP address")?;
        let port: u16 = env.parse("PORT", 8081, "a port number")?;
        let database = match env.get("DATABASE_URL") {
            None => DatabaseUrl::default_sqlite(),
            Some(url) => DatabaseUrl::parse(&url).ok_or_else(|| {
                ConfigError::new(
                    "DATABASE_URL",
                    &redact(&url),
                    "a sqlite: URL (sqlite://path/to/file.db) or a postgres:// URL",
                )
            })?,
        };
        let retry_attempts = env.parse("PLAN_RETRY_ATTEMPTS", 3, "a whole number")?;
        Ok(PlanConfig {
            addr: SocketAddr::new(ip, port),
            database,
            max_concurrent_per_user: env.positive("MAX_CONCURRENT_PER_USER", SEED_PER_USER)?,
            rate_limit_per_minute: env.positive("RATE_LIMIT_PER_MINUTE", 30)?,
            cache_ttl: env.millis("PLAN_CACHE_TTL_MS", Duration::from_secs(300))?,
            plan_timeout: env.millis("PLAN_TIMEOUT_MS", Duration::from_secs(60))?,
            retry_attempts,
            retry_backoff: env.millis("PLAN_RETRY_BACKOFF_MS", Duration::from_millis(500))?,
            max_retry_wait: env.millis("PLAN_MAX_RETRY_WAIT_MS", Duration::from_secs(10))?,
            breaker_open_for: env.millis("BREAKER_OPEN_MS", Duration::from_secs(30))?,
            max_tokens: env.positive("PLAN_MAX_TOKENS", 1500)?,
            max_body_bytes: env.positive("MAX_BODY_BYTES", 16 * 1024)?,
            shutdown_grace: env.millis("SHUTDOWN_GRACE_MS", Duration::from_secs(30))?,
            upstream: UpstreamConfig::from_env(env)?,
            mock: mock_quota().overridden(env)?,
            redis: tower_llm_queue_servers::scale_out::store_from_env(env, REDIS_PREFIX)?,
        })
    }
}

/// The kind of database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        })
    }
}

/// A database URL whose kind is known.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    url: String,
    backend: Backend,
}

impl DatabaseUrl {
    /// `url`, if it is a `sqlite:` or a `postgres://` (`postgresql://`) URL. An SQLite file is
    /// created if missing unless the URL says otherwise with a `mode`.
    pub fn parse(url: &str) -> Option<Self> {
        let url = url.trim();
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            return Some(DatabaseUrl {
                url: url.to_string(),
                backend: Backend::Postgres,
            });
        }
        let path = lower.strip_prefix("sqlite:")?;
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() || path.starts_with('?') {
            return None;
        }
        let url = match url.contains("mode=") {
            true => url.to_string(),
            false if url.contains('?') => format!("{url}&mode=rwc"),
            false => format!("{url}?mode=rwc"),
        };
        Some(DatabaseUrl {
            url,
            backend: Backend::Sqlite,
        })
    }

    /// `plan_generator.db` in the OS's temporary directory.
    pub fn default_sqlite() -> Self {
        let path = std::env::temp_dir().join("plan_generator.db");
        DatabaseUrl {
            url: format!("sqlite://{}?mode=rwc", path.display()),
            backend: Backend::Sqlite,
        }
    }

    /// The URL, as the driver takes it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The kind of database.
    pub fn backend(&self) -> Backend {
        self.backend
    }
}

/// Shows the URL without its password.
impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact(&self.url))
    }
}

/// Shows the URL without its password.
impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact(&self.url))
    }
}

/// `url` with any password in it replaced by `***`, for logs and error messages.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let authority_end = url[scheme_end..]
        .find(['/', '?'])
        .map_or(url.len(), |i| scheme_end + i);
    let authority = &url[scheme_end..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &userinfo[..colon],
            &url[scheme_end + at..]
        ),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            redact("postgres://bob:secret@db:5432/x"),
            "postgres://bob:***@db:5432/x"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/test"),
            "postgres://postgres@127.0.0.1/test"
        );
        let sqlite = DatabaseUrl::parse("sqlite://plans.db").unwrap();
        assert_eq!(sqlite.url(), "sqlite://plans.db?mode=rwc");
        assert_eq!(sqlite.backend(), Backend::Sqlite);
        assert!(DatabaseUrl::parse("mysql://x").is_none());
        assert!(DatabaseUrl::parse("sqlite:").is_none());
    }
}
