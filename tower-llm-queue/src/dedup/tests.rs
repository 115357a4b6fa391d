use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;

use tokio::time::sleep;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};

use super::*;

/// Requests are `(key, seconds of work)`; the upstream counts its calls and answers with a
/// number that differs per call.
#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

struct CountDrop(Arc<AtomicUsize>);
impl Drop for CountDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Upstream {
    fn service(
        &self,
    ) -> impl Service<(u64, u64), Response = usize, Error = BoxError, Future = impl Send>
           + Clone
           + Send
           + 'static {
        let (calls, dropped) = (self.calls.clone(), self.dropped.clone());
        service_fn(move |(key, secs): (u64, u64)| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let guard = CountDrop(dropped.clone());
            async move {
                sleep(Duration::from_secs(secs)).await;
                drop(guard);
                match key {
                    666 => panic!("the upstream panicked"),
                    500 => Err::<usize, BoxError>("upstream error 500".into()),
                    _ => Ok(n),
                }
            }
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn by_key(req: &(u64, u64)) -> Option<u64> {
    Some(req.0)
}

#[tokio::test(start_paused = true)]
async fn a_thousand_identical_requests_make_one_call() {
    let up = Upstream::default();
    let layer = DedupLayer::new(by_key);
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    let tasks: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(svc.clone().oneshot((1, 5))))
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap().unwrap());
    }
    assert_eq!(up.calls(), 1);
    assert!(answers.iter().all(|a| *a == answers[0]));
    let stats = handle.stats();
    assert_eq!(
        (stats.misses, stats.coalesced, stats.in_flight),
        (1, 999, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn distinct_keys_and_no_key_never_share() {
    let up = Upstream::default();
    let layer = DedupLayer::new(|r: &(u64, u64)| (r.0 != 0).then_some(r.0));
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    let tasks: Vec<_> = [1, 2, 0, 0, 3]
        .into_iter()
        .map(|k| tokio::spawn(svc.clone().oneshot((k, 1))))
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap().unwrap());
    }
    answers.sort();
    answers.dedup();
    assert_eq!(answers.len(), 5, "five calls, five different answers");
    assert_eq!(up.calls(), 5);
    assert_eq!(handle.stats().bypassed, 2);
}

#[tokio::test(start_paused = true)]
async fn the_call_goes_on_when_its_leader_leaves() {
    let up = Upstream::default();
    let svc = ServiceBuilder::new()
        .layer(DedupLayer::new(by_key))
        .service(up.service());
    let leader = tokio::spawn(svc.clone().oneshot((1, 10)));
    sleep(Duration::from_secs(1)).await;
    let followers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot((1, 10))))
        .collect();
    sleep(Duration::from_secs(1)).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    for f in followers {
        assert_eq!(f.await.unwrap().unwrap(), 0);
    }
    assert_eq!(up.calls(), 1);
    assert_eq!(
        up.dropped.load(Ordering::SeqCst),
        1,
        "the call finished normally"
    );
}

#[tokio::test(start_paused = true)]
async fn the_call_is_dropped_when_every_waiter_leaves() {
    let up = Upstream::default();
    let layer = DedupLayer::new(by_key);
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    let waiters: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot((1, 60))))
        .collect();
    sleep(Duration::from_secs(1)).await;
    assert_eq!(up.calls(), 1);
    for w in waiters {
        w.abort();
        let _ = w.await;
    }
    tokio::task::yield_now().await;
    assert_eq!(
        up.dropped.load(Ordering::SeqCst),
        1,
        "the inner future was dropped"
    );
    assert_eq!(handle.stats().in_flight, 0);
    // The key is free: a new request makes a new call.
    assert_eq!(svc.oneshot((1, 1)).await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_leader_alone_that_leaves_drops_its_call_at_once() {
    // The call runs in the leader's own task: with nobody else waiting, dropping the leader
    // drops the call then and there, and the key is free for the next request.
    let up = Upstream::default();
    let layer = DedupLayer::new(by_key);
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    let mut leader = Box::pin(svc.clone().oneshot((1, 60)));
    assert!(futures_util::FutureExt::now_or_never(leader.as_mut()).is_none());
    assert_eq!((up.calls(), handle.stats().in_flight), (1, 1));
    drop(leader);
    assert_eq!(
        up.dropped.load(Ordering::SeqCst),
        1,
        "dropped with its leader"
    );
    assert_eq!(handle.stats().in_flight, 0);
    assert_eq!(svc.oneshot((1, 1)).await.unwrap(), 1);
    assert_eq!(up.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_panic_fails_every_waiter_and_frees_the_key() {
    let up = Upstream::default();
    let layer = DedupLayer::new(by_key);
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    let waiters: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot((666, 1))))
        .collect();
    for w in waiters {
        let err = w.await.unwrap().unwrap_err();
        let failed = err.downcast_ref::<CallFailed>().expect("a CallFailed");
        assert!(failed.is_panic());
        assert!(err.to_string().contains("the upstream panicked"));
    }
    assert_eq!(handle.stats().panicked, 1);
    assert_eq!(handle.stats().in_flight, 0);
    assert!(svc.clone().oneshot((666, 1)).await.is_err());
    assert_eq!(up.calls(), 2, "the key was usable again at once");
}

#[tokio::test(start_paused = true)]
async fn errors_reach_every_waiter_and_are_not_cached() {
    let up = Upstream::default();
    let svc = ServiceBuilder::new()
        .layer(DedupLayer::new(by_key).ttl(Duration::from_secs(60)))
        .service(up.service());
    // One waiter: the inner error itself.
    let err = svc.clone().oneshot((500, 1)).await.unwrap_err();
    assert!(err.downcast_ref::<CallFailed>().is_none());
    assert_eq!(err.to_string(), "upstream error 500");
    // Several: each a CallFailed whose source is the inner error.
    let waiters: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot((500, 1))))
        .collect();
    for w in waiters {
        let err = w.await.unwrap().unwrap_err();
        let failed = err.downcast_ref::<CallFailed>().unwrap();
        assert!(!failed.is_panic());
        let source = std::error::Error::source(failed).unwrap();
        assert_eq!(source.to_string(), "upstream error 500");
    }
    assert_eq!(up.calls(), 2, "errors were not served from the cache");
}

#[tokio::test(start_paused = true)]
async fn a_negative_ttl_caches_errors() {
    let up = Upstream::default();
    let svc = ServiceBuilder::new()
        .layer(DedupLayer::new(by_key).negative_ttl(Duration::from_secs(5)))
        .service(up.service());
    assert!(svc.clone().oneshot((500, 1)).await.is_err());
    let err = svc.clone().oneshot((500, 1)).await.unwrap_err();
    assert!(err.downcast_ref::<CallFailed>().is_some());
    assert_eq!(up.calls(), 1);
    sleep(Duration::from_secs(5)).await;
    assert!(svc.clone().oneshot((500, 1)).await.is_err());
    assert_eq!(up.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn results_are_cached_until_they_expire() {
    let up = Upstream::default();
    let layer = DedupLayer::new(by_key).ttl(Duration::from_secs(300));
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    assert_eq!(svc.clone().oneshot((1, 1)).await.unwrap(), 0);
    sleep(Duration::from_secs(299)).await;
    assert_eq!(
        svc.clone().oneshot((1, 1)).await.unwrap(),
        0,
        "still cached"
    );
    sleep(Duration::from_secs(1)).await;
    assert_eq!(svc.clone().oneshot((1, 1)).await.unwrap(), 1, "expired");
    let stats = handle.stats();
    assert_eq!((stats.hits, stats.misses), (1, 2));
}

#[tokio::test(start_paused = true)]
async fn without_ttl_nothing_is_cached() {
    let up = Upstream::default();
    let svc = ServiceBuilder::new()
        .layer(DedupLayer::new(by_key))
        .service(up.service());
    assert_eq!(svc.clone().oneshot((1, 0)).await.unwrap(), 0);
    assert_eq!(svc.clone().oneshot((1, 0)).await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_cache_stays_within_max_entries() {
    // A million distinct results go through the layer's own bookkeeping (join, then finish),
    // without the cost of a task per call.
    let layer = DedupLayer::new(by_key)
        .ttl(Duration::from_secs(3600))
        .max_entries(1_000);
    let handle = layer.handle();
    let shared = &handle.shared;
    for key in 0..1_000_000u64 {
        match shared.join::<u64>(&key) {
            flight::Joined::Lead(seat) => {
                let answer = shared.finish(&key, seat.flight, flight::Ended::Ok(key));
                assert!(matches!(answer, Some((Ok(k), true)) if k == key));
            }
            _ => panic!("every key is new"),
        }
    }
    let stats = handle.stats();
    assert_eq!(stats.misses, 1_000_000);
    assert_eq!(stats.in_flight, 0);
    assert!(stats.entries <= 1_000, "{} entries", stats.entries);
    assert!(
        stats.entries >= 500,
        "the cache is used: {} entries",
        stats.entries
    );
    // The most recent result is served.
    assert!(matches!(
        shared.join::<u64>(&999_999),
        flight::Joined::Hit(Ok(999_999))
    ));
}

#[tokio::test(start_paused = true)]
async fn buffered_http_responses_can_be_shared() {
    use http_body_util::BodyExt;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let upstream = service_fn(move |_: ::http::Request<()>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async {
            sleep(Duration::from_secs(1)).await;
            let body = http_body_util::Full::new(bytes::Bytes::from("plan"));
            Ok::<_, BoxError>(::http::Response::new(body))
        }
    });
    let svc = ServiceBuilder::new()
        .layer(DedupLayer::new(|r: &::http::Request<()>| {
            Some(r.uri().path().to_string())
        }))
        .layer(crate::buffer::BufferResponseLayer::new(1024))
        .service(upstream);
    let a = tokio::spawn(svc.clone().oneshot(::http::Request::new(())));
    let b = tokio::spawn(svc.clone().oneshot(::http::Request::new(())));
    for t in [a, b] {
        let body = t
            .await
            .unwrap()
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap();
        assert_eq!(body.to_bytes(), "plan");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let small = ServiceBuilder::new()
        .layer(crate::buffer::BufferResponseLayer::new(2))
        .service(service_fn(|_: ()| async {
            Ok::<_, BoxError>(::http::Response::new(http_body_util::Full::new(
                bytes::Bytes::from("too long"),
            )))
        }));
    let err = small.oneshot(()).await.unwrap_err();
    assert!(err.is::<crate::buffer::BodyTooLarge>(), "{err}");
}

#[tokio::test(start_paused = true)]
async fn followers_that_leave_are_forgotten_at_once() {
    let up = Upstream::default();
    let layer = DedupLayer::new(by_key);
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(up.service());
    let leader = tokio::spawn(svc.clone().oneshot((1, 3600)));
    tokio::task::yield_now().await;
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    for _ in 0..100_000 {
        let mut follower = Box::pin(svc.clone().oneshot((1, 3600)));
        assert!(follower.as_mut().poll(&mut cx).is_pending());
    }
    assert_eq!(handle.shared.waiters(&1), 1, "only the leader still waits");
    assert_eq!(up.calls(), 1);
    leader.abort();
}

#[tokio::test(start_paused = true)]
async fn the_shared_call_runs_in_the_span_of_its_leader() {
    use tracing_subscriber::layer::SubscriberExt;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(DedupLayer::new(|_: &u64| Some(())))
        .service(service_fn(move |_: u64| {
            let name = tracing::Span::current().metadata().map(|m| m.name());
            record.lock().unwrap().push(name);
            async move { Ok::<_, BoxError>(()) }
        }));
    let subscriber =
        tracing_subscriber::registry().with(tracing_subscriber::layer::Identity::new());
    let _default = tracing::subscriber::set_default(subscriber);
    let span = tracing::info_span!("chat_request");
    tracing::Instrument::instrument(svc.oneshot(1), span)
        .await
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), [Some("chat_request")]);
}

mod callers_that_come_and_go {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Identical callers arrive and leave at random — the one that started the call among
        /// them. Every caller that stays is answered, none hangs, and afterwards no call is in
        /// flight and every call made has ended.
        #[test]
        fn every_caller_that_stays_is_answered(
            callers in proptest::collection::vec((0u64..3_000, proptest::option::of(0u64..3_000)), 1..30),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(async {
                let up = Upstream::default();
                let layer = DedupLayer::new(by_key);
                let handle = layer.handle();
                let svc = ServiceBuilder::new().layer(layer).service(up.service());
                let tasks: Vec<_> = callers
                    .iter()
                    .map(|&(arrive, leave)| {
                        let svc = svc.clone();
                        tokio::spawn(async move {
                            sleep(Duration::from_millis(arrive)).await;
                            let call = svc.oneshot((1, 1));
                            match leave {
                                Some(after) => {
                                    tokio::time::timeout(Duration::from_millis(after), call)
                                        .await
                                        .ok()
                                }
                                None => Some(call.await),
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    let answered = tokio::time::timeout(Duration::from_secs(60), task)
                        .await
                        .expect("no caller hangs")
                        .unwrap();
                    if let Some(result) = answered {
                        assert!(result.is_ok(), "{:?}", result.err());
                    }
                }
                sleep(Duration::from_secs(5)).await;
                assert_eq!(handle.stats().in_flight, 0);
                assert_eq!(up.dropped.load(Ordering::SeqCst), up.calls(), "every call ended");
            });
        }
    }
}
