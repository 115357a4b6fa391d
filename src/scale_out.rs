//! Several instances of a server behind one Redis: the settings that make their limits and
//! caches shared.
//!
//! | variable | default | |
//! |---|---|---|
//! | `REDIS_URL` | unset: every limit in this process's memory | `redis://host:port/db` |
//! | `REDIS_PREFIX` | the server's own (`tlq:chat`, `tlq:plans`) | the keys' prefix: one per deployment sharing a Redis |
//! | `REDIS_INSTANCES` | 1 | how many instances share the limits; while Redis is down each keeps `1 / n` of them |
//! | `REDIS_TIMEOUT_MS` | 200 | the longest a decision waits for Redis before the fallback decides |
//! | `REDIS_LEASE_MS` | 5000 | how long a concurrency slot outlives an instance that died holding it |

use std::time::Duration;

use tower_llm_queue::store::RedisStore;

use crate::config::{ConfigError, Env};

/// The store every shared layer of a server scopes its keys in, from `REDIS_URL`,
/// `REDIS_PREFIX` (`default_prefix` when unset), `REDIS_INSTANCES`, `REDIS_TIMEOUT_MS` and
/// `REDIS_LEASE_MS`; `None` without `REDIS_URL`. Nothing connects yet.
pub fn store_from_env(env: &Env, default_prefix: &str) -> Result<Option<RedisStore>, ConfigError> {
    let Some(url) = env.get("REDIS_URL") else {
        return Ok(None);
    };
    let prefix = env
        .get("REDIS_PREFIX")
        .unwrap_or_else(|| default_prefix.to_string());
    let instances = env.positive("REDIS_INSTANCES", 1)?;
    let instances = u32::try_from(instances).map_err(|_| {
        ConfigError::new(
            "REDIS_INSTANCES",
            &instances.to_string(),
            "at most 2^32 - 1",
        )
    })?;
    let timeout = env.millis("REDIS_TIMEOUT_MS", Duration::from_millis(200))?;
    let lease = env.millis("REDIS_LEASE_MS", Duration::from_secs(5))?;
    let store = RedisStore::new(&url, prefix)
        .map_err(|_| ConfigError::new("REDIS_URL", &redact(&url), "a redis:// or rediss:// URL"))?;
    Ok(Some(
        store
            .instances(instances)
            .timeout(timeout)
            .lease_time(lease),
    ))
}

/// A URL with its password, if any, hidden.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_is_none_and_bad_values_name_their_variable() {
        assert!(store_from_env(&Env::fixed([("A", "1")]), "p")
            .unwrap()
            .is_none());
        let store = store_from_env(
            &Env::fixed([("REDIS_URL", "redis://127.0.0.1:6379")]),
            "tlq:x",
        )
        .unwrap()
        .unwrap();
        assert_eq!(store.prefix(), "tlq:x");
        let env = Env::fixed([("REDIS_URL", "redis://h"), ("REDIS_PREFIX", "blue")]);
        assert_eq!(
            store_from_env(&env, "tlq:x").unwrap().unwrap().prefix(),
            "blue"
        );
        let err =
            store_from_env(&Env::fixed([("REDIS_URL", "http://u:secret@h")]), "p").unwrap_err();
        assert_eq!(err.variable(), "REDIS_URL");
        assert!(!err.value().contains("secret"));
        let env = Env::fixed([("REDIS_URL", "redis://h"), ("REDIS_INSTANCES", "0")]);
        assert_eq!(
            store_from_env(&env, "p").unwrap_err().variable(),
            "REDIS_INSTANCES"
        );
    }
}
