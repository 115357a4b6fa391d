use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::sleep;
use tower::{service_fn, BoxError, Service, ServiceBuilder};

use super::*;
use crate::{Rejected, RejectionKind};

#[derive(Debug, Clone)]
struct Job {
    label: String,
    user: String,
    level: u8,
    work: Duration,
}

fn job(label: &str, user: &str, level: u8) -> Job {
    Job {
        label: label.into(),
        user: user.into(),
        level,
        work: Duration::from_secs(1),
    }
}

type Log = Arc<Mutex<Vec<String>>>;

/// An upstream that logs the order of calls and takes `work` to answer.
fn upstream(
    log: Log,
) -> impl Service<Job, Response = String, Error = BoxError, Future = impl Send> + Clone {
    service_fn(move |job: Job| {
        log.lock().unwrap().push(job.label.clone());
        async move {
            sleep(job.work).await;
            Ok::<_, BoxError>(job.label)
        }
    })
}

fn kind(err: &BoxError) -> RejectionKind {
    Rejected::find(&**err).expect("a rejection").kind()
}

/// Calls in order (arrival order is call order), then waits for every answer.
async fn run_all<S>(svc: &mut S, jobs: Vec<Job>) -> Vec<Result<String, BoxError>>
where
    S: Service<Job, Response = String, Error = BoxError>,
    S::Future: Send + 'static,
{
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|j| tokio::spawn(svc.call(j)))
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// A service that answers `n` after `n % 10` seconds.
fn sleeps_for_its_number() -> impl Service<
    u64,
    Response = u64,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<u64, BoxError>> + Send,
> + Clone
       + Send {
    service_fn(|n: u64| async move {
        sleep(Duration::from_secs(n % 10)).await;
        Ok::<_, BoxError>(n)
    })
}

/// Asserts that `err` refuses a request because its id `id` is in use.
fn assert_id_in_use(err: &BoxError, id: u64) {
    assert_eq!(kind(err), RejectionKind::MissingKey);
    let message = err.to_string();
    assert!(
        message.contains(&format!("request id {id} is already in use")),
        "{message}"
    );
}

fn logged(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

#[tokio::test(start_paused = true)]
async fn higher_levels_first_and_fifo_within_a_level() {
    let log = Log::default();
    let layer = PriorityQueueLayer::new(1)
        .longest_waiting_every(0)
        .priority(|j: &Job| j.level);
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(log.clone()));
    let jobs = vec![
        job("first", "u", 3),
        job("low-a", "u", 3),
        job("high-a", "u", 1),
        job("mid", "u", 2),
        job("high-b", "u", 1),
        job("low-b", "u", 3),
        job("high-c", "u", 1),
    ];
    for r in run_all(&mut svc, jobs).await {
        r.unwrap();
    }
    assert_eq!(
        logged(&log),
        ["first", "high-a", "high-b", "high-c", "mid", "low-a", "low-b"]
    );
}

#[tokio::test(start_paused = true)]
async fn out_of_range_levels_are_clamped() {
    let log = Log::default();
    let layer = PriorityQueueLayer::new(1)
        .levels(3)
        .longest_waiting_every(0)
        .priority(|j: &Job| j.level);
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(log.clone()));
    let running = tokio::spawn(svc.call(job("first", "u", 1)));
    let a = tokio::spawn(svc.call(job("two-hundred", "u", 200)));
    let b = tokio::spawn(svc.call(job("zero", "u", 0)));
    tokio::task::yield_now().await;
    assert_eq!(handle.stats().waiting_per_level, vec![1, 0, 1]);
    for h in [running, a, b] {
        h.await.unwrap().unwrap();
    }
    assert_eq!(logged(&log), ["first", "zero", "two-hundred"]);
}

#[tokio::test(start_paused = true)]
async fn a_burst_cannot_starve_other_users() {
    let log = Log::default();
    let layer = PriorityQueueLayer::new(1)
        .capacity(10_000)
        .fair_by(|j: &Job| j.user.clone());
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(log.clone()));
    let mut jobs: Vec<Job> = (0..100).map(|n| job(&format!("A{n}"), "A", 5)).collect();
    for user in ["B", "C", "D", "E", "F", "G", "H", "I", "J"] {
        jobs.extend((0..10).map(|n| job(&format!("{user}{n}"), user, 5)));
    }
    for r in run_all(&mut svc, jobs).await {
        r.unwrap();
    }
    let order = logged(&log);
    let first_users: std::collections::HashSet<char> = order[..10]
        .iter()
        .map(|l| l.chars().next().unwrap())
        .collect();
    assert_eq!(first_users.len(), 10, "first ten: {:?}", &order[..10]);
    // Every user's requests stay in their own arrival order.
    let a_order: Vec<&String> = order.iter().filter(|l| l.starts_with('A')).collect();
    let expected: Vec<String> = (0..100).map(|n| format!("A{n}")).collect();
    assert!(a_order.iter().zip(&expected).all(|(a, b)| *a == b));
}

#[tokio::test(start_paused = true)]
async fn requests_admitted_at_once_still_take_their_users_turns() {
    let log = Log::default();
    let layer = PriorityQueueLayer::new(2).fair_by(|j: &Job| j.user.clone());
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(log.clone()));
    let mut call = |label: &str, user: &str, secs: u64| {
        let mut j = job(label, user, 5);
        j.work = Duration::from_secs(secs);
        tokio::spawn(svc.call(j))
    };
    // A takes both slots at once, while nobody waits.
    let running = [call("A0", "A", 1), call("A1", "A", 10)];
    tokio::task::yield_now().await;
    // Then A and B each queue a request, A first. When A0's slot frees, B goes first: A has a
    // request running, and had two turns already.
    let waiting = [call("A2", "A", 1), call("B0", "B", 1)];
    for h in running.into_iter().chain(waiting) {
        h.await.unwrap().unwrap();
    }
    assert_eq!(logged(&log), ["A0", "A1", "B0", "A2"]);
    let stats = handle.stats();
    assert_eq!((stats.running, stats.waiting, stats.users), (0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn users_running_at_once_are_counted_while_nobody_waits() {
    let layer = PriorityQueueLayer::new(4).fair_by(|j: &Job| j.user.clone());
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(Log::default()));
    let running: Vec<_> = [("A0", "A"), ("A1", "A"), ("B0", "B")]
        .into_iter()
        .map(|(label, user)| tokio::spawn(svc.call(job(label, user, 5))))
        .collect();
    tokio::task::yield_now().await;
    let stats = handle.stats();
    assert_eq!((stats.running, stats.waiting, stats.users), (3, 0, 2));
    for h in running {
        h.await.unwrap().unwrap();
    }
    assert_eq!(handle.stats().users, 0);
}

#[tokio::test(start_paused = true)]
async fn a_late_user_waits_at_most_one_turn() {
    let log = Log::default();
    let layer = PriorityQueueLayer::new(1).fair_by(|j: &Job| j.user.clone());
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(log.clone()));
    let burst: Vec<_> = (0..50)
        .map(|n| tokio::spawn(svc.call(job(&format!("A{n}"), "A", 5))))
        .collect();
    // Ten of A's requests have run when B arrives.
    sleep(Duration::from_millis(9_500)).await;
    let late = tokio::spawn(svc.call(job("B0", "B", 5)));
    late.await.unwrap().unwrap();
    let order = logged(&log);
    let b_at = order.iter().position(|l| l == "B0").unwrap();
    assert!(b_at <= 11, "B ran {b_at}th: {order:?}");
    for h in burst {
        h.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn full_queue_refuses_at_once_with_an_estimate() {
    let log = Log::default();
    let layer = PriorityQueueLayer::new(1).capacity(2);
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(log.clone()));
    let two_seconds = |label: &str| Job {
        work: Duration::from_secs(2),
        ..job(label, "u", 5)
    };
    let first = tokio::spawn(svc.call(two_seconds("1")));
    let queued: Vec<_> = (0..2)
        .map(|n| tokio::spawn(svc.call(two_seconds(&n.to_string()))))
        .collect();
    let before = tokio::time::Instant::now();
    let err = svc.call(job("x", "u", 5)).await.unwrap_err();
    assert_eq!(before.elapsed(), Duration::ZERO);
    assert_eq!(kind(&err), RejectionKind::QueueFull);
    let rejected = Rejected::find(&*err).unwrap();
    // Nothing finished yet: the estimate falls back to one second of service time, and a place
    // frees when the running request ends.
    assert_eq!(rejected.retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(handle.stats().rejected, 1);
    first.await.unwrap().unwrap();
    for q in queued {
        q.await.unwrap().unwrap();
    }
    // With service times known (2 s each), the estimate follows them.
    let _blocker = tokio::spawn(svc.call(Job {
        work: Duration::from_secs(60),
        ..job("long", "u", 5)
    }));
    let _q: Vec<_> = (0..2)
        .map(|n| tokio::spawn(svc.call(job(&n.to_string(), "u", 5))))
        .collect();
    tokio::task::yield_now().await;
    let err = svc.call(job("x", "u", 5)).await.unwrap_err();
    let rejected = Rejected::find(&*err).unwrap();
    assert_eq!(rejected.retry_after(), Some(Duration::from_secs(2)));
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_says_when_a_place_frees_not_when_it_drains() {
    // One running, a hundred waiting, each taking a second: a place frees every second.
    let log = Log::default();
    let layer = PriorityQueueLayer::new(1).capacity(100);
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(log.clone()));
    let _running: Vec<_> = (0..101)
        .map(|n| tokio::spawn(svc.call(job(&n.to_string(), "u", 5))))
        .collect();
    tokio::task::yield_now().await;
    let err = svc.call(job("x", "u", 5)).await.unwrap_err();
    let retry_after = Rejected::find(&*err).unwrap().retry_after().unwrap();
    assert!(retry_after <= Duration::from_secs(1), "{retry_after:?}");
    sleep(retry_after).await;
    tokio::task::yield_now().await;
    let admitted = tokio::spawn(svc.call(job("y", "u", 5)));
    tokio::task::yield_now().await;
    assert!(!admitted.is_finished(), "queued, not refused");
    // With concurrency 4, four requests end per service time.
    let layer = PriorityQueueLayer::new(4).capacity(8);
    let mut svc = ServiceBuilder::new().layer(layer).service(upstream(log));
    let _running: Vec<_> = (0..12)
        .map(|n| tokio::spawn(svc.call(job(&n.to_string(), "u", 5))))
        .collect();
    tokio::task::yield_now().await;
    let err = svc.call(job("x", "u", 5)).await.unwrap_err();
    let retry_after = Rejected::find(&*err).unwrap().retry_after().unwrap();
    assert_eq!(retry_after, Duration::from_millis(250));
}

#[test]
fn a_request_can_be_queued_outside_a_runtime() {
    let layer = PriorityQueueLayer::new(1).queue_timeout(Duration::from_secs(5));
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|n: u32| async move { Ok::<_, BoxError>(n) }));
    // Built without a runtime: the second waits, and its timer starts only when polled.
    let first = svc.call(1);
    let second = svc.call(2);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async move {
        assert_eq!(first.await.unwrap(), 1);
        assert_eq!(second.await.unwrap(), 2);
    });
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_takes_a_request_out() {
    let log = Log::default();
    let layer = PriorityQueueLayer::new(1).queue_timeout(Duration::from_secs(5));
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(log.clone()));
    let long = tokio::spawn(svc.call(Job {
        work: Duration::from_secs(10),
        ..job("long", "u", 5)
    }));
    let started = tokio::time::Instant::now();
    let err = svc.call(job("late", "u", 5)).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::QueueTimeout);
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    let stats = handle.stats();
    assert_eq!((stats.waiting, stats.timed_out, stats.running), (0, 1, 1));
    long.await.unwrap().unwrap();
    assert_eq!(logged(&log), ["long"]);
    assert_eq!(handle.stats().running, 0);
}

struct DropFlag(Arc<Mutex<bool>>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        *self.0.lock().unwrap() = true;
    }
}

#[tokio::test(start_paused = true)]
async fn cancel_by_id_queued_and_running() {
    let dropped = Arc::new(Mutex::new(false));
    let flag = dropped.clone();
    let layer = PriorityQueueLayer::new(1);
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |secs: u64| {
            let guard = DropFlag(flag.clone());
            async move {
                sleep(Duration::from_secs(secs)).await;
                drop(guard);
                Ok::<_, BoxError>(secs)
            }
        }));
    let running = svc.call(100);
    let running_id = running.request_id();
    let running = tokio::spawn(running);
    let queued = svc.call(1);
    let queued_id = queued.request_id();
    let queued = tokio::spawn(queued);
    let after = tokio::spawn(svc.call(2));
    tokio::task::yield_now().await;

    let entries = handle.entries();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0].id, running_id);
    assert_eq!(entries[0].state, EntryState::Running);
    assert_eq!(entries[1].state, EntryState::Queued);

    assert!(handle.cancel(queued_id));
    assert!(!handle.cancel(queued_id));
    let err = queued.await.unwrap().unwrap_err();
    assert_eq!(kind(&err), RejectionKind::Cancelled);
    assert_eq!(handle.stats().waiting, 1);

    sleep(Duration::from_secs(1)).await;
    assert!(handle.cancel(running_id));
    let err = running.await.unwrap().unwrap_err();
    assert_eq!(kind(&err), RejectionKind::Cancelled);
    assert!(*dropped.lock().unwrap(), "the inner future was dropped");
    // The slot went to the next request at once.
    assert_eq!(after.await.unwrap().unwrap(), 2);
    let stats = handle.stats();
    assert_eq!(stats.cancelled, 2);
    assert_eq!(stats.completed, 1);
    assert_eq!((stats.running, stats.waiting), (0, 0));
    assert!(!handle.cancel(RequestId::from_u64(u64::MAX)));
}

#[tokio::test(start_paused = true)]
async fn a_request_that_waited_runs_with_its_wait_and_passes_on_a_clean_hand_off() {
    let layer = PriorityQueueLayer::new(1);
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|secs: u64| async move {
            sleep(Duration::from_secs(secs)).await;
            Ok::<_, BoxError>(secs)
        }));
    let state_of = |id: RequestId| {
        let entry = handle.entries().into_iter().find(|e| e.id == id).unwrap();
        (entry.state, entry.waited)
    };
    // Each round: one request runs 10 s while the next waits; the one that waited then runs
    // with its wait, and ends, leaving its hand-off for the next round's waiting request.
    let mut running = tokio::spawn(svc.call(10));
    for round in 0..3u64 {
        let waiting = svc.call(10);
        let id = waiting.request_id();
        let waiting = tokio::spawn(waiting);
        sleep(Duration::from_secs(4)).await;
        assert_eq!(state_of(id), (EntryState::Queued, Duration::from_secs(4)));
        sleep(Duration::from_secs(6)).await;
        running.await.unwrap().unwrap();
        tokio::task::yield_now().await;
        sleep(Duration::from_secs(1)).await;
        // Each round starts a second later in the running request's 10 s than the one before.
        let waited = Duration::from_secs(10 - round);
        assert_eq!(state_of(id), (EntryState::Running, waited));
        if round == 2 {
            assert!(
                handle.cancel(id),
                "a running request that waited is cancelled"
            );
            let err = waiting.await.unwrap().unwrap_err();
            assert_eq!(kind(&err), RejectionKind::Cancelled);
            break;
        }
        running = waiting;
    }
    let stats = handle.stats();
    assert_eq!((stats.completed, stats.cancelled), (3, 1));
    assert_eq!((stats.running, stats.waiting), (0, 0));
    assert!(handle.entries().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_request_cancelled_while_it_waited_ends_nothing_of_the_next_with_its_id() {
    // Ids come with the requests, so a client may send an id again once its request has left.
    let layer = PriorityQueueLayer::new(1).request_id(|n: &mut u64| RequestId::from_u64(*n));
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|n: u64| async move {
            sleep(Duration::from_secs(10)).await;
            Ok::<_, BoxError>(n)
        }));
    let running = tokio::spawn(svc.call(1));
    tokio::task::yield_now().await;
    // Cancelled while it waits, and not polled since: it is still alive when id 2 comes again.
    let cancelled = svc.call(2);
    assert!(handle.cancel(RequestId::from_u64(2)));
    let again = tokio::spawn(svc.call(2));
    tokio::task::yield_now().await;
    drop(cancelled);
    let stats = handle.stats();
    assert_eq!((stats.running, stats.waiting), (1, 1), "{stats:?}");
    let entries = handle.entries();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[1].state, EntryState::Queued);
    assert_eq!(running.await.unwrap().unwrap(), 1);
    assert_eq!(again.await.unwrap().unwrap(), 2);
    let stats = handle.stats();
    assert_eq!((stats.completed, stats.cancelled), (2, 1), "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn lowest_level_still_progresses() {
    for (every, at_most) in [(10u32, 10usize), (0, 51)] {
        let log = Log::default();
        let layer = PriorityQueueLayer::new(1)
            .longest_waiting_every(every)
            .priority(|j: &Job| j.level);
        let mut svc = ServiceBuilder::new()
            .layer(layer)
            .service(upstream(log.clone()));
        let mut jobs = vec![job("first", "u", 1), job("low", "u", 5)];
        jobs.extend((0..50).map(|n| job(&format!("high{n}"), "u", 1)));
        for r in run_all(&mut svc, jobs).await {
            r.unwrap();
        }
        let at = logged(&log).iter().position(|l| l == "low").unwrap();
        assert!(at <= at_most, "every {every}: low ran {at}th");
        if every == 0 {
            assert_eq!(at, 51, "strict priority runs it last");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn stats_and_entries_serialize() {
    let layer = PriorityQueueLayer::new(1).fair_by(|j: &Job| j.user.clone());
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(Log::default()));
    let a = tokio::spawn(svc.call(job("a", "ada", 2)));
    let b = tokio::spawn(svc.call(job("b", "bob", 2)));
    sleep(Duration::from_millis(500)).await;
    let entries = serde_json::to_value(handle.entries()).unwrap();
    assert_eq!(entries[1]["user"], "bob");
    assert_eq!(entries[1]["state"], "queued");
    assert_eq!(entries[1]["level"], 5);
    assert_eq!(entries[1]["waited_ms"], 500.0);
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    let stats = serde_json::to_value(handle.stats()).unwrap();
    assert_eq!(stats["completed"], 2);
    assert_eq!(stats["wait_p99_ms"], 1000.0);
    assert_eq!(stats["users"], 0);
}

#[tokio::test(start_paused = true)]
async fn a_missing_user_key_is_refused_when_asked() {
    let layer =
        PriorityQueueLayer::new(1).fair_by(crate::key::HeaderKey::new("x-user").or_reject());
    let mut svc =
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|_: http::Request<()>| async {
                Ok::<_, BoxError>(())
            }));
    let err = svc.call(http::Request::new(())).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::MissingKey);
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_request_id_is_refused() {
    let layer = PriorityQueueLayer::new(2).request_id(|_: &mut u64| RequestId::from_u64(7));
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(sleeps_for_its_number());
    let first = tokio::spawn(svc.call(5));
    assert_id_in_use(&svc.call(1).await.unwrap_err(), 7);
    assert_eq!(first.await.unwrap().unwrap(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_of_a_waiting_request_is_refused_and_leaves_the_queue_as_it_was() {
    let layer = PriorityQueueLayer::new(1)
        .fair_by(|n: &u64| *n % 2)
        .request_id(|n: &mut u64| RequestId::from_u64(*n % 10));
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|n: u64| async move {
            sleep(Duration::from_secs(1)).await;
            Ok::<_, BoxError>(n)
        }));
    let running = tokio::spawn(svc.call(1));
    let waiting = tokio::spawn(svc.call(2));
    tokio::task::yield_now().await;
    assert_id_in_use(&svc.call(12).await.unwrap_err(), 2);
    let stats = handle.stats();
    assert_eq!(
        (stats.running, stats.waiting, stats.rejected),
        (1, 1, 1),
        "{stats:?}"
    );
    assert_eq!(handle.entries().len(), 2);
    assert_eq!(running.await.unwrap().unwrap(), 1);
    assert_eq!(waiting.await.unwrap().unwrap(), 2);
    let stats = handle.stats();
    assert_eq!(
        (stats.running, stats.waiting, stats.completed),
        (0, 0, 2),
        "{stats:?}"
    );
    assert_eq!(stats.users, 0, "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn a_request_that_must_wait_is_refused_the_id_of_one_admitted_at_once() {
    let layer = PriorityQueueLayer::new(1).request_id(|_: &mut u64| RequestId::from_u64(7));
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(sleeps_for_its_number());
    let first = tokio::spawn(svc.call(5));
    tokio::task::yield_now().await;
    assert_id_in_use(&svc.call(1).await.unwrap_err(), 7);
    let stats = handle.stats();
    assert_eq!(
        (stats.running, stats.waiting, stats.rejected),
        (1, 0, 1),
        "{stats:?}"
    );
    assert_eq!(handle.entries().len(), 1);
    assert_eq!(first.await.unwrap().unwrap(), 5);
    assert_eq!(
        svc.call(1).await.unwrap(),
        1,
        "the id is free once it ended"
    );
    let stats = handle.stats();
    assert_eq!((stats.running, stats.completed), (0, 2), "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn a_request_admitted_at_once_is_refused_the_id_of_one_that_waited_and_runs() {
    // Ids: the request's number, except 12, which takes the id of 2.
    let layer = PriorityQueueLayer::new(2).request_id(|n: &mut u64| RequestId::from_u64(*n % 10));
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(sleeps_for_its_number());
    let long = tokio::spawn(svc.call(9));
    let short = tokio::spawn(svc.call(1));
    tokio::task::yield_now().await;
    let waited = tokio::spawn(svc.call(2));
    tokio::task::yield_now().await;
    assert_eq!(handle.stats().waiting, 1);
    assert_eq!(short.await.unwrap().unwrap(), 1);
    // At 1 s the request of id 2 runs, after waiting; a slot is free, nobody waits.
    tokio::task::yield_now().await;
    let stats = handle.stats();
    assert_eq!((stats.running, stats.waiting), (2, 0), "{stats:?}");
    assert_id_in_use(&svc.call(12).await.unwrap_err(), 2);
    assert_eq!(waited.await.unwrap().unwrap(), 2);
    assert_eq!(
        svc.call(12).await.unwrap(),
        12,
        "the id is free once it ended"
    );
    assert_eq!(long.await.unwrap().unwrap(), 9);
    let stats = handle.stats();
    assert_eq!((stats.rejected, stats.completed), (1, 4), "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn inner_errors_pass_through_untouched() {
    #[derive(Debug)]
    struct Upstream;
    impl std::fmt::Display for Upstream {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("upstream said no")
        }
    }
    impl std::error::Error for Upstream {}
    let layer = PriorityQueueLayer::new(1);
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|_: ()| async { Err::<(), _>(Upstream) }));
    let err = svc.call(()).await.unwrap_err();
    assert!(err.is::<Upstream>());
    assert_eq!(handle.stats().failed, 1);
}

#[tokio::test(start_paused = true)]
async fn only_the_owner_cancels_by_id() {
    let log = Log::default();
    let layer = PriorityQueueLayer::new(1).fair_by(|j: &Job| j.user.clone());
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(log.clone()));
    let running = svc.call(job("r", "ada", 5));
    let queued = svc.call(job("q", "ada", 5));
    let bob = crate::Key::from("bob");
    let ada = crate::Key::from("ada");
    assert!(!handle.cancel_owned(running.request_id(), &bob));
    assert!(!handle.cancel_owned(queued.request_id(), &bob));
    assert_eq!(handle.entries().len(), 2);
    assert!(handle.cancel_owned(queued.request_id(), &ada));
    assert_eq!(kind(&queued.await.unwrap_err()), RejectionKind::Cancelled);
    assert!(handle.cancel_owned(running.request_id(), &ada));
    assert_eq!(kind(&running.await.unwrap_err()), RejectionKind::Cancelled);

    // A queue that knows no users knows no owners.
    let layer = PriorityQueueLayer::new(1);
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new().layer(layer).service(upstream(log));
    let call = svc.call(job("x", "ada", 5));
    assert!(!handle.cancel_owned(call.request_id(), &ada));
    assert!(handle.cancel(call.request_id()));
}

#[tokio::test(start_paused = true)]
async fn waiting_requests_know_their_place() {
    let log = Log::default();
    let layer = PriorityQueueLayer::new(1)
        .priority(|j: &Job| j.level)
        .fair_by(|j: &Job| j.user.clone())
        .longest_waiting_every(0);
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(log.clone()));
    let running = svc.call(job("r", "ada", 3));
    let a1 = svc.call(job("a1", "ada", 3));
    let a2 = svc.call(job("a2", "ada", 3));
    let b1 = svc.call(job("b1", "bob", 3));
    let urgent = svc.call(job("u", "cy", 1));
    let place = |f: &ResponseFuture<_, _, _, _>| handle.position(f.request_id());
    assert_eq!(place(&running), None);
    // Level 1 first; then bob, whose turn comes before ada's second (one of hers runs).
    assert_eq!(place(&urgent), Some(0));
    assert_eq!(place(&b1), Some(1));
    assert_eq!(place(&a1), Some(2));
    assert_eq!(place(&a2), Some(3));
    let entries = handle.entries();
    let of = |id: RequestId| entries.iter().find(|e| e.id == id).unwrap().position;
    assert_eq!(of(a2.request_id()), Some(3));
    assert_eq!(of(running.request_id()), None);
    drop(urgent);
    assert_eq!(place(&a2), Some(2));
    assert_eq!(handle.position(RequestId::from_u64(u64::MAX)), None);
    drop((running, a1, a2, b1));
}

/// Requests admitted at once live in places that later requests reuse: whatever the order of
/// starts, ends, cancellations and callers that give up, over ids that repeat and share shards,
/// an id names exactly the request that holds it — a cancel by id reaches that request and no
/// other, and the list of entries and the stats match what is in flight.
mod places_are_reused {
    use std::collections::btree_map::Entry;
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tower::util::BoxService;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Start(u64),
        Finish(u64),
        Cancel(u64),
        GiveUp(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..20).prop_map(Op::Start),
            2 => (0u64..20).prop_map(Op::Finish),
            2 => (0u64..20).prop_map(Op::Cancel),
            1 => (0u64..20).prop_map(Op::GiveUp),
        ]
    }

    struct Call {
        id: RequestId,
        done: oneshot::Receiver<()>,
    }

    /// A request in flight, and how it must end.
    struct InFlight {
        task: JoinHandle<Result<RequestId, BoxError>>,
        finish: Option<oneshot::Sender<()>>,
        cancelled: bool,
    }

    fn service(
        concurrency: usize,
        fair: bool,
    ) -> (BoxService<Call, RequestId, BoxError>, PriorityQueueHandle) {
        let inner = service_fn(|call: Call| async move {
            let _ = call.done.await;
            Ok::<_, BoxError>(call.id)
        });
        let layer = PriorityQueueLayer::new(concurrency)
            .capacity(100)
            .request_id(|call: &mut Call| call.id);
        let handle = layer.handle();
        let svc = if fair {
            BoxService::new(
                ServiceBuilder::new()
                    .layer(layer.fair_by(|call: &Call| call.id.get() % 3))
                    .service(inner),
            )
        } else {
            BoxService::new(ServiceBuilder::new().layer(layer).service(inner))
        };
        (svc, handle)
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    /// Collects the requests that ended, each as it had to; checks the rest against the queue.
    async fn check(
        in_flight: &mut BTreeMap<u64, InFlight>,
        handle: &PriorityQueueHandle,
        concurrency: usize,
    ) {
        let ended: Vec<u64> = in_flight
            .iter()
            .filter(|(_, f)| f.task.is_finished())
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            let f = in_flight.remove(&id).unwrap();
            let result = f.task.await.unwrap();
            if f.cancelled {
                assert_eq!(
                    kind(&result.unwrap_err()),
                    RejectionKind::Cancelled,
                    "request {id}"
                );
            } else {
                assert!(f.finish.is_none(), "request {id} ended unasked: {result:?}");
                assert_eq!(result.unwrap(), RequestId::from_u64(id));
            }
        }
        for (id, f) in in_flight.iter() {
            assert!(!f.cancelled, "cancelled request {id} still runs");
        }
        let listed: Vec<u64> = handle.entries().iter().map(|e| e.id.get()).collect();
        let expected: Vec<u64> = in_flight.keys().copied().collect();
        assert_eq!(listed, expected);
        let stats = handle.stats();
        assert_eq!(stats.running + stats.waiting, in_flight.len());
        assert!(stats.running <= concurrency);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn an_id_names_the_request_that_holds_it(
            concurrency in 1usize..6,
            fair in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                let (mut svc, handle) = service(concurrency, fair);
                let mut in_flight: BTreeMap<u64, InFlight> = BTreeMap::new();
                let mut refused = 0;
                for op in ops {
                    match op {
                        Op::Start(id) => {
                            let (finish, done) = oneshot::channel();
                            let call = svc.call(Call { id: RequestId::from_u64(id), done });
                            let task = tokio::spawn(call);
                            match in_flight.entry(id) {
                                Entry::Occupied(_) => {
                                    let err = task.await.unwrap().unwrap_err();
                                    assert_eq!(kind(&err), RejectionKind::MissingKey);
                                    refused += 1;
                                }
                                Entry::Vacant(place) => {
                                    place.insert(InFlight { task, finish: Some(finish), cancelled: false });
                                }
                            }
                        }
                        Op::Finish(id) => {
                            if let Some(f) = in_flight.get_mut(&id) {
                                if let Some(finish) = f.finish.take() {
                                    let _ = finish.send(());
                                }
                            }
                        }
                        Op::Cancel(id) => {
                            let held = in_flight.get_mut(&id);
                            assert_eq!(handle.cancel(RequestId::from_u64(id)), held.is_some());
                            if let Some(f) = held {
                                f.cancelled = true;
                            }
                        }
                        Op::GiveUp(id) => {
                            if let Some(f) = in_flight.remove(&id) {
                                f.task.abort();
                            }
                        }
                    }
                    settle().await;
                    check(&mut in_flight, &handle, concurrency).await;
                }
                for f in in_flight.values_mut() {
                    f.finish.take();
                }
                settle().await;
                check(&mut in_flight, &handle, concurrency).await;
                assert!(in_flight.is_empty());
                let stats = handle.stats();
                assert_eq!((stats.running, stats.waiting), (0, 0));
                assert_eq!(stats.rejected, refused);
                assert!(handle.entries().is_empty());
            });
        }
    }
}
