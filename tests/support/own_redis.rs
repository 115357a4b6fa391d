//! Redis for the tests that share state across processes: the server at `REDIS_URL`, and
//! servers of a test's own, to stop at will.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The server at `REDIS_URL` (default `redis://127.0.0.1:6379`), or `None` (the test says so
/// and passes) when it cannot be reached — except under `CI=true`, where that fails the test.
pub fn redis_url() -> Option<String> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let reachable = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_ok();
    if reachable {
        return Some(url);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("Redis is not reachable at {url}, and CI=true: the Redis tests must run");
    }
    eprintln!("skipping: Redis is not reachable at {url} (set REDIS_URL)");
    None
}

/// A prefix no other test or run uses.
pub fn fresh_prefix(test: &str) -> String {
    format!(
        "tlq-test:{test}:{}:{}",
        std::process::id(),
        fastrand::u64(..)
    )
}

/// A blocking connection, for checks.
pub fn connection(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .expect("a connection to Redis")
}

/// The members of a sorted set: the slots held in a scope.
pub fn zcard(url: &str, key: &str) -> usize {
    redis::cmd("ZCARD")
        .arg(key)
        .query(&mut connection(url))
        .unwrap_or(usize::MAX)
}

/// A Redis server of the test's own, on a free port, without persistence: stopped, it loses
/// everything.
pub struct OwnRedis {
    child: Child,
    pub url: String,
    pub port: u16,
}

impl OwnRedis {
    pub fn start() -> Option<OwnRedis> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        Self::start_on(port)
    }

    pub fn start_on(port: u16) -> Option<OwnRedis> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let url = format!("redis://127.0.0.1:{port}");
        for _ in 0..100 {
            let ok = redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(100)))
                .is_ok();
            if ok {
                return Some(OwnRedis { child, url, port });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
