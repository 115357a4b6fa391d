use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::sleep;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};

use super::*;
use crate::classify::HttpClassifier;
use crate::{Rejected, RejectionKind};

/// An upstream that fails while `down` is set, takes `secs` per call, and counts the calls that
/// reach it.
#[derive(Clone, Default)]
struct Upstream {
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

impl Upstream {
    fn service(
        &self,
    ) -> impl Service<u64, Response = u64, Error = BoxError, Future = impl Send> + Clone + Send + 'static
    {
        let this = self.clone();
        service_fn(move |secs: u64| {
            this.calls.fetch_add(1, Ordering::SeqCst);
            let down = this.down.load(Ordering::SeqCst);
            async move {
                sleep(Duration::from_secs(secs)).await;
                if down {
                    Err::<u64, BoxError>("upstream down".into())
                } else {
                    Ok(secs)
                }
            }
        })
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn breaker() -> CircuitBreakerLayer {
    CircuitBreakerLayer::new()
        .minimum_calls(4)
        .window(Window::Calls(10))
        .open_for(Duration::from_secs(10))
        .half_open_calls(2)
}

/// Takes the upstream down and makes the `minimum_calls` (4) failing calls that open the breaker.
async fn trip<S>(up: &Upstream, svc: &S)
where
    S: Service<u64, Response = u64, Error = BoxError> + Clone,
{
    up.set_down(true);
    for _ in 0..4 {
        let _ = svc.clone().oneshot(0).await;
    }
}

fn kind(err: &BoxError) -> Option<RejectionKind> {
    Rejected::find(&**err).map(|r| r.kind())
}

#[tokio::test(start_paused = true)]
async fn closed_open_half_open_closed() {
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());

    up.set_down(true);
    for _ in 0..3 {
        assert!(svc.clone().oneshot(0).await.is_err());
    }
    assert_eq!(handle.state(), BreakerState::Closed, "below minimum_calls");
    assert!(svc.clone().oneshot(0).await.is_err());
    assert!(matches!(handle.state(), BreakerState::Open { .. }));

    let err = svc.clone().oneshot(0).await.unwrap_err();
    assert_eq!(kind(&err), Some(RejectionKind::CircuitOpen));
    assert_eq!(
        Rejected::find(&*err).unwrap().retry_after(),
        Some(Duration::from_secs(10))
    );
    assert_eq!(up.calls(), 4, "refused without calling");

    sleep(Duration::from_secs(10)).await;
    up.set_down(false);
    assert_eq!(svc.clone().oneshot(0).await.unwrap(), 0);
    assert_eq!(handle.state(), BreakerState::HalfOpen);
    assert_eq!(svc.clone().oneshot(0).await.unwrap(), 0);
    assert_eq!(handle.state(), BreakerState::Closed);
    let stats = handle.stats();
    assert_eq!((stats.opened, stats.closed, stats.rejected), (1, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn half_open_lets_exactly_n_probes_through() {
    let up = Upstream::default();
    let layer = breaker().half_open_calls(3);
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    trip(&up, &svc).await;
    sleep(Duration::from_secs(10)).await;
    up.set_down(false);
    let before = up.calls();
    let arrivals: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(svc.clone().oneshot(1)))
        .collect();
    let mut refused = 0;
    for a in arrivals {
        if let Err(err) = a.await.unwrap() {
            assert_eq!(kind(&err), Some(RejectionKind::CircuitOpen));
            refused += 1;
        }
    }
    assert_eq!(
        up.calls() - before,
        3,
        "exactly three probes reached the upstream"
    );
    assert_eq!(refused, 997);
    assert_eq!(handle.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_for_longer() {
    let up = Upstream::default();
    let layer = breaker()
        .half_open_calls(1)
        .open_growth(2.0, Duration::from_secs(60));
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    trip(&up, &svc).await;
    assert_eq!(
        handle.state(),
        BreakerState::Open {
            remaining: Duration::from_secs(10)
        }
    );
    sleep(Duration::from_secs(10)).await;
    assert!(svc.clone().oneshot(0).await.is_err(), "the probe fails");
    assert_eq!(
        handle.state(),
        BreakerState::Open {
            remaining: Duration::from_secs(20)
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_gives_its_place_back() {
    let up = Upstream::default();
    let layer = breaker().half_open_calls(1);
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    trip(&up, &svc).await;
    sleep(Duration::from_secs(10)).await;
    up.set_down(false);
    let probe = tokio::spawn(svc.clone().oneshot(30));
    sleep(Duration::from_secs(1)).await;
    probe.abort();
    let _ = probe.await;
    assert_eq!(
        svc.clone().oneshot(0).await.unwrap(),
        0,
        "a new probe may go"
    );
    assert_eq!(handle.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn forced_states_and_reset() {
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    handle.force_open();
    assert_eq!(handle.state(), BreakerState::ForcedOpen);
    let err = svc.clone().oneshot(0).await.unwrap_err();
    assert_eq!(kind(&err), Some(RejectionKind::CircuitOpen));
    assert_eq!(up.calls(), 0);

    up.set_down(true);
    handle.force_closed();
    for _ in 0..10 {
        assert_eq!(kind(&svc.clone().oneshot(0).await.unwrap_err()), None);
    }
    assert_eq!(up.calls(), 10, "forced closed lets everything through");
    handle.reset();
    assert_eq!(handle.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_delay_opens_it_until_then() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let layer = CircuitBreakerLayer::new().classify(HttpClassifier);
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_: ()| {
            let status = match counted.fetch_add(1, Ordering::SeqCst) {
                0 => 429,
                _ => 200,
            };
            async move {
                Ok::<_, BoxError>(
                    http::Response::builder()
                        .status(status)
                        .header("retry-after", "7")
                        .body(())
                        .unwrap(),
                )
            }
        }));
    assert_eq!(svc.clone().oneshot(()).await.unwrap().status(), 429);
    assert_eq!(
        handle.state(),
        BreakerState::Open {
            remaining: Duration::from_secs(7)
        }
    );
    let err = svc.clone().oneshot(()).await.unwrap_err();
    assert_eq!(
        Rejected::find(&*err).unwrap().retry_after(),
        Some(Duration::from_secs(7))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The upstream named the instant: then everybody goes again, no probing.
    sleep(Duration::from_secs(7)).await;
    assert_eq!(handle.state(), BreakerState::Closed);
    let calls_then: Vec<_> = (0..10)
        .map(|_| tokio::spawn(svc.clone().oneshot(())))
        .collect();
    for call in calls_then {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 11);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_open_it() {
    let up = Upstream::default();
    let layer = breaker().slow_call(Duration::from_secs(5), 0.5);
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    for _ in 0..4 {
        assert_eq!(svc.clone().oneshot(6).await.unwrap(), 6);
    }
    assert!(matches!(handle.state(), BreakerState::Open { .. }));
    assert_eq!(handle.stats().slow, 4);
}

#[tokio::test(start_paused = true)]
async fn settings_changed_after_the_service_was_built_apply_to_its_next_calls() {
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(up.service());
    // Unwatched, slow successes go the way without a lock and count as nothing but successes.
    for _ in 0..4 {
        assert_eq!(svc.clone().oneshot(6).await.unwrap(), 6);
    }
    assert_eq!(handle.stats().slow, 0);
    // Watched from now on, through a clone of the layer: the same service sees it.
    let _ = layer.slow_call(Duration::from_secs(5), 0.5);
    for _ in 0..4 {
        assert_eq!(svc.clone().oneshot(6).await.unwrap(), 6);
    }
    assert_eq!(handle.stats().slow, 4);
    assert!(matches!(handle.state(), BreakerState::Open { .. }));
}

#[tokio::test(start_paused = true)]
async fn a_time_window_forgets_old_failures() {
    let up = Upstream::default();
    let layer = breaker().window(Window::Time(Duration::from_secs(60)));
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    up.set_down(true);
    for _ in 0..3 {
        let _ = svc.clone().oneshot(0).await;
    }
    sleep(Duration::from_secs(61)).await;
    up.set_down(false);
    for _ in 0..3 {
        svc.clone().oneshot(0).await.unwrap();
    }
    up.set_down(true);
    let _ = svc.clone().oneshot(0).await;
    // 1 failure out of 4 recent calls: closed.
    assert_eq!(handle.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn each_key_has_its_own_breaker() {
    let up = Upstream::default();
    let layer = breaker().keyed_by(|secs: &u64| if *secs == 0 { "a" } else { "b" });
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    trip(&up, &svc).await;
    assert!(matches!(
        handle.state_of(&Key::from("a")),
        BreakerState::Open { .. }
    ));
    assert_eq!(handle.state_of(&Key::from("b")), BreakerState::Closed);
    up.set_down(false);
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn refusals_of_other_layers_are_not_counted() {
    let layer = breaker();
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|_: ()| async {
            Err::<(), BoxError>(Rejected::new(RejectionKind::QueueFull).into())
        }));
    for _ in 0..10 {
        let err = svc.clone().oneshot(()).await.unwrap_err();
        assert_eq!(kind(&err), Some(RejectionKind::QueueFull));
    }
    assert_eq!(handle.state(), BreakerState::Closed);
    assert_eq!(handle.stats().failures, 0);
}

/// An HTTP upstream that answers every call with `status`.
fn answering(
    status: Arc<AtomicUsize>,
) -> impl Service<u64, Response = http::Response<()>, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + 'static {
    service_fn(move |_: u64| {
        let code = status.load(Ordering::SeqCst) as u16;
        async move { Ok::<_, BoxError>(http::Response::builder().status(code).body(()).unwrap()) }
    })
}

#[tokio::test(start_paused = true)]
async fn client_errors_say_nothing_about_the_upstream() {
    for code in [400, 401, 404, 422] {
        let status = Arc::new(AtomicUsize::new(code));
        let layer = breaker().classify(HttpClassifier);
        let handle = layer.handle();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(answering(status.clone()));
        for _ in 0..10 {
            assert_eq!(svc.clone().oneshot(0).await.unwrap().status(), code as u16);
        }
        status.store(200, Ordering::SeqCst);
        assert_eq!(
            svc.clone().oneshot(0).await.unwrap().status(),
            200,
            "{code}"
        );
        assert_eq!(handle.state(), BreakerState::Closed);
        assert_eq!(handle.stats().failures, 0);
    }

    // Counted when asked to.
    let status = Arc::new(AtomicUsize::new(400));
    let layer = breaker().classify(HttpClassifier).count_client_errors(true);
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(answering(status));
    for _ in 0..4 {
        svc.clone().oneshot(0).await.unwrap();
    }
    assert!(matches!(handle.state(), BreakerState::Open { .. }));

    // What does say something still counts: 429 and 5xx.
    for code in [429, 500, 503] {
        let status = Arc::new(AtomicUsize::new(code));
        let layer = breaker().classify(HttpClassifier);
        let handle = layer.handle();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(answering(status));
        for _ in 0..4 {
            svc.clone().oneshot(0).await.unwrap();
        }
        assert!(
            matches!(handle.state(), BreakerState::Open { .. }),
            "{code}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_refuses_without_waiting_for_the_inner_service() {
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    // One slot, taken for an hour: the inner service is not ready.
    let svc = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(up.service());
    let busy = tokio::spawn(svc.clone().oneshot(3600));
    tokio::task::yield_now().await;
    handle.force_open();
    let started = tokio::time::Instant::now();
    let refused = tokio::time::timeout(Duration::from_secs(1), svc.clone().oneshot(0)).await;
    let err = refused
        .expect("refused at once, not after the inner service")
        .unwrap_err();
    assert_eq!(kind(&err), Some(RejectionKind::CircuitOpen));
    assert_eq!(started.elapsed(), Duration::ZERO);
    busy.abort();
}

#[tokio::test(start_paused = true)]
async fn idle_keyed_breakers_are_evicted() {
    let layer = breaker().keyed_by(|n: &u64| *n);
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }));
    for n in 0..100_000u64 {
        svc.ready().await.unwrap().call(n + 1_000).await.unwrap();
    }
    let keys = handle.stats().keys;
    assert!(
        keys < 10_000,
        "{keys} breakers kept for 100,000 keys seen once"
    );

    // A breaker that is open, or remembers failures, is not evicted.
    let up = Upstream::default();
    let layer = breaker().keyed_by(|n: &u64| *n);
    let handle = layer.handle();
    // The request is the key; every call takes no time.
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .map_request(|_: u64| 0u64)
        .service(up.service());
    up.set_down(true);
    for _ in 0..4 {
        svc.ready().await.unwrap().call(0).await.ok();
    }
    svc.ready().await.unwrap().call(1).await.ok();
    up.set_down(false);
    for n in 2..100_000u64 {
        svc.ready().await.unwrap().call(n).await.ok();
    }
    assert!(matches!(
        handle.state_of(&Key::from(0u64)),
        BreakerState::Open { .. }
    ));
    up.set_down(true);
    for _ in 0..3 {
        svc.ready().await.unwrap().call(1).await.ok();
    }
    assert!(
        matches!(handle.state_of(&Key::from(1u64)), BreakerState::Open { .. }),
        "key 1 remembered its first failure"
    );
}

#[tokio::test(start_paused = true)]
async fn one_shared_upstream_call_counts_once() {
    // Outside the dedup layer: 20 callers share one failed call, which counts once — below the
    // 4 calls the breaker needs to decide, so it stays closed.
    let up = Upstream::default();
    let layer = breaker().window(Window::Calls(100));
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(crate::DedupLayer::new(|_: &u64| Some(())))
        .service(up.service());
    let together = |svc: &_| {
        let svc: &tower::util::BoxCloneService<u64, u64, BoxError> = svc;
        (0..20)
            .map(|_| tokio::spawn(svc.clone().oneshot(1)))
            .collect::<Vec<_>>()
    };
    let svc = tower::util::BoxCloneService::new(svc);
    up.set_down(true);
    for call in together(&svc) {
        assert!(call.await.unwrap().is_err());
    }
    assert_eq!(up.calls(), 1);
    assert_eq!(handle.stats().failures, 1);
    assert_eq!(handle.state(), BreakerState::Closed);

    // Successes too: one shared success, then three failures, is 75% failed.
    handle.reset();
    up.set_down(false);
    for call in together(&svc) {
        call.await.unwrap().unwrap();
    }
    up.set_down(true);
    for _ in 0..3 {
        assert!(svc.clone().oneshot(0).await.is_err());
    }
    assert!(matches!(handle.state(), BreakerState::Open { .. }));

    // Inside the dedup layer, the shared call passes the breaker once.
    let layer = breaker().window(Window::Calls(100));
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(crate::DedupLayer::new(|_: &u64| Some(())))
        .layer(layer)
        .service(up.service());
    let svc = tower::util::BoxCloneService::new(svc);
    for call in together(&svc) {
        assert!(call.await.unwrap().is_err());
    }
    assert_eq!(handle.stats().failures, 1);
}

#[tokio::test(start_paused = true)]
async fn extreme_settings() {
    // Open "forever" does not overflow.
    let up = Upstream::default();
    let layer = breaker().open_for(Duration::MAX);
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    trip(&up, &svc).await;
    let err = svc.clone().oneshot(0).await.unwrap_err();
    assert_eq!(kind(&err), Some(RejectionKind::CircuitOpen));
    assert!(matches!(handle.state(), BreakerState::Open { .. }));

    // A failure rate of 0 opens on the first failure, never on successes alone.
    let up = Upstream::default();
    let layer = breaker().failure_rate(0.0);
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    for _ in 0..10 {
        svc.clone().oneshot(0).await.unwrap();
    }
    assert_eq!(handle.state(), BreakerState::Closed);
    up.set_down(true);
    let _ = svc.clone().oneshot(0).await;
    assert!(matches!(handle.state(), BreakerState::Open { .. }));

    // A refusal while probes run says when to come back.
    let up = Upstream::default();
    let svc = ServiceBuilder::new()
        .layer(breaker().half_open_calls(1))
        .service(up.service());
    trip(&up, &svc).await;
    up.set_down(false);
    sleep(Duration::from_secs(10)).await;
    let probe = tokio::spawn(svc.clone().oneshot(5));
    tokio::task::yield_now().await;
    let err = svc.clone().oneshot(0).await.unwrap_err();
    let rejected = Rejected::find(&*err).unwrap();
    assert_eq!(rejected.kind(), RejectionKind::CircuitOpen);
    assert!(rejected.retry_after().is_some());
    probe.await.unwrap().unwrap();
}

mod model {
    //! The anonymous breaker, driven call by call, against a plain model of its closed state: a
    //! window of the last `n` outcomes, in the order the calls ended, of the calls let through
    //! since the breaker last changed state or was reset.

    use std::collections::VecDeque;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use proptest::prelude::*;
    use tokio::sync::oneshot;

    use super::*;

    struct Model {
        calls: usize,
        min: usize,
        open: bool,
        generation: u64,
        window: VecDeque<bool>,
        opened: u64,
        failures: u64,
    }

    impl Model {
        fn end(&mut self, generation: u64, failed: bool) {
            self.failures += u64::from(failed);
            if self.open || generation != self.generation {
                return;
            }
            self.window.push_back(failed);
            if self.window.len() > self.calls {
                self.window.pop_front();
            }
            let failures = self.window.iter().filter(|f| **f).count();
            if self.window.len() >= self.min && failures > 0 && failures * 2 >= self.window.len() {
                self.open = true;
                self.generation += 1;
                self.window.clear();
                self.opened += 1;
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Start,
        End { pick: usize, failed: bool },
        Drop { pick: usize },
        Reset,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => Just(Step::Start),
            4 => (any::<usize>(), proptest::bool::weighted(0.15))
                .prop_map(|(pick, failed)| Step::End { pick, failed }),
            1 => any::<usize>().prop_map(|pick| Step::Drop { pick }),
            1 => Just(Step::Reset),
        ]
    }

    type Call = Pin<Box<dyn Future<Output = Result<(), BoxError>>>>;

    fn poll(call: &mut Call) -> Poll<Result<(), BoxError>> {
        call.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn decides_as_a_window_of_the_last_calls_would(
            calls in 1usize..8,
            min in 1usize..6,
            steps in proptest::collection::vec(step(), 1..120),
        ) {
            let layer = CircuitBreakerLayer::new()
                .window(Window::Calls(calls))
                .minimum_calls(min)
                .open_for(Duration::from_secs(3600));
            let handle = layer.handle();
            let mut svc = ServiceBuilder::new().layer(layer).service(service_fn(
                |outcome: oneshot::Receiver<bool>| async move {
                    match outcome.await {
                        Ok(false) => Ok(()),
                        _ => Err::<(), BoxError>("upstream down".into()),
                    }
                },
            ));
            let mut model = Model {
                calls,
                min,
                open: false,
                generation: 0,
                window: VecDeque::new(),
                opened: 0,
                failures: 0,
            };
            let mut running: Vec<(Call, oneshot::Sender<bool>, u64)> = Vec::new();
            for step in steps {
                match step {
                    Step::Start => {
                        let (tx, rx) = oneshot::channel();
                        let mut call: Call = Box::pin(svc.call(rx));
                        match poll(&mut call) {
                            Poll::Pending => {
                                prop_assert!(!model.open, "let through while open");
                                running.push((call, tx, model.generation));
                            }
                            Poll::Ready(result) => {
                                prop_assert!(model.open, "refused while closed");
                                let err = result.unwrap_err();
                                prop_assert_eq!(kind(&err), Some(RejectionKind::CircuitOpen));
                            }
                        }
                    }
                    Step::End { pick, failed } if !running.is_empty() => {
                        let (mut call, tx, generation) = running.swap_remove(pick % running.len());
                        tx.send(failed).unwrap();
                        let Poll::Ready(result) = poll(&mut call) else {
                            panic!("a call whose upstream answered is still pending");
                        };
                        prop_assert_eq!(result.is_err(), failed);
                        model.end(generation, failed);
                    }
                    Step::Drop { pick } if !running.is_empty() => {
                        drop(running.swap_remove(pick % running.len()));
                    }
                    Step::Reset => {
                        handle.reset();
                        model.open = false;
                        model.generation += 1;
                        model.window.clear();
                    }
                    _ => {}
                }
                let open = matches!(handle.state(), BreakerState::Open { .. });
                prop_assert_eq!(open, model.open);
                let stats = handle.stats();
                prop_assert_eq!(stats.opened, model.opened);
                prop_assert_eq!(stats.failures, model.failures);
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn successes_beyond_the_window_weigh_nothing_and_lose_nothing() {
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    // Far more successes than the window of 10 holds, most of them counted without the lock.
    for _ in 0..1_000 {
        svc.clone().oneshot(0).await.unwrap();
    }
    assert_eq!(handle.stats().calls, 1_000);
    // The window holds 10 successes: each failure replaces one, and the fifth makes half of
    // the window failures, which opens the breaker (rate 0.5) — not sooner, not later.
    up.set_down(true);
    for failure in 1..=5 {
        assert_eq!(
            handle.state(),
            BreakerState::Closed,
            "before failure {failure}"
        );
        let err = svc.clone().oneshot(0).await.unwrap_err();
        assert_eq!(kind(&err), None, "failure {failure} reached the upstream");
    }
    assert!(matches!(handle.state(), BreakerState::Open { .. }));
    assert_eq!(up.calls(), 1_005);
}
