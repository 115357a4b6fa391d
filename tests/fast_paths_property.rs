//! Property, on a multi-threaded runtime: requests admitted at once (without the queue's lock),
//! requests that wait, cancellations through the handle, callers that give up, duplicate ids,
//! errors and panics, all racing on several threads, never let more than the limits run at
//! once, never strand a waiter while a slot is free, and leave nothing behind.
//!
//! Nothing here waits on the clock: the work of a request is a number of yields, and every
//! request ends by itself; the runtime's timeout only guards against a hang.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::select;
use proptest::prelude::*;
use tower::{service_fn, BoxError, ServiceBuilder, ServiceExt};
use tower_llm_queue::{PerUserConcurrencyLayer, PriorityQueueLayer, RequestId};

#[derive(Debug, Clone, Copy)]
enum Ending {
    Ok,
    Err,
    Panic,
}

#[derive(Debug, Clone)]
struct Arrival {
    /// Yields before the request is made.
    after: u8,
    user: u8,
    level: u8,
    /// Yields the upstream takes.
    work: u8,
    ending: Ending,
    /// Yields after which the handle cancels the request.
    cancel_after: Option<u8>,
    /// Yields after which the caller drops its response future.
    give_up_after: Option<u8>,
    /// Takes the id of an earlier arrival instead of a fresh one.
    same_id_as: Option<usize>,
}

#[derive(Debug, Clone)]
struct Setup {
    concurrency: usize,
    capacity: usize,
    fair: bool,
    per_user: Option<usize>,
    threads: usize,
}

#[derive(Debug, Clone)]
struct Job {
    id: RequestId,
    user: u8,
    level: u8,
    work: u8,
    ending: Ending,
}

#[derive(Default)]
struct Peak {
    now: AtomicUsize,
    max: AtomicUsize,
    per_user: Mutex<(Vec<usize>, usize)>,
}

struct InFlight(Arc<Peak>, u8);

impl InFlight {
    fn enter(peak: &Arc<Peak>, user: u8) -> Self {
        let now = peak.now.fetch_add(1, Ordering::SeqCst) + 1;
        peak.max.fetch_max(now, Ordering::SeqCst);
        let mut per_user = peak.per_user.lock().unwrap();
        let (counts, max) = &mut *per_user;
        counts[user as usize] += 1;
        *max = (*max).max(counts[user as usize]);
        InFlight(peak.clone(), user)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
        self.0.per_user.lock().unwrap().0[self.1 as usize] -= 1;
    }
}

const PANIC_MESSAGE: &str = "the inner service panicked on purpose";

fn quiet_intended_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&PANIC_MESSAGE) {
                previous(info);
            }
        }));
    });
}

/// Awaits `call`, or drops it after `give_up_after` yields.
async fn call_or_give_up(
    call: impl Future<Output = Result<u8, BoxError>>,
    give_up_after: Option<u8>,
) {
    match give_up_after {
        Some(after) => {
            let _ = select(Box::pin(call), Box::pin(yields(after))).await;
        }
        None => {
            let _ = call.await;
        }
    }
}

async fn yields(n: u8) {
    for _ in 0..n {
        tokio::task::yield_now().await;
    }
}

fn arrival() -> impl Strategy<Value = Arrival> {
    (
        (0u8..20, 0u8..4, 1u8..=3, 0u8..12),
        prop_oneof![8 => Just(Ending::Ok), 2 => Just(Ending::Err), 1 => Just(Ending::Panic)],
        proptest::option::weighted(0.2, 0u8..16),
        proptest::option::weighted(0.2, 0u8..16),
        proptest::option::weighted(0.05, 0usize..64),
    )
        .prop_map(
            |((after, user, level, work), ending, cancel_after, give_up_after, same_id_as)| {
                Arrival {
                    after,
                    user,
                    level,
                    work,
                    ending,
                    cancel_after,
                    give_up_after,
                    same_id_as,
                }
            },
        )
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        1usize..=4,
        0usize..=16,
        any::<bool>(),
        proptest::option::weighted(0.3, 1usize..=3),
        2usize..=4,
    )
        .prop_map(|(concurrency, capacity, fair, per_user, threads)| Setup {
            concurrency,
            capacity,
            fair,
            per_user,
            threads,
        })
}

/// The upstream every run calls: it counts what runs at once, overall and per user, works for
/// the job's yields, and ends as the job says.
fn upstream(
    peak: &Arc<Peak>,
) -> impl tower::Service<Job, Response = u8, Error = BoxError, Future: Send> + Clone + Send + 'static
{
    peak.per_user.lock().unwrap().0 = vec![0; 4];
    let counted = peak.clone();
    service_fn(move |job: Job| {
        let counted = counted.clone();
        async move {
            let _in_flight = InFlight::enter(&counted, job.user);
            yields(job.work).await;
            match job.ending {
                Ending::Ok => Ok(job.user),
                Ending::Err => Err::<u8, BoxError>("upstream failed".into()),
                Ending::Panic => panic!("{}", PANIC_MESSAGE),
            }
        }
    })
}

async fn run(setup: Setup, arrivals: Vec<Arrival>) -> Result<(), TestCaseError> {
    let peak = Arc::new(Peak::default());
    let upstream = upstream(&peak);

    let queue = PriorityQueueLayer::new(setup.concurrency)
        .capacity(setup.capacity)
        .priority(|j: &Job| j.level)
        .request_id(|j: &mut Job| j.id);
    let handle = queue.handle();
    let per_user = PerUserConcurrencyLayer::new(setup.per_user.unwrap_or(usize::MAX), |j: &Job| {
        j.user as u64
    });
    let user_handle = per_user.handle();
    let svc: tower::util::BoxCloneService<Job, u8, BoxError> = match setup.fair {
        false => ServiceBuilder::new()
            .boxed_clone()
            .layer(per_user)
            .layer(queue)
            .service(upstream),
        true => ServiceBuilder::new()
            .boxed_clone()
            .layer(per_user)
            .layer(queue.fair_by(|j: &Job| j.user as u64))
            .service(upstream),
    };

    let ids: Vec<RequestId> = arrivals.iter().map(|_| RequestId::next()).collect();
    let mut tasks = Vec::new();
    for (n, a) in arrivals.iter().cloned().enumerate() {
        let svc = svc.clone();
        let handle = handle.clone();
        let id = a
            .same_id_as
            .and_then(|earlier| ids.get(earlier % (n + 1)))
            .copied()
            .unwrap_or(ids[n]);
        tasks.push(tokio::spawn(async move {
            yields(a.after).await;
            let job = Job {
                id,
                user: a.user,
                level: a.level,
                work: a.work,
                ending: a.ending,
            };
            if let Some(after) = a.cancel_after {
                tokio::spawn(async move {
                    yields(after).await;
                    handle.cancel(id);
                });
            }
            call_or_give_up(svc.oneshot(job), a.give_up_after).await;
        }));
    }
    let watcher = {
        let handle = handle.clone();
        let concurrency = setup.concurrency;
        tokio::spawn(async move {
            loop {
                let stats = handle.stats();
                assert!(stats.running <= concurrency, "{stats:?}");
                let _ = handle.entries();
                tokio::task::yield_now().await;
            }
        })
    };
    let all = async {
        for t in tasks {
            // A task whose request panicked (on purpose) reports a JoinError; that is fine.
            let _ = t.await;
        }
    };
    let finished = tokio::time::timeout(Duration::from_secs(20), all).await;
    watcher.abort();
    let watched = watcher.await;
    prop_assert!(finished.is_ok(), "some request never finished");
    prop_assert!(
        watched.as_ref().err().is_some_and(|e| e.is_cancelled()),
        "the watcher saw more running than allowed: {:?}",
        watched
    );
    // Cancellations aimed at requests that have ended by now find nothing; let them run.
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }

    prop_assert!(peak.max.load(Ordering::SeqCst) <= setup.concurrency);
    prop_assert_eq!(peak.now.load(Ordering::SeqCst), 0);
    if let Some(max) = setup.per_user {
        prop_assert!(peak.per_user.lock().unwrap().1 <= max);
    }
    let q = handle.stats();
    prop_assert_eq!((q.running, q.waiting, q.users), (0, 0, 0), "{:?}", q);
    prop_assert!(handle.entries().is_empty());
    let ended = q.rejected + q.timed_out + q.cancelled + q.completed + q.failed;
    prop_assert!(ended <= arrivals.len() as u64, "{:?}", q);
    prop_assert!(q.admitted <= arrivals.len() as u64, "{:?}", q);
    let u = user_handle.stats();
    prop_assert_eq!((u.users, u.in_flight, u.waiting), (0, 0, 0), "{:?}", u);
    let ended = u.rejected + u.timed_out + u.cancelled + u.completed + u.failed;
    prop_assert_eq!(ended, arrivals.len() as u64, "{:?}", u);
    Ok(())
}

proptest! {
    #[test]
    fn limits_hold_across_threads(
        setup in setup(),
        arrivals in proptest::collection::vec(arrival(), 1..64),
    ) {
        quiet_intended_panics();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(setup.threads)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(setup, arrivals))?;
    }
}

/// The per-user limit with waiting, alone, on several threads: slots taken and given back
/// without a lock race with requests that join the line, leave it and are handed a slot.
async fn run_per_user_waiting(
    max: usize,
    max_waiting: usize,
    arrivals: Vec<Arrival>,
) -> Result<(), TestCaseError> {
    let peak = Arc::new(Peak::default());
    let upstream = upstream(&peak);
    let layer = PerUserConcurrencyLayer::new(max, |j: &Job| j.user as u64)
        .wait(max_waiting, Duration::from_secs(3600));
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .boxed_clone()
        .layer(layer)
        .service(upstream);
    let mut tasks = Vec::new();
    for a in arrivals.iter().cloned() {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            yields(a.after).await;
            let job = Job {
                id: RequestId::next(),
                user: a.user,
                level: a.level,
                work: a.work,
                ending: a.ending,
            };
            call_or_give_up(svc.oneshot(job), a.give_up_after).await;
        }));
    }
    let all = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    // A waiter stranded while its user's slot is free would hang here: the wait itself never
    // times out.
    let finished = tokio::time::timeout(Duration::from_secs(20), all).await;
    prop_assert!(finished.is_ok(), "some request never finished");
    prop_assert!(peak.per_user.lock().unwrap().1 <= max);
    prop_assert_eq!(peak.now.load(Ordering::SeqCst), 0);
    let u = handle.stats();
    prop_assert_eq!((u.users, u.in_flight, u.waiting), (0, 0, 0), "{:?}", u);
    let ended = u.rejected + u.timed_out + u.cancelled + u.completed + u.failed;
    prop_assert_eq!(ended, arrivals.len() as u64, "{:?}", u);
    prop_assert_eq!(
        u.admitted + u.waited + u.rejected,
        arrivals.len() as u64,
        "{:?}",
        u
    );
    Ok(())
}

proptest! {
    #[test]
    fn per_user_waiting_holds_across_threads(
        max in 1usize..=3,
        max_waiting in 0usize..=4,
        threads in 2usize..=4,
        arrivals in proptest::collection::vec(arrival(), 1..64),
    ) {
        quiet_intended_panics();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_per_user_waiting(max, max_waiting, arrivals))?;
    }
}
