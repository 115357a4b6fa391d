use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use tokio::time::{advance, sleep, Instant};
use tower::{service_fn, BoxError, ServiceBuilder, ServiceExt};

use super::limiter::{Decision, Limit, MemoryLimiter, MAX_RETRY_AFTER};
use super::*;
use crate::{Rejected, RejectionKind};

fn paused() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

fn rejection(err: &BoxError) -> &Rejected {
    Rejected::find(&**err).expect("a rejection")
}

/// Checks that no interval of length `window` holds more than `limit`: the sum over a sliding
/// interval is largest when it ends at an admission.
fn assert_window(admitted: &[(Instant, u64)], limit: u64, window: Duration) {
    for (end, _) in admitted {
        let inside: u64 = admitted
            .iter()
            .filter(|(at, _)| *at <= *end && *end - *at < window)
            .map(|(_, c)| c)
            .sum();
        assert!(
            inside <= limit,
            "{inside} > {limit} in the window ending at {end:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn no_window_ever_holds_more_than_the_limit(
        limit in 1u64..20,
        window_ms in 1u64..2_000,
        arrivals in proptest::collection::vec((0u64..500, 1u64..8, 0u8..3, any::<bool>()), 1..120),
    ) {
        paused().block_on(async {
            let window = Duration::from_millis(window_ms);
            let limiter = MemoryLimiter::new(Limit::Window { limit, window });
            let mut admitted: Vec<Vec<(Instant, u64)>> = vec![Vec::new(); 3];
            for (gap_ms, cost, user, wait) in arrivals {
                advance(Duration::from_millis(gap_ms)).await;
                let key = Key::from(u64::from(user));
                let max_wait = wait.then_some(Duration::from_millis(700));
                match limiter.decide(&key, cost, max_wait) {
                    Decision::Now(_) => admitted[user as usize].push((Instant::now(), cost)),
                    Decision::At(at, _) => {
                        prop_assert!(at > Instant::now());
                        prop_assert!(at - Instant::now() <= Duration::from_millis(700));
                        admitted[user as usize].push((at, cost));
                    }
                    Decision::TooLarge => prop_assert!(cost > limit),
                    Decision::Denied(retry_after) => {
                        prop_assert!(cost <= limit);
                        // Retried exactly then, with nothing else arriving, it is admitted.
                        advance(retry_after).await;
                        match limiter.decide(&key, cost, None) {
                            Decision::Now(_) => admitted[user as usize].push((Instant::now(), cost)),
                            other => prop_assert!(false, "retry_after was early: {:?}", other),
                        }
                    }
                }
            }
            for log in &admitted {
                assert_window(log, limit, window);
            }
            Ok(())
        })?;
    }
}

#[test]
fn seed_004_bursts_200_then_100_per_second() {
    paused().block_on(async {
        let limiter = MemoryLimiter::new(Limit::Bucket {
            interval: Rate::per_second(100).interval(),
            burst: 200,
        });
        let key = Key::anonymous();
        let at_once = (0..300)
            .filter(|_| matches!(limiter.decide(&key, 1, None), Decision::Now(_)))
            .count();
        assert_eq!(at_once, 200);
        advance(Duration::from_secs(1)).await;
        let next_second = (0..300)
            .filter(|_| matches!(limiter.decide(&key, 1, None), Decision::Now(_)))
            .count();
        assert_eq!(next_second, 100);
        match limiter.decide(&key, 1, None) {
            Decision::Denied(after) => assert_eq!(after, Duration::from_millis(10)),
            other => panic!("{other:?}"),
        }
    });
}

#[tokio::test(start_paused = true)]
async fn waiters_go_in_arrival_order_at_their_instant() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    let layer = SlidingWindowLayer::new(2, Duration::from_secs(10)).wait(Duration::from_secs(30));
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |n: u64| {
            seen.lock().unwrap().push((n, Instant::now()));
            async move { Ok::<_, BoxError>(n) }
        }));
    let start = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|n| tokio::spawn(svc.clone().oneshot(n)))
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let log = log.lock().unwrap();
    let order: Vec<u64> = log.iter().map(|(n, _)| *n).collect();
    assert_eq!(order, [0, 1, 2, 3, 4, 5]);
    let at: Vec<u64> = log.iter().map(|(_, t)| (*t - start).as_secs()).collect();
    assert_eq!(at, [0, 0, 10, 10, 20, 20]);
    let stats = handle.stats();
    assert_eq!((stats.admitted, stats.waited, stats.rejected), (6, 4, 0));
}

#[tokio::test(start_paused = true)]
async fn a_wait_too_long_is_refused_at_once() {
    let layer = SlidingWindowLayer::new(1, Duration::from_secs(60)).wait(Duration::from_secs(5));
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }));
    svc.clone().oneshot(0).await.unwrap();
    let started = Instant::now();
    let err = svc.oneshot(1).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(rejection(&err).kind(), RejectionKind::RateLimited);
    assert_eq!(rejection(&err).retry_after(), Some(Duration::from_secs(60)));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_frees_its_place() {
    let layer = SlidingWindowLayer::new(1, Duration::from_secs(10)).wait(Duration::from_secs(60));
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }));
    svc.clone().oneshot(0).await.unwrap();
    let waiter = tokio::spawn(svc.clone().oneshot(1));
    sleep(Duration::from_secs(1)).await;
    waiter.abort();
    let _ = waiter.await;
    // The place at 10 s is free again: the next request takes it, not the one after.
    let started = Instant::now();
    svc.clone().oneshot(2).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(9));
    assert_eq!(handle.usage(&Key::anonymous()), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cost_above_the_limit_is_refused_clearly() {
    let svc = ServiceBuilder::new()
        .layer(
            SlidingWindowLayer::new(1_000, Duration::from_secs(60))
                .cost(|tokens: &u64| *tokens)
                .wait(Duration::from_secs(3_600)),
        )
        .service(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }));
    let err = svc.oneshot(5_000).await.unwrap_err();
    assert_eq!(rejection(&err).kind(), RejectionKind::RateLimited);
    assert!(err.to_string().contains("can never be admitted"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn reconciled_usage_replaces_the_estimate() {
    let layer = SlidingWindowLayer::new(1_000, Duration::from_secs(60))
        .cost(|_: &u64| 100)
        .reconcile(|used: &u64| Some(*used));
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }));
    svc.clone().oneshot(740).await.unwrap();
    assert_eq!(handle.usage(&Key::anonymous()), 740);
    assert!(svc.clone().oneshot(100).await.is_ok(), "840");
    assert!(svc.clone().oneshot(100).await.is_ok(), "940");
    // An estimate of 100 no longer fits; without reconciliation it would have (300 < 1000).
    let err = svc.oneshot(100).await.unwrap_err();
    assert_eq!(rejection(&err).kind(), RejectionKind::RateLimited);
}

/// Counts the words of a streamed reply, on top of the prompt's estimate.
struct Words {
    prompt: u64,
    words: u64,
}

impl Meter for Words {
    fn observe(&mut self, data: &[u8]) {
        self.words += data.split(|b| *b == b' ').filter(|w| !w.is_empty()).count() as u64;
    }

    fn finish(&mut self) -> Option<u64> {
        Some(self.prompt + self.words)
    }
}

/// A body streamed frame by frame.
type Streamed = http_body_util::StreamBody<
    futures_util::stream::BoxStream<'static, Result<http_body::Frame<bytes::Bytes>, BoxError>>,
>;

/// An upstream that streams the frames the test sends on its channel.
fn streaming(
    frames: Arc<Mutex<Option<tokio::sync::mpsc::Receiver<bytes::Bytes>>>>,
) -> impl tower::Service<
    http::Request<u64>,
    Response = http::Response<Streamed>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    service_fn(move |_: http::Request<u64>| {
        let rx = frames.lock().unwrap().take().expect("one call");
        async move {
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                let data = rx.recv().await?;
                Some((Ok(http_body::Frame::data(data)), rx))
            });
            let body = http_body_util::StreamBody::new(futures_util::StreamExt::boxed(stream));
            Ok::<_, BoxError>(http::Response::new(body))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_is_settled_at_its_end_or_when_dropped() {
    use http_body_util::BodyExt;
    for read_to_end in [true, false] {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let layer = SlidingWindowLayer::new(1_000, Duration::from_secs(60))
            .cost(|req: &http::Request<u64>| *req.body() + 500)
            .reconcile(MeterBody::new(|req: &http::Request<u64>| Words {
                prompt: *req.body(),
                words: 0,
            }));
        let handle = layer.handle();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(streaming(Arc::new(Mutex::new(Some(rx)))));
        let response = svc.oneshot(http::Request::new(10)).await.unwrap();
        // Until the body ends, the estimate holds its place.
        assert_eq!(handle.usage(&Key::anonymous()), 510);
        let mut body = response.into_body();
        tx.send(bytes::Bytes::from("one two ")).await.unwrap();
        body.frame().await.unwrap().unwrap();
        tx.send(bytes::Bytes::from("three")).await.unwrap();
        body.frame().await.unwrap().unwrap();
        assert_eq!(handle.usage(&Key::anonymous()), 510);
        if read_to_end {
            drop(tx);
            assert!(body.frame().await.is_none());
        } else {
            // A stream cut short counts what it carried.
            drop(body);
        }
        assert_eq!(
            handle.usage(&Key::anonymous()),
            13,
            "read to its end: {read_to_end}"
        );
    }
}

#[test]
fn keys_seen_once_do_not_stay() {
    paused().block_on(async {
        // A million users, each seen once; a key is idle 100 ms after its request.
        let limiter = MemoryLimiter::new(Limit::Bucket {
            interval: Rate::per_second(10).interval(),
            burst: 10,
        });
        let mut peak = 0;
        for n in 0..1_000_000u64 {
            assert!(matches!(
                limiter.decide(&Key::from(n), 1, None),
                Decision::Now(_)
            ));
            if n % 1_000 == 999 {
                advance(Duration::from_millis(10)).await;
                peak = peak.max(limiter.keys());
            }
        }
        // About 10,000 keys are live at any time (100 ms of arrivals); never much more stays.
        assert!(peak < 40_000, "{peak} keys resident at the peak");
        assert!(limiter.keys() < 40_000, "{} keys resident", limiter.keys());
    });
}

#[tokio::test(start_paused = true)]
async fn a_missing_key_is_refused_when_asked() {
    let svc = ServiceBuilder::new()
        .layer(
            SlidingWindowLayer::new(1, Duration::from_secs(1))
                .keyed_by(crate::key::HeaderKey::new("x-user-id").or_reject()),
        )
        .service(service_fn(|_: http::Request<()>| async {
            Ok::<_, BoxError>(())
        }));
    let err = svc.oneshot(http::Request::new(())).await.unwrap_err();
    assert_eq!(rejection(&err).kind(), RejectionKind::MissingKey);
}

#[test]
fn a_clock_read_before_a_later_admission_still_admits_below_the_limit() {
    paused().block_on(async {
        // Two callers read the clock, then take the lock in the other order: the second to
        // decide holds the earlier instant. Far below the limit, both are admitted at once.
        let limiter = MemoryLimiter::new(Limit::Window {
            limit: 1_000,
            window: Duration::from_secs(60),
        });
        let key = Key::anonymous();
        let early = Instant::now();
        let late = early + Duration::from_nanos(40);
        assert!(matches!(
            limiter.decide_at(&key, 1, None, late),
            Decision::Now(_)
        ));
        match limiter.decide_at(&key, 1, None, early) {
            Decision::Now(_) => {}
            other => panic!("refused far below the limit: {other:?}"),
        }
        assert_eq!(limiter.usage(&key), 0, "both start 40 ns from now");
        advance(Duration::from_nanos(40)).await;
        assert_eq!(limiter.usage(&key), 2);
    });
}

#[test]
fn contention_never_refuses_far_below_the_limit() {
    // Four threads on the real clock, 80,000 decisions in all against a limit of 10 million.
    let limiter = Arc::new(MemoryLimiter::new(Limit::Window {
        limit: 10_000_000,
        window: Duration::from_secs(3_600),
    }));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let limiter = limiter.clone();
            std::thread::spawn(move || {
                (0..20_000)
                    .filter(|_| {
                        !matches!(limiter.decide(&Key::anonymous(), 1, None), Decision::Now(_))
                    })
                    .count()
            })
        })
        .collect();
    let refused: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(
        refused, 0,
        "{refused} of 80,000 refused at 0.8 % of the limit"
    );
}

#[tokio::test(start_paused = true)]
async fn wait_and_reject_on_any_clone_apply_to_services_built_before() {
    let layer = SlidingWindowLayer::new(1, Duration::from_secs(10));
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }));
    svc.clone().oneshot(0).await.unwrap();
    let err = svc.clone().oneshot(1).await.unwrap_err();
    assert_eq!(rejection(&err).kind(), RejectionKind::RateLimited);

    let _ = layer.clone().wait(Duration::from_secs(30));
    let started = Instant::now();
    svc.clone().oneshot(2).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(10));

    let _ = layer.clone().reject();
    let err = svc.oneshot(3).await.unwrap_err();
    assert_eq!(rejection(&err).retry_after(), Some(Duration::from_secs(10)));
}

#[tokio::test(start_paused = true)]
async fn a_cost_of_zero_is_admitted_without_a_record() {
    let layer = SlidingWindowLayer::new(10, Duration::from_secs(60)).cost(|_: &u64| 0);
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }));
    for n in 0..20_000 {
        svc.clone().oneshot(n).await.unwrap();
    }
    assert_eq!(handle.shared.limiter.records(&Key::anonymous()), 0);
    assert_eq!(handle.usage(&Key::anonymous()), 0);
    assert_eq!(handle.stats().admitted, 20_000);
}

#[tokio::test(start_paused = true)]
async fn a_cost_of_zero_is_counted_when_the_response_reports_usage() {
    for bucket in [false, true] {
        let (svc, handle) = if bucket {
            let layer = TokenBucketLayer::new(Rate::per_second(1), 100)
                .cost(|_: &u64| 0)
                .reconcile(|used: &u64| Some(*used));
            let handle = layer.handle();
            let svc = ServiceBuilder::new()
                .layer(layer)
                .service(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }))
                .boxed_clone();
            (svc, handle)
        } else {
            let layer = SlidingWindowLayer::new(100, Duration::from_secs(60))
                .cost(|_: &u64| 0)
                .reconcile(|used: &u64| Some(*used));
            let handle = layer.handle();
            let svc = ServiceBuilder::new()
                .layer(layer)
                .service(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }))
                .boxed_clone();
            (svc, handle)
        };
        svc.clone().oneshot(60).await.unwrap();
        svc.clone().oneshot(40).await.unwrap();
        assert_eq!(handle.usage(&Key::anonymous()), 100, "bucket: {bucket}");
        svc.clone().oneshot(0).await.unwrap();
        let err = svc.clone().oneshot(1).await;
        assert!(
            err.is_ok(),
            "cost 0 is admitted even when the limit is used up"
        );
        assert_eq!(handle.usage(&Key::anonymous()), 101, "bucket: {bucket}");
    }
}

fn echo() -> impl tower::Service<u64, Response = u64, Error = BoxError, Future = impl Send> + Clone
{
    service_fn(|n: u64| async move { Ok::<_, BoxError>(n) })
}

#[tokio::test(start_paused = true)]
async fn the_longest_interval_and_window_neither_panic_nor_wrap() {
    // One every Duration::MAX: counted as one every MAX_PERIOD.
    let bucket = TokenBucketLayer::new(Rate::one_every(Duration::MAX), 1);
    let svc = ServiceBuilder::new().layer(bucket.clone()).service(echo());
    svc.clone().oneshot(0).await.unwrap();
    let err = svc.clone().oneshot(1).await.unwrap_err();
    assert_eq!(rejection(&err).retry_after(), Some(MAX_PERIOD));
    // Waiting as long as one can reserves the place a period ahead.
    let _ = bucket.wait(Duration::MAX);
    let waiter = tokio::spawn(svc.clone().oneshot(2));
    advance(MAX_PERIOD - Duration::from_secs(1)).await;
    assert!(!waiter.is_finished());
    waiter.abort();

    let window = SlidingWindowLayer::new(10, Duration::MAX);
    let svc = ServiceBuilder::new().layer(window.clone()).service(echo());
    for n in 0..10 {
        svc.clone().oneshot(n).await.unwrap();
    }
    let err = svc.clone().oneshot(10).await.unwrap_err();
    assert_eq!(rejection(&err).retry_after(), Some(MAX_PERIOD));
    let _ = window.wait(Duration::MAX);
    let waiter = tokio::spawn(svc.clone().oneshot(11));
    advance(Duration::from_secs(3_600)).await;
    assert!(!waiter.is_finished());
    waiter.abort();
}

#[tokio::test(start_paused = true)]
async fn the_largest_costs_and_bursts_neither_panic_nor_wrap() {
    // Costs and bursts above MAX_COST count as MAX_COST: a cost of u64::MAX fits a limit of
    // u64::MAX, as it does in Redis.
    for wait in [false, true] {
        let window = SlidingWindowLayer::new(u64::MAX, Duration::from_secs(60))
            .cost(|n: &u64| *n)
            .reconcile(|n: &u64| Some(n.wrapping_mul(3)));
        let bucket = TokenBucketLayer::new(Rate::per_second(u32::MAX), u64::MAX)
            .cost(|n: &u64| *n)
            .reconcile(|n: &u64| Some(n.wrapping_mul(3)));
        let (window, bucket) = if wait {
            (window.wait(Duration::MAX), bucket.wait(Duration::MAX))
        } else {
            (window, bucket)
        };
        let (wh, bh) = (window.handle(), bucket.handle());
        let svcs = [
            ServiceBuilder::new()
                .layer(window)
                .service(echo())
                .boxed_clone(),
            ServiceBuilder::new()
                .layer(bucket)
                .service(echo())
                .boxed_clone(),
        ];
        for svc in &svcs {
            svc.clone().oneshot(u64::MAX).await.unwrap();
            // Reconciled to u64::MAX - 2 (wrapped by the closure), counted as MAX_COST.
            let next = tokio::spawn(svc.clone().oneshot(u64::MAX));
            advance(Duration::from_secs(1)).await;
            if !wait {
                let err = next.await.unwrap().unwrap_err();
                assert_eq!(rejection(&err).kind(), RejectionKind::RateLimited);
            } else {
                next.abort();
            }
            svc.clone().oneshot(0).await.unwrap();
        }
        assert_eq!(wh.usage(&Key::anonymous()), MAX_COST);
        assert!(bh.usage(&Key::anonymous()) > MAX_COST / 2);
    }
}

#[tokio::test(start_paused = true)]
async fn a_reconciled_u64_max_neither_panics_nor_wraps() {
    let window =
        SlidingWindowLayer::new(10, Duration::from_secs(60)).reconcile(|_: &u64| Some(u64::MAX));
    let bucket = TokenBucketLayer::new(Rate::one_every(Duration::MAX), 10)
        .reconcile(|_: &u64| Some(u64::MAX));
    let (wh, bh) = (window.handle(), bucket.handle());
    for layer in [
        ServiceBuilder::new()
            .layer(window)
            .service(echo())
            .boxed_clone(),
        ServiceBuilder::new()
            .layer(bucket)
            .service(echo())
            .boxed_clone(),
    ] {
        layer.clone().oneshot(0).await.unwrap();
        layer.clone().oneshot(1).await.unwrap_err();
    }
    assert_eq!(wh.usage(&Key::anonymous()), MAX_COST);
    assert_eq!(bh.usage(&Key::anonymous()), MAX_COST);
    // The window forgets it after one window.
    advance(Duration::from_secs(60)).await;
    assert_eq!(wh.usage(&Key::anonymous()), 0);
}

/// Durations and numbers at the edges of their types, and some ordinary ones.
fn edge_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(Duration::MAX),
        Just(MAX_PERIOD),
        (0u64..=u64::MAX).prop_map(Duration::from_nanos),
        (0u64..=u64::MAX).prop_map(Duration::from_secs),
        (1u64..5_000).prop_map(Duration::from_millis),
    ]
}

fn edge_number() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(MAX_COST),
        Just(MAX_COST + 1),
        Just(u64::from(u32::MAX)),
        0u64..=u64::MAX,
        1u64..20,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// No input makes a limiter panic or wrap: every decision, correction and release at the
    /// edges of the types returns, and a refusal's wait is within its documented bound.
    #[test]
    fn no_input_panics(
        bucket in any::<bool>(),
        number in edge_number(),
        period in edge_duration(),
        steps in proptest::collection::vec(
            (edge_duration(), edge_number(), proptest::option::of(edge_duration()), edge_number(), 0u8..3),
            1..40,
        ),
    ) {
        paused().block_on(async {
            let limit = if bucket {
                Limit::bucket(Rate::one_every(period).interval(), number)
            } else {
                Limit::window(number, period)
            };
            let limiter = MemoryLimiter::new(limit);
            let key = Key::anonymous();
            let mut admitted = Vec::new();
            for (gap, cost, max_wait, actual, op) in steps {
                advance(gap.min(Duration::from_secs(1 << 40))).await;
                match limiter.decide(&key, cost, max_wait) {
                    Decision::Now(id) | Decision::At(_, id) => admitted.push((id, cost)),
                    Decision::Denied(wait) => prop_assert!(wait <= MAX_RETRY_AFTER),
                    Decision::TooLarge => {}
                }
                if let Some((id, cost)) = admitted.last().copied() {
                    match op {
                        0 => limiter.reconcile(&key, id, cost, actual),
                        1 => limiter.release(&key, id),
                        _ => {}
                    }
                }
                let _ = limiter.usage(&key);
            }
            Ok(())
        })?;
    }
}

#[test]
fn a_released_reservation_frees_its_own_slot_not_the_last_one() {
    paused().block_on(async {
        let limiter = MemoryLimiter::new(Limit::bucket(Duration::from_secs(1), 1));
        let key = Key::anonymous();
        let wait = Some(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(matches!(limiter.decide(&key, 1, wait), Decision::Now(_)));
        let Decision::At(b, b_id) = limiter.decide(&key, 1, wait) else {
            panic!("a reservation")
        };
        let Decision::At(c, _) = limiter.decide(&key, 1, wait) else {
            panic!("a reservation")
        };
        assert_eq!(
            (b - t0, c - t0),
            (Duration::from_secs(1), Duration::from_secs(2))
        );
        limiter.release(&key, b_id);
        // The slot at 1 s is free, but C keeps 2 s: the next one starts a whole interval after
        // C, never beside it.
        let Decision::At(d, _) = limiter.decide(&key, 1, wait) else {
            panic!("a reservation")
        };
        assert_eq!(d - t0, Duration::from_secs(3));
    });
}

/// Checks admitted `(start, cost)` against GCRA: in start order, each start is at least the
/// theoretical arrival time of its units less the burst's tolerance.
fn assert_gcra(admitted: &[(Instant, u64)], interval: Duration, burst: u64) {
    let mut starts = admitted.to_vec();
    starts.sort_by_key(|(at, _)| *at);
    let Some(&(first, _)) = starts.first() else {
        return;
    };
    let tolerance = interval * burst as u32;
    let mut tat = first;
    for (at, cost) in starts {
        let next = tat.max(at) + interval * cost as u32;
        assert!(
            next <= at + tolerance,
            "a start at {:?} comes {:?} too early ({admitted:?})",
            at - first,
            next - (at + tolerance),
        );
        tat = next;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// After any mix of decisions, waits and releases, the starts that remain keep the GCRA
    /// spacing.
    #[test]
    fn releases_never_let_starts_closer_than_the_bucket_allows(
        burst in 1u64..4,
        interval_ms in 1u64..1_000,
        ops in proptest::collection::vec((0u64..1_500, 1u64..4, any::<bool>(), 0usize..8), 1..80),
    ) {
        paused().block_on(async {
            let interval = Duration::from_millis(interval_ms);
            let limiter = MemoryLimiter::new(Limit::bucket(interval, burst));
            let key = Key::anonymous();
            // Admitted (id, start, cost); released ones are taken out.
            let mut admitted: Vec<(u64, Instant, u64)> = Vec::new();
            for (gap_ms, cost, wait, release) in ops {
                advance(Duration::from_millis(gap_ms)).await;
                let cost = cost.min(burst);
                let max_wait = wait.then_some(Duration::from_secs(5));
                match limiter.decide(&key, cost, max_wait) {
                    Decision::Now(id) => admitted.push((id, Instant::now(), cost)),
                    Decision::At(at, id) => admitted.push((id, at, cost)),
                    Decision::Denied(_) | Decision::TooLarge => {}
                }
                // Gives back one reservation that has not started yet, as a waiter that leaves.
                let pending: Vec<usize> = (0..admitted.len())
                    .filter(|i| admitted[*i].1 > Instant::now())
                    .collect();
                if !pending.is_empty() && release < 4 {
                    let (id, _, _) = admitted.remove(pending[release % pending.len()]);
                    limiter.release(&key, id);
                }
            }
            let starts: Vec<(Instant, u64)> = admitted.iter().map(|(_, at, c)| (*at, *c)).collect();
            assert_gcra(&starts, interval, burst);
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Requests that wait for their reserved start, some of them dropped at any stage — before
    /// their first poll, while they wait, while their call runs — through a sliding window:
    /// no window ever starts more than the limit, every request kept to the end is answered,
    /// and once every request has been answered or has left, what is in use is exactly what
    /// started (a place given back by a request that left before its start is not counted).
    #[test]
    fn requests_that_leave_at_any_stage_give_their_place_back(
        limit in 1u64..6,
        window_ms in 10u64..400,
        requests in proptest::collection::vec((0u64..150, 1u64..4, proptest::option::of(0u64..600), 1u64..200), 1..50),
    ) {
        paused().block_on(async {
            let window = Duration::from_millis(window_ms);
            let origin = Instant::now();
            // A reserved start is a whole number of milliseconds after `origin`, as every
            // arrival and window is; the timer that ends the wait fires at the runtime's next
            // millisecond tick, less than 1 ms later, so each start is counted at its
            // millisecond.
            let started: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
            let layer = SlidingWindowLayer::new(limit, window)
                .wait(Duration::from_secs(2))
                .cost(|r: &(u64, u64)| r.0);
            let handle = layer.handle();
            let svc = ServiceBuilder::new().layer(layer).service(service_fn({
                let started = started.clone();
                move |(cost, call_ms): (u64, u64)| {
                    let started = started.clone();
                    async move {
                        let ms = (Instant::now() - origin).as_millis() as u64;
                        started.lock().unwrap().push((origin + Duration::from_millis(ms), cost));
                        sleep(Duration::from_millis(call_ms)).await;
                        Ok::<_, BoxError>(cost)
                    }
                }
            }));
            let (mut kept, mut leaving) = (Vec::new(), Vec::new());
            for (gap_ms, cost, patience_ms, call_ms) in requests {
                // Slept, not advanced: every timer due in the gap fires at its own instant.
                sleep(Duration::from_millis(gap_ms)).await;
                let call = svc.clone().oneshot((cost, call_ms));
                match patience_ms {
                    Some(0) => drop(call),
                    Some(ms) => leaving.push(tokio::spawn(tokio::time::timeout(
                        Duration::from_millis(ms),
                        call,
                    ))),
                    None => kept.push((cost, tokio::spawn(call))),
                }
            }
            for (cost, answer) in kept {
                match answer.await.expect("no panic") {
                    Ok(answered) => prop_assert_eq!(answered, cost),
                    Err(err) => prop_assert_eq!(rejection(&err).kind(), RejectionKind::RateLimited),
                }
            }
            for left in leaving {
                let _ = left.await.expect("no panic");
            }
            let started = started.lock().unwrap().clone();
            assert_window(&started, limit, window);
            let now = Instant::now();
            let in_window: u64 = started
                .iter()
                .filter(|(at, _)| *at <= now && now - *at < window)
                .map(|(_, cost)| cost)
                .sum();
            prop_assert_eq!(handle.usage(&Key::anonymous()), in_window);
            Ok(())
        })?;
    }
}
