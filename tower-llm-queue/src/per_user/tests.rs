use std::time::Duration;

use tokio::time::sleep;
use tower::{service_fn, BoxError, Service, ServiceBuilder};

use super::*;
use crate::{Rejected, RejectionKind};

fn kind(err: &BoxError) -> RejectionKind {
    Rejected::find(&**err).expect("a rejection").kind()
}

/// Requests are `(user, seconds of work)`.
fn upstream(
) -> impl Service<(u64, u64), Response = u64, Error = BoxError, Future = impl Send> + Clone {
    service_fn(|(_, secs): (u64, u64)| async move {
        sleep(Duration::from_secs(secs)).await;
        Ok::<_, BoxError>(secs)
    })
}

fn by_user(req: &(u64, u64)) -> u64 {
    req.0
}

#[tokio::test(start_paused = true)]
async fn the_excess_is_refused_at_once_per_user() {
    let layer = PerUserConcurrencyLayer::new(2, by_user);
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new().layer(layer).service(upstream());
    let a1 = tokio::spawn(svc.call((1, 10)));
    let a2 = tokio::spawn(svc.call((1, 10)));
    let b1 = tokio::spawn(svc.call((2, 10)));
    tokio::task::yield_now().await;
    assert_eq!(handle.in_flight(&Key::from(1u64)), 2);
    let err = svc.call((1, 1)).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::UserLimit);
    assert!(err.to_string().contains("at most 2 per user"));
    let stats = handle.stats();
    assert_eq!((stats.users, stats.in_flight, stats.rejected), (2, 3, 1));
    for h in [a1, a2, b1] {
        h.await.unwrap().unwrap();
    }
    let stats = handle.stats();
    assert_eq!((stats.users, stats.in_flight, stats.completed), (0, 0, 3));
}

#[tokio::test(start_paused = true)]
async fn waiters_go_in_arrival_order() {
    let layer = PerUserConcurrencyLayer::new(1, by_user).wait(2, Duration::from_secs(60));
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new().layer(layer).service(upstream());
    let start = tokio::time::Instant::now();
    let first = tokio::spawn(svc.call((1, 3)));
    let second = tokio::spawn(svc.call((1, 2)));
    let third = tokio::spawn(svc.call((1, 1)));
    tokio::task::yield_now().await;
    // The waiting line holds two: the next is refused at once.
    let err = svc.call((1, 1)).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::UserLimit);
    assert_eq!(handle.stats().waiting, 2);

    first.await.unwrap().unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    second.await.unwrap().unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    third.await.unwrap().unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(6));
    let stats = handle.stats();
    assert_eq!((stats.users, stats.waiting, stats.waited), (0, 0, 2));
}

#[tokio::test(start_paused = true)]
async fn a_wait_times_out() {
    let layer = PerUserConcurrencyLayer::new(1, by_user).wait(5, Duration::from_secs(2));
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new().layer(layer).service(upstream());
    let long = tokio::spawn(svc.call((1, 10)));
    let start = tokio::time::Instant::now();
    let err = svc.call((1, 1)).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::UserLimit);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    let stats = handle.stats();
    assert_eq!((stats.timed_out, stats.waiting, stats.in_flight), (1, 0, 1));
    long.await.unwrap().unwrap();
    assert_eq!(handle.stats().users, 0);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_frees_its_place() {
    let layer = PerUserConcurrencyLayer::new(1, by_user).wait(1, Duration::from_secs(60));
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new().layer(layer).service(upstream());
    let long = tokio::spawn(svc.call((1, 10)));
    let waiting = tokio::spawn(svc.call((1, 1)));
    tokio::task::yield_now().await;
    assert_eq!(handle.stats().waiting, 1);
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    assert_eq!(handle.stats().waiting, 0);
    // The place is free again: a new waiter is accepted, and served after the long one.
    let next = tokio::spawn(svc.call((1, 1)));
    long.await.unwrap().unwrap();
    assert_eq!(next.await.unwrap().unwrap(), 1);
    let stats = handle.stats();
    assert_eq!((stats.users, stats.cancelled, stats.completed), (0, 1, 2));
}

#[tokio::test(start_paused = true)]
async fn a_missing_key_can_be_refused_or_anonymous() {
    let ok = service_fn(|_: http::Request<()>| async { Ok::<_, BoxError>(()) });
    let mut strict = ServiceBuilder::new()
        .layer(PerUserConcurrencyLayer::new(
            1,
            crate::key::HeaderKey::new("x-user-id").or_reject(),
        ))
        .service(ok);
    let err = strict.call(http::Request::new(())).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::MissingKey);

    let layer = PerUserConcurrencyLayer::new(1, crate::key::HeaderKey::new("x-user-id"));
    let handle = layer.handle();
    let mut lenient = ServiceBuilder::new().layer(layer).service(ok);
    lenient.call(http::Request::new(())).await.unwrap();
    assert_eq!(handle.stats().completed, 1);
}

#[tokio::test(start_paused = true)]
async fn memory_returns_to_baseline_after_a_million_users() {
    let layer = PerUserConcurrencyLayer::new(1, |n: &u64| *n);
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|n: u64| async move {
            tokio::task::yield_now().await;
            Ok::<_, BoxError>(n)
        }));
    // Batches of 10,000 concurrent users, 1,000,000 distinct users in all.
    let mut peak = 0;
    for batch in 0..100u64 {
        let futures: Vec<_> = (0..10_000u64)
            .map(|n| svc.call(batch * 10_000 + n))
            .collect();
        peak = peak.max(handle.shared.user_capacity().0);
        for f in futures {
            f.await.unwrap();
        }
    }
    let stats = handle.stats();
    assert_eq!(
        (stats.users, stats.in_flight, stats.completed),
        (0, 0, 1_000_000)
    );
    let (capacity, shards) = handle.shared.user_capacity();
    assert!(peak >= 10_000, "the batches were really concurrent");
    assert!(capacity <= shards * 64, "{capacity} entries of room left");
}

#[tokio::test(start_paused = true)]
async fn a_wait_shorter_than_a_millisecond_is_kept() {
    let layer = PerUserConcurrencyLayer::new(1, by_user).wait(1, Duration::from_micros(900));
    let mut svc = ServiceBuilder::new().layer(layer).service(upstream());
    let _running = tokio::spawn(svc.call((1, 10)));
    tokio::task::yield_now().await;
    let started = tokio::time::Instant::now();
    let err = svc.call((1, 1)).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::UserLimit);
    // tokio's timers tick in milliseconds: the wait ends at the first tick after 900 µs.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_micros(900) && waited <= Duration::from_millis(1),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refusal_says_when_a_slot_is_likely_to_free() {
    let layer = PerUserConcurrencyLayer::new(2, by_user);
    let mut svc = ServiceBuilder::new().layer(layer).service(upstream());
    let retry_after = |err: BoxError| Rejected::find(&*err).unwrap().retry_after();
    let _a = tokio::spawn(svc.call((1, 100)));
    let _b = tokio::spawn(svc.call((1, 100)));
    tokio::task::yield_now().await;
    // Nothing measured yet: a second of service time, two slots held.
    let err = svc.call((1, 1)).await.unwrap_err();
    assert_eq!(retry_after(err), Some(Duration::from_millis(500)));
    // Requests of 4 s each, measured: one of two slots frees in about 2 s.
    for _ in 0..16 {
        svc.call((2, 4)).await.unwrap();
    }
    let err = svc.call((1, 1)).await.unwrap_err();
    assert_eq!(retry_after(err), Some(Duration::from_secs(2)));
}
