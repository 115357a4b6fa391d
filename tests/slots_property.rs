//! Property: whatever arrives — any mix of users, priorities, durations, errors, panics,
//! cancellations and callers that give up — the queue and the per-user limit never let more run
//! than allowed, and afterwards nothing is left behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use tokio::time::{sleep, timeout};
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
    at_ms: u64,
    user: u8,
    level: u8,
    work_ms: u64,
    ending: Ending,
    cancel_after_ms: Option<u64>,
    give_up_after_ms: Option<u64>,
}

#[derive(Debug, Clone)]
struct Setup {
    concurrency: usize,
    capacity: usize,
    queue_timeout_ms: Option<u64>,
    max_per_user: usize,
    per_user_wait: Option<(usize, u64)>,
    queue_outside: bool,
    fair: bool,
}

#[derive(Debug, Clone)]
struct Job {
    id: RequestId,
    user: u8,
    level: u8,
    work: Duration,
    ending: Ending,
}

#[derive(Default)]
struct Running {
    now: usize,
    max: usize,
    per_user: HashMap<u8, usize>,
    max_per_user: usize,
}

/// Counts what runs inside the limits; the guard also counts down on a panic or a drop.
struct InFlight(Arc<Mutex<Running>>, u8);

impl InFlight {
    fn enter(running: &Arc<Mutex<Running>>, user: u8) -> Self {
        let mut r = running.lock().unwrap();
        r.now += 1;
        r.max = r.max.max(r.now);
        let mine = r.per_user.entry(user).or_default();
        *mine += 1;
        let mine = *mine;
        r.max_per_user = r.max_per_user.max(mine);
        InFlight(running.clone(), user)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut r = self.0.lock().unwrap();
        r.now -= 1;
        *r.per_user.get_mut(&self.1).unwrap() -= 1;
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

fn arrival() -> impl Strategy<Value = Arrival> {
    (
        0u64..3_000,
        0u8..4,
        1u8..=5,
        0u64..1_500,
        prop_oneof![6 => Just(Ending::Ok), 2 => Just(Ending::Err), 1 => Just(Ending::Panic)],
        proptest::option::weighted(0.15, 0u64..2_000),
        proptest::option::weighted(0.15, 0u64..2_000),
    )
        .prop_map(
            |(at_ms, user, level, work_ms, ending, cancel_after_ms, give_up_after_ms)| Arrival {
                at_ms,
                user,
                level,
                work_ms,
                ending,
                cancel_after_ms,
                give_up_after_ms,
            },
        )
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        1usize..=4,
        0usize..=12,
        proptest::option::of(100u64..2_000),
        1usize..=3,
        proptest::option::of((1usize..=3, 100u64..3_000)),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                concurrency,
                capacity,
                queue_timeout_ms,
                max_per_user,
                per_user_wait,
                queue_outside,
                fair,
            )| Setup {
                concurrency,
                capacity,
                queue_timeout_ms,
                max_per_user,
                per_user_wait,
                queue_outside,
                fair,
            },
        )
}

async fn run(setup: Setup, arrivals: Vec<Arrival>) -> Result<(), TestCaseError> {
    let running = Arc::new(Mutex::new(Running::default()));
    let counted = running.clone();
    let upstream = service_fn(move |job: Job| {
        let counted = counted.clone();
        async move {
            let _in_flight = InFlight::enter(&counted, job.user);
            sleep(job.work).await;
            match job.ending {
                Ending::Ok => Ok(job.user),
                Ending::Err => Err::<u8, BoxError>("upstream failed".into()),
                Ending::Panic => panic!("{}", PANIC_MESSAGE),
            }
        }
    });

    let mut queue = PriorityQueueLayer::new(setup.concurrency)
        .capacity(setup.capacity)
        .priority(|j: &Job| j.level)
        .request_id(|j: &mut Job| j.id);
    if let Some(ms) = setup.queue_timeout_ms {
        queue = queue.queue_timeout(Duration::from_millis(ms));
    }
    let queue_handle = queue.handle();
    let mut per_user = PerUserConcurrencyLayer::new(setup.max_per_user, |j: &Job| j.user as u64);
    if let Some((waiting, ms)) = setup.per_user_wait {
        per_user = per_user.wait(waiting, Duration::from_millis(ms));
    }
    let user_handle = per_user.handle();

    let svc: tower::util::BoxCloneService<Job, u8, BoxError> =
        match (setup.queue_outside, setup.fair) {
            (true, false) => ServiceBuilder::new()
                .boxed_clone()
                .layer(queue)
                .layer(per_user)
                .service(upstream),
            (true, true) => ServiceBuilder::new()
                .boxed_clone()
                .layer(queue.fair_by(|j: &Job| j.user as u64))
                .layer(per_user)
                .service(upstream),
            (false, false) => ServiceBuilder::new()
                .boxed_clone()
                .layer(per_user)
                .layer(queue)
                .service(upstream),
            (false, true) => ServiceBuilder::new()
                .boxed_clone()
                .layer(per_user)
                .layer(queue.fair_by(|j: &Job| j.user as u64))
                .service(upstream),
        };

    let mut tasks = Vec::new();
    for a in arrivals.iter().cloned() {
        let svc = svc.clone();
        let handle = queue_handle.clone();
        tasks.push(tokio::spawn(async move {
            sleep(Duration::from_millis(a.at_ms)).await;
            let job = Job {
                id: RequestId::next(),
                user: a.user,
                level: a.level,
                work: Duration::from_millis(a.work_ms),
                ending: a.ending,
            };
            if let Some(after) = a.cancel_after_ms {
                let id = job.id;
                tokio::spawn(async move {
                    sleep(Duration::from_millis(after)).await;
                    handle.cancel(id);
                });
            }
            let call = svc.oneshot(job);
            match a.give_up_after_ms {
                Some(ms) => {
                    let _ = timeout(Duration::from_millis(ms), call).await;
                }
                None => {
                    let _ = call.await;
                }
            }
        }));
    }
    let all = async {
        for t in tasks {
            // A task that panicked (on purpose) reports a JoinError; that is fine.
            let _ = t.await;
        }
    };
    prop_assert!(
        timeout(Duration::from_secs(3_600), all).await.is_ok(),
        "some request never finished"
    );
    // Let cancellations scheduled after the last request run.
    sleep(Duration::from_secs(10)).await;

    let r = running.lock().unwrap();
    prop_assert!(r.max <= setup.concurrency, "{} ran at once", r.max);
    prop_assert!(
        r.max_per_user <= setup.max_per_user,
        "{} of one user",
        r.max_per_user
    );
    prop_assert_eq!(r.now, 0);

    let q = queue_handle.stats();
    prop_assert_eq!((q.running, q.waiting, q.users), (0, 0, 0), "{:?}", q);
    prop_assert!(queue_handle.entries().is_empty());
    let ended = q.rejected + q.timed_out + q.cancelled + q.completed + q.failed;
    if setup.queue_outside {
        prop_assert_eq!(ended, arrivals.len() as u64, "{:?}", q);
    } else {
        prop_assert!(ended <= arrivals.len() as u64, "{:?}", q);
    }

    let u = user_handle.stats();
    prop_assert_eq!((u.users, u.in_flight, u.waiting), (0, 0, 0), "{:?}", u);
    let ended = u.rejected + u.timed_out + u.cancelled + u.completed + u.failed;
    if !setup.queue_outside {
        prop_assert_eq!(ended, arrivals.len() as u64, "{:?}", u);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn limits_hold_and_nothing_leaks(setup in setup(), arrivals in proptest::collection::vec(arrival(), 1..60)) {
        quiet_intended_panics();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run(setup, arrivals))?;
    }
}
