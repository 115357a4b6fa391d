//! Concurrency limits held across server processes through Redis, against the real server at
//! `REDIS_URL` (default `redis://127.0.0.1:6379`; without one these tests say so and pass,
//! except under `CI=true`), and outages against a `redis-server` of the test's own.
//!
//! The processes are this test binary run again with `TLQ_SCALE_CHILD` naming a child's part:
//! `saturate` (workers calling a mock provider through a Redis-backed queue), or `agent` (a
//! queue or a per-user limit over an upstream that runs until told to end, driven by commands
//! on its standard input). Redis keeps its own clock, so these tests run in real time, and
//! check timings by polling with a deadline.

mod support;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_llm_queue::store::{OnRedisFailure, RedisStore};
use tower_llm_queue::{PerUserConcurrencyLayer, PriorityQueueLayer, Rejected, RejectionKind};
use tower_llm_queue_servers::mock::{MockConfig, MockProvider};

use support::own_redis::{fresh_prefix, redis_url, zcard, OwnRedis};
use support::Http;

const CHILD: &str = "TLQ_SCALE_CHILD";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is set for a child"))
}

fn env_u64(name: &str) -> u64 {
    env(name).parse().expect("a number")
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The part this process plays when run as a child; nothing on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child() {
    match std::env::var(CHILD).as_deref() {
        Ok("saturate") => saturate().await,
        Ok("agent") => agent().await,
        _ => {}
    }
}

/// Runs this binary as the child `part`, with `vars`.
fn spawn_child(part: &str, vars: &[(&str, String)]) -> Child {
    let exe = std::env::current_exe().unwrap();
    let mut command = Command::new(exe);
    command
        .args(["--exact", "child", "--nocapture", "--test-threads", "1"])
        .env(CHILD, part)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (name, value) in vars {
        command.env(name, value);
    }
    command.spawn().expect("the test binary runs again")
}

// ---------------------------------------------------------------------------------------------
// Saturation: three processes, one queue of 5.

/// The machine these tests share: the one that measures timing runs alone, the others side by
/// side.
static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

const SATURATION_CONCURRENCY: usize = 5;
const CALL_MS: u64 = 200;

/// Workers calling the mock through a queue of 5 kept in Redis, from `TLQ_START_AT` to
/// `TLQ_STOP_AT` (wall-clock milliseconds), more of them than the queue runs at once.
async fn saturate() {
    let store = RedisStore::new(&env("TLQ_REDIS_URL"), env("TLQ_PREFIX"))
        .unwrap()
        .lease_time(Duration::from_secs(2));
    let http = Http::new(env("TLQ_MOCK_URL"));
    let upstream = service_fn(move |n: u64| {
        let http = http.clone();
        async move {
            let body = json!({
                "model": "mock",
                "messages": [{"role": "user", "content": format!("call {n}")}],
                "max_tokens": 1,
            });
            let answer = http.post_json("/v1/chat/completions", "load", &body).await;
            match answer.status.as_u16() {
                200 => Ok::<_, BoxError>(n),
                status => Err(format!("the mock answered {status}").into()),
            }
        }
    });
    let svc = ServiceBuilder::new()
        .layer(
            PriorityQueueLayer::new(SATURATION_CONCURRENCY)
                .queue_timeout(Duration::from_secs(30))
                .store(store.clone()),
        )
        .service(upstream);
    let (start, stop) = (env_u64("TLQ_START_AT"), env_u64("TLQ_STOP_AT"));
    tokio::time::sleep(Duration::from_millis(start.saturating_sub(wall_ms()))).await;
    let mut workers = Vec::new();
    for worker in 0..10u64 {
        let svc = svc.clone();
        workers.push(tokio::spawn(async move {
            let (mut served, mut failed) = (0u64, 0u64);
            let mut n = worker;
            while wall_ms() < stop {
                let mut svc = svc.clone();
                let ready = svc.ready().await.expect("always ready");
                match ready.call(n).await {
                    Ok(_) => served += 1,
                    Err(_) => failed += 1,
                }
                n += 10;
            }
            (served, failed)
        }));
    }
    let (mut served, mut failed) = (0, 0);
    for worker in workers {
        let (s, f) = worker.await.unwrap();
        served += s;
        failed += f;
    }
    // The last slots' releases reach Redis before the process exits.
    store.flush().await;
    println!("@@ SERVED {served} FAILED {failed}");
}

#[tokio::test]
async fn three_processes_share_a_queue_of_five_and_keep_it_busy() {
    // It measures how busy the slots are kept, which the other tests' processes and servers
    // would take a share of: it runs alone.
    let _alone = MACHINE.write().await;
    let Some(url) = redis_url() else { return };
    let config = MockConfig {
        tokens_per_second: 0.0,
        time_to_first_token: Duration::from_millis(CALL_MS),
        ..MockConfig::default()
    };
    let mock = MockProvider::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let prefix = fresh_prefix("saturate");
    mock.handle().reset();
    let base = wall_ms();
    let start = base + 2_000;
    let stop = start + 5_000;
    let vars = [
        ("TLQ_REDIS_URL", url.clone()),
        ("TLQ_PREFIX", prefix.clone()),
        ("TLQ_MOCK_URL", mock.url().to_string()),
        ("TLQ_START_AT", start.to_string()),
        ("TLQ_STOP_AT", stop.to_string()),
    ];
    let children: Vec<Child> = (0..3).map(|_| spawn_child("saturate", &vars)).collect();
    let mut served = Vec::new();
    for child in children {
        let out = child.wait_with_output().await.unwrap();
        assert!(out.status.success(), "a child failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.split_once("@@ SERVED ").map(|(_, rest)| rest))
            .expect("the child reports");
        let mut words = line.split_whitespace();
        let n: u64 = words.next().unwrap().parse().unwrap();
        assert_eq!(words.nth(1), Some("0"), "a child's call failed: {line}");
        served.push(n);
    }
    let stats = mock.handle().stats();
    // Every call lasts CALL_MS at the mock: the slots' busy time within the window where the
    // three processes were all saturated (after half a second), over the slot time there.
    let (from, to) = (start + 500 - base, stop - base);
    let busy: u64 = stats
        .arrivals
        .iter()
        .filter(|a| a.outcome == "served")
        .map(|a| {
            let (begin, end) = (a.at_ms.max(from), (a.at_ms + CALL_MS).min(to));
            end.saturating_sub(begin)
        })
        .sum();
    let used = busy as f64 / (SATURATION_CONCURRENCY as u64 * (to - from)) as f64;
    println!(
        "three processes served {served:?}; peak concurrency at the mock {}, slot time used \
         {:.1}%",
        stats.peak_concurrency,
        used * 100.0
    );
    assert_eq!(stats.peak_concurrency, SATURATION_CONCURRENCY);
    assert_eq!(stats.throttled + stats.faulted, 0);
    assert!(
        used >= 0.95,
        "only {:.1}% of the slot time used",
        used * 100.0
    );
    let total: u64 = served.iter().sum();
    assert!(
        served.iter().all(|n| *n * 5 >= total),
        "a process got much less than its share: {served:?}"
    );
    assert_eq!(
        zcard(&url, &format!("{prefix}:q:h:a")),
        0,
        "slots left held"
    );
    mock.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Agents: a layer over an upstream that runs until told to end.

/// Reads commands on standard input — `go <user> <id>`, `end <id>`, `stats` — and reports on
/// standard output, each report after `@@ `: `READY`, `RUNNING <id>` once a request is in the upstream, `DONE <id>`,
/// `REFUSED <id> <kind>`, `STATS <held> <held_locally> <waiting>`.
async fn agent() {
    let store = RedisStore::new(&env("TLQ_REDIS_URL"), env("TLQ_PREFIX"))
        .unwrap()
        .lease_time(Duration::from_millis(env_u64("TLQ_LEASE_MS")))
        .instances(3);
    let limit = env_u64("TLQ_LIMIT") as usize;
    let wait = std::env::var("TLQ_WAIT_MS")
        .ok()
        .map(|ms| Duration::from_millis(ms.parse().expect("a number of milliseconds")));
    let gates: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>> = Arc::default();
    let upstream = {
        let gates = gates.clone();
        service_fn(move |(_, id): (String, u64)| {
            let (tx, rx) = oneshot::channel();
            gates.lock().unwrap().insert(id, tx);
            println!("@@ RUNNING {id}");
            async move {
                let _ = rx.await;
                Ok::<_, BoxError>(id)
            }
        })
    };
    let by_user = |(user, _): &(String, u64)| user.clone();
    let (svc, handle) = match env("TLQ_LAYER").as_str() {
        "queue" => {
            let mut layer = PriorityQueueLayer::new(limit);
            if let Some(wait) = wait {
                layer = layer.queue_timeout(wait);
            }
            let layer = layer.store(store);
            let handle = layer.lease_handle();
            let svc = ServiceBuilder::new().layer(layer).service(upstream);
            (tower::util::BoxCloneService::new(svc), handle)
        }
        _ => {
            let mut layer = PerUserConcurrencyLayer::new(limit, by_user);
            if let Some(wait) = wait {
                layer = layer.wait(limit, wait);
            }
            let layer = layer.store(store);
            let handle = layer.lease_handle();
            let svc = ServiceBuilder::new().layer(layer).service(upstream);
            (tower::util::BoxCloneService::new(svc), handle)
        }
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    println!("@@ READY");
    while let Ok(Some(line)) = lines.next_line().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["go", user, id] => {
                let (svc, user, id) = (svc.clone(), user.to_string(), id.parse::<u64>().unwrap());
                tokio::spawn(async move {
                    match svc.oneshot((user, id)).await {
                        Ok(_) => println!("@@ DONE {id}"),
                        Err(err) => {
                            let kind = Rejected::find(&*err).map_or("error", |r| r.kind().as_str());
                            println!("@@ REFUSED {id} {kind}");
                        }
                    }
                });
            }
            ["end", id] => {
                let id: u64 = id.parse().unwrap();
                if let Some(gate) = gates.lock().unwrap().remove(&id) {
                    let _ = gate.send(());
                }
            }
            ["stats"] => {
                let s = handle.stats();
                println!("@@ STATS {} {} {}", s.held, s.held_locally, s.waiting);
            }
            _ => {}
        }
    }
}

/// A running agent: commands in, reports out.
struct Agent {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Agent {
    async fn start(
        url: &str,
        prefix: &str,
        layer: &str,
        limit: usize,
        lease: Duration,
        wait: Option<Duration>,
    ) -> Agent {
        let mut vars = vec![
            ("TLQ_REDIS_URL", url.to_string()),
            ("TLQ_PREFIX", prefix.to_string()),
            ("TLQ_LAYER", layer.to_string()),
            ("TLQ_LIMIT", limit.to_string()),
            ("TLQ_LEASE_MS", lease.as_millis().to_string()),
        ];
        if let Some(wait) = wait {
            vars.push(("TLQ_WAIT_MS", wait.as_millis().to_string()));
        }
        let mut child = spawn_child("agent", &vars);
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut stdout = BufReader::new(stdout).lines();
            // The test harness writes on the same lines: a report follows "@@ ".
            while let Ok(Some(line)) = stdout.next_line().await {
                let Some((_, report)) = line.split_once("@@ ") else {
                    continue;
                };
                if tx.send(report.to_string()).is_err() {
                    return;
                }
            }
        });
        let mut agent = Agent {
            child,
            stdin,
            lines,
            seen: Vec::new(),
        };
        agent.expect("READY", Duration::from_secs(10)).await;
        agent
    }

    async fn send(&mut self, command: &str) {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Waits for the report `line`, at most `limit`; panics without it.
    async fn expect(&mut self, line: &str, limit: Duration) {
        assert!(
            self.wait_for(line, limit).await,
            "no {line:?} within {limit:?}; seen {:?}",
            self.seen
        );
    }

    /// Whether the report `line` comes within `limit`.
    async fn wait_for(&mut self, line: &str, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(at) = self.seen.iter().position(|l| l == line) {
                self.seen.remove(at);
                return true;
            }
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(l)) => self.seen.push(l),
                _ => return false,
            }
        }
    }

    /// The agent's lease stats: (held, held locally, waiting).
    async fn stats(&mut self) -> (usize, usize, usize) {
        self.send("stats").await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(at) = self.seen.iter().position(|l| l.starts_with("STATS ")) {
                let line = self.seen.remove(at);
                let n: Vec<usize> = line[6..].split(' ').map(|w| w.parse().unwrap()).collect();
                return (n[0], n[1], n[2]);
            }
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(l)) => self.seen.push(l),
                _ => panic!("no stats"),
            }
        }
    }
}

#[tokio::test]
async fn a_users_third_request_is_refused_on_any_process() {
    let _beside_others = MACHINE.read().await;
    let Some(url) = redis_url() else { return };
    let prefix = fresh_prefix("per-user");
    let lease = Duration::from_secs(3);
    let second = Duration::from_secs(5);
    let mut agents = Vec::new();
    for _ in 0..3 {
        agents.push(Agent::start(&url, &prefix, "per_user", 2, lease, None).await);
    }
    agents[0].send("go ada 1").await;
    agents[0].expect("RUNNING 1", second).await;
    agents[1].send("go ada 2").await;
    agents[1].expect("RUNNING 2", second).await;
    // A third request of ada's, on the third process and on the first.
    agents[2].send("go ada 3").await;
    agents[2].expect("REFUSED 3 user_limit", second).await;
    agents[0].send("go ada 4").await;
    agents[0].expect("REFUSED 4 user_limit", second).await;
    // Bob has slots of his own.
    agents[2].send("go bob 5").await;
    agents[2].expect("RUNNING 5", second).await;
    // One of ada's ends: her next request runs, anywhere.
    agents[0].send("end 1").await;
    agents[0].expect("DONE 1", second).await;
    let ada = format!("{prefix}:u:h:s:ada");
    assert!(eventually(second, || zcard(&url, &ada) == 1)
        .await
        .is_some());
    agents[2].send("go ada 6").await;
    agents[2].expect("RUNNING 6", second).await;
    agents[1].send("go ada 7").await;
    agents[1].expect("REFUSED 7 user_limit", second).await;
    for (agent, id) in [(1, 2), (2, 5), (2, 6)] {
        agents[agent].send(&format!("end {id}")).await;
        agents[agent].expect(&format!("DONE {id}"), second).await;
    }
    assert!(eventually(second, || zcard(&url, &ada) == 0)
        .await
        .is_some());
}

#[tokio::test]
async fn in_wait_mode_a_users_third_request_waits_for_a_slot_on_another_process() {
    let _beside_others = MACHINE.read().await;
    let Some(url) = redis_url() else { return };
    let prefix = fresh_prefix("per-user-wait");
    let lease = Duration::from_secs(3);
    let second = Duration::from_secs(5);
    let mut agents = Vec::new();
    for _ in 0..3 {
        let wait = Some(Duration::from_secs(20));
        agents.push(Agent::start(&url, &prefix, "per_user", 2, lease, wait).await);
    }
    agents[0].send("go ada 1").await;
    agents[0].expect("RUNNING 1", second).await;
    agents[1].send("go ada 2").await;
    agents[1].expect("RUNNING 2", second).await;
    agents[2].send("go ada 3").await;
    assert!(
        !agents[2]
            .wait_for("RUNNING 3", Duration::from_millis(500))
            .await,
        "a third request of ada's ran"
    );
    assert_eq!(agents[2].stats().await.2, 1, "it waits");
    let ended = Instant::now();
    agents[0].send("end 1").await;
    agents[2].expect("RUNNING 3", second).await;
    let woken = ended.elapsed();
    println!("the waiting request ran {woken:?} after a slot freed on another process");
    assert!(
        woken < Duration::from_millis(500),
        "{woken:?}: not woken by the release"
    );
    agents[1].send("end 2").await;
    agents[2].send("end 3").await;
    agents[1].expect("DONE 2", second).await;
    agents[2].expect("DONE 3", second).await;
}

#[tokio::test]
async fn the_slots_of_a_killed_process_come_back_within_the_lease() {
    let _beside_others = MACHINE.read().await;
    let Some(url) = redis_url() else { return };
    let prefix = fresh_prefix("sigkill");
    let lease = Duration::from_secs(1);
    let second = Duration::from_secs(5);
    let mut holder = Agent::start(&url, &prefix, "queue", 3, lease, None).await;
    let mut other = Agent::start(
        &url,
        &prefix,
        "queue",
        3,
        lease,
        Some(Duration::from_secs(30)),
    )
    .await;
    for id in 1..=3 {
        holder.send(&format!("go u {id}")).await;
        holder.expect(&format!("RUNNING {id}"), second).await;
    }
    for id in 11..=12 {
        other.send(&format!("go u {id}")).await;
    }
    let waiting = tokio::time::Instant::now() + second;
    while other.stats().await.2 < 2 {
        assert!(
            tokio::time::Instant::now() < waiting,
            "the other process never waited"
        );
    }
    // Held past a few renewals first: the slots are the holder's as long as it lives.
    assert!(!other.wait_for("RUNNING 11", lease * 2).await);
    holder.child.start_kill().unwrap();
    let killed = Instant::now();
    holder.child.wait().await.unwrap();
    other.expect("RUNNING 11", lease * 3).await;
    other.expect("RUNNING 12", lease * 3).await;
    let back = killed.elapsed();
    println!("a killed process's slots came back after {back:?} (lease {lease:?})");
    assert!(back <= lease + Duration::from_millis(600), "{back:?}");
    // The others go on: the whole limit is theirs.
    other.send("go u 13").await;
    other.expect("RUNNING 13", second).await;
    assert_eq!(zcard(&url, &format!("{prefix}:q:h:a")), 3);
    for id in 11..=13 {
        other.send(&format!("end {id}")).await;
        other.expect(&format!("DONE {id}"), second).await;
    }
    let empty = tokio::time::Instant::now() + second;
    while zcard(&url, &format!("{prefix}:q:h:a")) != 0 {
        assert!(tokio::time::Instant::now() < empty, "slots left held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Outages, in one process: two layers on one store are two processes as far as Redis knows.

/// An upstream whose calls run until `end` is called with their number; tells when each starts.
#[derive(Clone, Default)]
struct Gates {
    open: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>,
    started: Arc<Mutex<Vec<u64>>>,
}

impl Gates {
    fn service(
        &self,
    ) -> impl Service<u64, Response = u64, Error = BoxError, Future = impl Send> + Clone + Send + 'static
    {
        let gates = self.clone();
        service_fn(move |id: u64| {
            let (tx, rx) = oneshot::channel();
            gates.open.lock().unwrap().insert(id, tx);
            gates.started.lock().unwrap().push(id);
            async move {
                let _ = rx.await;
                Ok::<_, BoxError>(id)
            }
        })
    }

    fn end(&self, id: u64) {
        if let Some(gate) = self.open.lock().unwrap().remove(&id) {
            let _ = gate.send(());
        }
    }

    fn started(&self, id: u64) -> bool {
        self.started.lock().unwrap().contains(&id)
    }
}

async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    check().then(|| started.elapsed())
}

#[tokio::test]
async fn redis_down_means_the_local_share_or_a_refusal_and_back_without_double_counting() {
    let _beside_others = MACHINE.read().await;
    if redis_url().is_none() {
        return;
    }
    let Some(server) = OwnRedis::start() else {
        panic!("redis-server could not be started for the outage test");
    };
    let port = server.port;
    let timeout = Duration::from_millis(200);
    let lease = Duration::from_millis(900);
    let prefix = fresh_prefix("outage");
    let store = RedisStore::new(&server.url, prefix.clone())
        .unwrap()
        .timeout(timeout)
        .lease_time(lease)
        .instances(2);
    let holders = format!("{prefix}:q:h:a");
    let gates = Gates::default();
    // A queue of 4 across two instances: the local share is 2.
    let layer = PriorityQueueLayer::new(4).store(store.clone());
    let leases = layer.lease_handle();
    let svc = ServiceBuilder::new().layer(layer).service(gates.service());
    let refusing = PerUserConcurrencyLayer::new(4, |_: &u64| "ada")
        .store(store.clone().on_failure(OnRedisFailure::Refuse));
    let strict = ServiceBuilder::new()
        .layer(refusing)
        .service(gates.service());

    let first = tokio::spawn(svc.clone().oneshot(1));
    assert!(eventually(Duration::from_secs(2), || gates.started(1))
        .await
        .is_some());
    assert_eq!(zcard(&server.url, &holders), 1);
    drop(server);

    // Down: the local share admits one more (it counts the slot held in Redis), then waits;
    // the refusing store refuses. Every decision within the timeout.
    let started = Instant::now();
    let second = tokio::spawn(svc.clone().oneshot(2));
    let admitted = eventually(timeout * 3, || gates.started(2)).await;
    println!(
        "with Redis down, a decision on the local share took {:?}",
        started.elapsed()
    );
    assert!(
        admitted.is_some_and(|t| t < timeout + Duration::from_millis(100)),
        "{admitted:?}"
    );
    let third = tokio::spawn(svc.clone().oneshot(3));
    let started = Instant::now();
    let err = strict.clone().oneshot(9).await.unwrap_err();
    assert!(
        started.elapsed() < timeout + Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        Rejected::find(&*err).map(|r| r.kind()),
        Some(RejectionKind::UserLimit)
    );
    assert!(err.to_string().contains("cannot be checked"), "{err}");
    assert!(!gates.started(3), "the local share of 2 is taken");
    let stats = leases.stats();
    assert_eq!(
        (stats.held, stats.held_locally, stats.local_share),
        (1, 1, 1)
    );

    // Back, and empty: the next renewal records both slots in Redis, the local share no
    // longer counts them, and the third request gets a slot from Redis.
    let restarted = Instant::now();
    let server = OwnRedis::start_on(port).expect("redis-server restarts");
    let recorded = eventually(Duration::from_secs(5), || {
        let s = leases.stats();
        s.held == 3 && s.held_locally == 0 && gates.started(3)
    })
    .await;
    println!(
        "after Redis restarted: slots recorded again and the waiting request admitted from \
         Redis within {:?}",
        restarted.elapsed()
    );
    assert!(recorded.is_some(), "{:?}", leases.stats());
    assert!(leases.stats().recorded_again >= 2);
    assert_eq!(
        zcard(&server.url, &holders),
        3,
        "no slot counted twice, none lost"
    );
    // The fourth slot is Redis's to give; a fifth request waits.
    let fourth = tokio::spawn(svc.clone().oneshot(4));
    assert!(eventually(Duration::from_secs(2), || gates.started(4))
        .await
        .is_some());
    let fifth = tokio::spawn(svc.clone().oneshot(5));
    assert!(eventually(Duration::from_millis(300), || gates.started(5))
        .await
        .is_none());
    assert_eq!(zcard(&server.url, &holders), 4);
    gates.end(1);
    assert!(eventually(Duration::from_secs(2), || gates.started(5))
        .await
        .is_some());
    for id in 2..=5 {
        gates.end(id);
    }
    for task in [first, second, third, fourth, fifth] {
        task.await.unwrap().unwrap();
    }
    assert!(
        eventually(Duration::from_secs(2), || zcard(&server.url, &holders) == 0)
            .await
            .is_some()
    );
    let stats = leases.stats();
    assert_eq!((stats.held, stats.held_locally, stats.scopes), (0, 0, 0));
}

#[tokio::test]
async fn the_body_holds_the_shared_slot_and_cancellation_or_a_panic_gives_it_back() {
    let _beside_others = MACHINE.read().await;
    let Some(url) = redis_url() else { return };
    let prefix = fresh_prefix("body");
    let holders = format!("{prefix}:q:h:a");
    let store = RedisStore::new(&url, prefix.clone()).unwrap();
    type Body = http_body_util::StreamBody<
        futures_util::stream::BoxStream<'static, Result<http_body::Frame<bytes::Bytes>, BoxError>>,
    >;
    let (tx, rx) = mpsc::unbounded_channel::<()>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let upstream = service_fn(move |panic: bool| {
        let rx = rx.clone();
        async move {
            if panic {
                panic!("the upstream panicked");
            }
            let stream = futures_util::stream::unfold(rx, |rx| async move {
                let more = rx.lock().await.recv().await;
                more.map(|_| (Ok(http_body::Frame::data(bytes::Bytes::from("x"))), rx))
            });
            let body: Body = http_body_util::StreamBody::new(Box::pin(stream));
            Ok::<_, BoxError>(http::Response::new(body))
        }
    });
    let layer = PriorityQueueLayer::new(1)
        .queue_timeout(Duration::from_secs(10))
        .store(store)
        .hold_until_body_end();
    let (queue, leases) = (layer.handle(), layer.lease_handle());
    let svc = ServiceBuilder::new().layer(layer).service(upstream);

    // Held while the body streams, given back when it ends.
    let response = svc.clone().oneshot(false).await.unwrap();
    let body: &tower_llm_queue::hold::HeldBody<Body> = response.body();
    assert!(body.is_holding());
    assert_eq!(zcard(&url, &holders), 1);
    tx.send(()).unwrap();
    drop(tx);
    let collected = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap();
    assert_eq!(collected.to_bytes(), "x");
    assert!(
        eventually(Duration::from_secs(2), || zcard(&url, &holders) == 0)
            .await
            .is_some()
    );

    // A dropped body gives it back too; so does a cancellation through the queue's handle.
    let response = svc.clone().oneshot(false).await.unwrap();
    assert_eq!(zcard(&url, &holders), 1);
    drop(response);
    assert!(
        eventually(Duration::from_secs(2), || zcard(&url, &holders) == 0)
            .await
            .is_some()
    );
    let call = svc.clone().call(false);
    let id = call.request_id();
    let response = call.await.unwrap();
    assert!(queue.cancel(id));
    let err = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap_err();
    assert_eq!(
        Rejected::find(&*err).map(|r| r.kind()),
        Some(RejectionKind::Cancelled)
    );
    assert!(
        eventually(Duration::from_secs(2), || zcard(&url, &holders) == 0)
            .await
            .is_some()
    );

    // A panic in the inner service.
    let panicked = tokio::spawn(svc.clone().oneshot(true)).await;
    assert!(panicked.is_err());
    assert!(
        eventually(Duration::from_secs(2), || zcard(&url, &holders) == 0)
            .await
            .is_some()
    );
    let stats = leases.stats();
    assert_eq!((stats.held, stats.scopes), (0, 0));
    assert_eq!(queue.stats().running, 0);
}

#[tokio::test]
async fn a_request_cancelled_while_it_waits_for_a_shared_slot_leaves_nothing() {
    let _beside_others = MACHINE.read().await;
    let Some(url) = redis_url() else { return };
    let prefix = fresh_prefix("cancel-waiting");
    let holders = format!("{prefix}:q:h:a");
    let gates = Gates::default();
    let store = RedisStore::new(&url, prefix.clone()).unwrap();
    // Two "processes": one holds the only slot, the other's request waits for it.
    let first = PriorityQueueLayer::new(1).store(store.clone());
    let second = PriorityQueueLayer::new(1).store(store);
    let (queue, leases) = (second.handle(), second.lease_handle());
    let a = ServiceBuilder::new().layer(first).service(gates.service());
    let mut b = ServiceBuilder::new().layer(second).service(gates.service());
    let held = tokio::spawn(a.oneshot(1));
    assert!(eventually(Duration::from_secs(2), || gates.started(1))
        .await
        .is_some());
    let call = b.call(2);
    let id = call.request_id();
    let waiting = tokio::spawn(call);
    assert!(
        eventually(Duration::from_secs(2), || leases.stats().waiting == 1)
            .await
            .is_some()
    );
    assert!(queue.cancel(id));
    let err = waiting.await.unwrap().unwrap_err();
    assert_eq!(
        Rejected::find(&*err).map(|r| r.kind()),
        Some(RejectionKind::Cancelled)
    );
    gates.end(1);
    held.await.unwrap().unwrap();
    let clean = eventually(Duration::from_secs(2), || {
        let s = leases.stats();
        zcard(&url, &holders) == 0 && s.waiting == 0 && s.scopes == 0
    })
    .await;
    assert!(clean.is_some(), "{:?}", leases.stats());
    assert!(!gates.started(2));
    let line: usize = zcard(&url, &format!("{prefix}:q:w:a"));
    assert_eq!(line, 0, "the process stayed in line");
}
