//! The lease scripts and the lease state, against the real Redis at `REDIS_URL` (default
//! `redis://127.0.0.1:6379`). Without a server these tests say so and pass, except under
//! `CI=true`, where they fail. Redis keeps its own clock: timings are checked by polling with a
//! deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::state::*;
use crate::key::Key;
use crate::store::{script, OnRedisFailure, RedisStore};
use crate::RejectionKind;

fn redis_url() -> Option<String> {
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

fn store(url: &str, test: &str) -> RedisStore {
    let prefix = format!(
        "tlq-lease:{test}:{}:{}",
        std::process::id(),
        fastrand::u64(..)
    );
    RedisStore::new(url, prefix)
        .unwrap()
        .on_failure(OnRedisFailure::Refuse)
}

fn connection(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .expect("a connection to Redis")
}

fn held(url: &str, store: &RedisStore) -> usize {
    redis::cmd("ZCARD")
        .arg(store.key("q:h:a"))
        .query(&mut connection(url))
        .unwrap()
}

fn refuse(limit: usize) -> Policy {
    Policy {
        limit,
        wait: false,
        timeout: None,
    }
}

fn wait(limit: usize, timeout: Duration) -> Policy {
    Policy {
        limit,
        wait: true,
        timeout: Some(timeout),
    }
}

/// Polls `check` every 10 ms until it holds, for at most `limit`; how long it took.
async fn within(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check().then(|| started.elapsed())
}

/// One run of the acquisition script, as a process named `owner` would send it.
async fn attempt(store: &RedisStore, owner: &str, id: &str, limit: usize, join: bool) -> Vec<i64> {
    let (h, w, x) = (store.key("q:h:a"), store.key("q:w:a"), store.key("q:x:a"));
    let lease = store.lease().as_micros().to_string();
    let limit = limit.to_string();
    let join = if join { "1" } else { "0" };
    store
        .run(
            script(&ACQUIRE_SCRIPT, ACQUIRE),
            &[&h, &w, &x],
            &[&limit, &lease, id, owner, &lease, join],
        )
        .await
        .unwrap()
}

async fn release(store: &RedisStore, id: &str) -> i64 {
    let (h, w) = (store.key("q:h:a"), store.key("q:w:a"));
    let channel = store.key("q:freed");
    store
        .run(
            script(&RELEASE_SCRIPT, RELEASE),
            &[&h, &w],
            &[id, &channel, "a"],
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn slots_up_to_the_limit_then_refusals_then_releases() {
    let Some(url) = redis_url() else { return };
    let store = store(&url, "limit");
    let state = Arc::new(LeaseState::new(store.clone(), Kind::Queue));
    let key = Key::anonymous();
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(state.acquire(&key, refuse(3)).await.unwrap());
    }
    assert_eq!(held(&url, &store), 3);
    let refused = state.acquire(&key, refuse(3)).await.unwrap_err();
    assert_eq!(refused.kind(), RejectionKind::QueueFull);
    leases.pop();
    assert!(within(Duration::from_secs(2), || held(&url, &store) == 2)
        .await
        .is_some());
    leases.push(state.acquire(&key, refuse(3)).await.unwrap());
    drop(leases);
    assert!(within(Duration::from_secs(2), || held(&url, &store) == 0)
        .await
        .is_some());
    let stats = state.stats();
    assert_eq!(
        (stats.held, stats.scopes, stats.acquired, stats.refused),
        (0, 0, 4, 1)
    );
}

#[tokio::test]
async fn a_flushed_store_has_given_every_slot_back() {
    let Some(url) = redis_url() else { return };
    let store = store(&url, "flush");
    // Nothing sent: at once.
    store.flush().await;
    let state = Arc::new(LeaseState::new(store.scope("x"), Kind::Queue));
    let key = Key::anonymous();
    let mut leases = Vec::new();
    for _ in 0..20 {
        leases.push(state.acquire(&key, refuse(20)).await.unwrap());
    }
    assert_eq!(held(&url, &store.scope("x")), 20);
    // Given back in the background; the flush of the store they were scoped from waits for
    // every release, so nothing is left held the moment it returns.
    drop(leases);
    store.flush().await;
    assert_eq!(held(&url, &store.scope("x")), 0);
}

#[tokio::test]
async fn a_lease_nobody_renews_expires_and_one_renewed_does_not() {
    let Some(url) = redis_url() else { return };
    let lease_time = Duration::from_millis(400);
    let store = store(&url, "expiry").lease_time(lease_time);
    // A process that died holding a slot: its lease is never renewed.
    assert_eq!(attempt(&store, "dead", "1", 1, false).await[0], 1);
    let started = Instant::now();
    let state = Arc::new(LeaseState::new(store.clone(), Kind::Queue));
    let key = Key::anonymous();
    let lease = state
        .acquire(&key, wait(1, Duration::from_secs(5)))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= lease_time - Duration::from_millis(50) && waited < lease_time * 3,
        "the dead process's slot came back after {waited:?} for a lease of {lease_time:?}"
    );
    // Held for five lease times, renewed every third of one: still ours.
    tokio::time::sleep(lease_time * 5).await;
    assert_eq!(attempt(&store, "other", "2", 1, false).await[0], 0);
    assert_eq!(state.stats().held, 1);
    drop(lease);
    assert!(within(Duration::from_secs(2), || held(&url, &store) == 0)
        .await
        .is_some());
}

#[tokio::test]
async fn freed_slots_go_to_the_processes_in_line_in_turn() {
    let Some(url) = redis_url() else { return };
    let store = store(&url, "line");
    assert_eq!(attempt(&store, "a", "1", 1, true).await[0], 1);
    // B, then C, find the slot taken and join the line.
    assert_eq!(attempt(&store, "b", "2", 1, true).await[0], 0);
    assert_eq!(attempt(&store, "c", "3", 1, true).await[0], 0);
    assert_eq!(release(&store, "1").await, 1);
    // C asks first, but B is ahead of it.
    assert_eq!(attempt(&store, "c", "3", 1, true).await[0], 0);
    // A newcomer is behind both.
    assert_eq!(attempt(&store, "d", "4", 1, false).await[0], 0);
    assert_eq!(attempt(&store, "b", "2", 1, true).await[0], 1);
    assert_eq!(release(&store, "2").await, 1);
    // A comes back for more: behind C.
    assert_eq!(attempt(&store, "a", "5", 1, true).await[0], 0);
    assert_eq!(attempt(&store, "c", "3", 1, true).await[0], 1);
    assert_eq!(release(&store, "3").await, 1);
    assert_eq!(attempt(&store, "a", "5", 1, true).await[0], 1);
    assert_eq!(release(&store, "5").await, 1);
    assert_eq!(
        release(&store, "5").await,
        0,
        "a second release changes nothing"
    );
}

#[tokio::test]
async fn a_process_that_leaves_the_line_lets_the_next_one_go() {
    let Some(url) = redis_url() else { return };
    let store = store(&url, "leave");
    assert_eq!(attempt(&store, "a", "1", 1, true).await[0], 1);
    assert_eq!(attempt(&store, "b", "2", 1, true).await[0], 0);
    assert_eq!(attempt(&store, "c", "3", 1, true).await[0], 0);
    assert_eq!(release(&store, "1").await, 1);
    let (w, x) = (store.key("q:w:a"), store.key("q:x:a"));
    let channel = store.key("q:freed");
    let left: i64 = store
        .run(
            script(&LEAVE_SCRIPT, LEAVE),
            &[&w, &x],
            &["b", &channel, "a"],
        )
        .await
        .unwrap();
    assert_eq!(left, 1);
    assert_eq!(attempt(&store, "c", "3", 1, true).await[0], 1);
}

#[tokio::test]
async fn waiting_processes_take_freed_slots_in_turns() {
    let Some(url) = redis_url() else { return };
    let store = store(&url, "turns");
    let key = Key::anonymous();
    // Three "processes" (one state each), each with four requests waiting for one slot.
    let states: Vec<_> = (0..3)
        .map(|_| Arc::new(LeaseState::new(store.clone(), Kind::Queue)))
        .collect();
    let first = states[0].acquire(&key, refuse(1)).await.unwrap();
    let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (n, state) in states.iter().enumerate() {
        for _ in 0..4 {
            let (state, key, order_tx) = (state.clone(), key.clone(), order_tx.clone());
            tasks.push(tokio::spawn(async move {
                let lease = state
                    .acquire(&key, wait(1, Duration::from_secs(20)))
                    .await
                    .unwrap();
                order_tx.send(n).unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(lease);
            }));
        }
    }
    // Every process has joined the line before the slot frees.
    let joined = within(Duration::from_secs(5), || {
        let line: usize = redis::cmd("ZCARD")
            .arg(store.key("q:w:a"))
            .query(&mut connection(&url))
            .unwrap();
        line == 3
    })
    .await;
    assert!(joined.is_some(), "the three processes joined the line");
    drop(first);
    for task in tasks {
        task.await.unwrap();
    }
    drop(order_tx);
    let mut grants = Vec::new();
    while let Some(n) = order.recv().await {
        grants.push(n);
    }
    assert_eq!(grants.len(), 12);
    // Turns: in every three grants in a row, each process has one.
    for turn in grants.chunks(3) {
        let mut turn = turn.to_vec();
        turn.sort_unstable();
        assert_eq!(turn, [0, 1, 2], "grants in order: {grants:?}");
    }
    assert!(within(Duration::from_secs(2), || held(&url, &store) == 0)
        .await
        .is_some());
    for state in &states {
        assert_eq!(state.stats().scopes, 0);
    }
}

#[tokio::test]
async fn dropped_requests_and_attempts_leave_nothing_behind() {
    let Some(url) = redis_url() else { return };
    let store = store(&url, "drops");
    let state = Arc::new(LeaseState::new(store.clone(), Kind::Queue));
    let key = Key::anonymous();
    let held_one = state.acquire(&key, refuse(1)).await.unwrap();
    let mut tasks = Vec::new();
    for n in 0..40u64 {
        let (state, key) = (state.clone(), key.clone());
        let task = tokio::spawn(async move {
            let _ = state.acquire(&key, wait(1, Duration::from_secs(20))).await;
        });
        if n % 2 == 0 {
            tokio::task::yield_now().await;
        }
        tasks.push(task);
    }
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    drop(held_one);
    let (line, expiry) = (store.key("q:w:a"), store.key("q:x:a"));
    let clean = within(Duration::from_secs(3), || {
        let mut c = connection(&url);
        let keys: usize = redis::cmd("EXISTS")
            .arg(store.key("q:h:a"))
            .arg(&line)
            .arg(&expiry)
            .query(&mut c)
            .unwrap();
        keys == 0
    })
    .await;
    assert!(
        clean.is_some(),
        "slots or places in line were left in Redis"
    );
    let stats = state.stats();
    assert_eq!((stats.held, stats.waiting, stats.scopes), (0, 0, 0));
}

#[tokio::test]
async fn a_user_over_the_limit_is_refused_or_waits() {
    let Some(url) = redis_url() else { return };
    let store = store(&url, "users");
    let a = Arc::new(LeaseState::new(store.clone(), Kind::PerUser));
    let b = Arc::new(LeaseState::new(store.clone(), Kind::PerUser));
    let (ada, bob) = (Key::from("ada"), Key::from("bob"));
    let one = a.acquire(&ada, refuse(2)).await.unwrap();
    let two = a.acquire(&ada, refuse(2)).await.unwrap();
    let err = b.acquire(&ada, refuse(2)).await.unwrap_err();
    assert_eq!(err.kind(), RejectionKind::UserLimit);
    // Another user has slots of their own.
    let _bob = b.acquire(&bob, refuse(2)).await.unwrap();
    // In wait mode, the third request gets the first slot freed on the other process.
    let waiting = tokio::spawn({
        let (b, ada) = (b.clone(), ada.clone());
        async move { b.acquire(&ada, wait(2, Duration::from_secs(10))).await }
    });
    assert!(within(Duration::from_secs(2), || b.stats().waiting == 1)
        .await
        .is_some());
    let started = Instant::now();
    drop(one);
    let third = waiting.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "woken by the release"
    );
    drop((two, third));
    let err = b
        .acquire(&ada, wait(0, Duration::from_millis(50)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), RejectionKind::UserLimit);
}

#[tokio::test]
async fn a_process_that_dies_in_line_holds_the_others_back_no_longer_than_a_lease() {
    let Some(url) = redis_url() else { return };
    let lease_time = Duration::from_millis(400);
    let store = store(&url, "dead-in-line").lease_time(lease_time);
    assert_eq!(attempt(&store, "a", "1", 1, true).await[0], 1);
    // "dead" joins the line first, then never asks again.
    assert_eq!(attempt(&store, "dead", "2", 1, true).await[0], 0);
    let joined = Instant::now();
    let behind = attempt(&store, "b", "3", 1, true).await;
    assert_eq!(behind[0], 0);
    assert!(
        Duration::from_micros(behind[1] as u64) <= lease_time,
        "the hint says when the place ahead ends"
    );
    assert_eq!(release(&store, "1").await, 1);
    assert_eq!(
        attempt(&store, "b", "3", 1, true).await[0],
        0,
        "dead is ahead"
    );
    let deadline = Instant::now() + lease_time * 3;
    loop {
        if attempt(&store, "b", "3", 1, true).await[0] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead process's place never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waited = joined.elapsed();
    assert!(
        waited >= lease_time - Duration::from_millis(50),
        "b went ahead after {waited:?}"
    );
}
