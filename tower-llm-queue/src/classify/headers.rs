//! Reading "come back later" from the headers and messages of LLM APIs. Malformed values are
//! ignored, never a panic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

/// Longest delay any header may ask for; anything above is treated as malformed.
const LONGEST: Duration = Duration::from_secs(7 * 24 * 3600);

/// The delay an upstream asks for before the next call, from the first of these that is present
/// and well formed:
///
/// 1. `retry-after-ms`: milliseconds (OpenAI-compatible servers, Azure);
/// 2. `retry-after`: seconds or an HTTP date (RFC 9110);
/// 3. OpenAI's `x-ratelimit-reset-requests` / `x-ratelimit-reset-tokens`: durations such as
///    `1m30s`, `6s` or `12ms` — of a limit whose `x-ratelimit-remaining-*` is 0, the longer;
/// 4. Anthropic's `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset`:
///    RFC 3339 instants — of a limit whose `-remaining` is 0, the latest.
///
/// OpenAI and Anthropic send their reset headers on every response, whether or not a limit is
/// spent; a reset says "wait" only for a spent limit. [`response_delay`] also reads them on a 429
/// that does not say which limit it hit.
///
/// ```
/// use std::time::Duration;
/// use tower_llm_queue::classify::retry_delay;
/// let mut headers = http::HeaderMap::new();
/// headers.insert("x-ratelimit-reset-requests", "1m30s".parse().unwrap());
/// headers.insert("x-ratelimit-remaining-requests", "59".parse().unwrap());
/// assert_eq!(retry_delay(&headers), None, "the limit is not spent");
/// headers.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
/// assert_eq!(retry_delay(&headers), Some(Duration::from_secs(90)));
/// ```
pub fn retry_delay(headers: &HeaderMap) -> Option<Duration> {
    delay_in(headers, false)
}

/// The delay a response asks for before the next call: [`retry_delay`] of its headers, and on a
/// 429 — which says some limit is spent — the reset headers even when none says which.
///
/// ```
/// use std::time::Duration;
/// use tower_llm_queue::classify::response_delay;
/// let throttled = http::Response::builder()
///     .status(429)
///     .header("x-ratelimit-reset-tokens", "6s")
///     .body(())
///     .unwrap();
/// assert_eq!(response_delay(&throttled), Some(Duration::from_secs(6)));
/// ```
pub fn response_delay<B>(response: &http::Response<B>) -> Option<Duration> {
    delay_in(
        response.headers(),
        response.status() == http::StatusCode::TOO_MANY_REQUESTS,
    )
}

/// The delay in `headers`; with `throttled`, a reset counts even when no limit says it is spent.
fn delay_in(headers: &HeaderMap, throttled: bool) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = text("retry-after-ms").and_then(parse_number) {
        return seconds(ms / 1000.0);
    }
    if let Some(delay) = text("retry-after").and_then(parse_retry_after) {
        return Some(delay);
    }
    let spent = |remaining: &str| text(remaining).is_some_and(|v| v == "0");
    let openai: Vec<(bool, Duration)> = ["requests", "tokens"]
        .iter()
        .filter_map(|kind| {
            let reset = text(&format!("x-ratelimit-reset-{kind}")).and_then(parse_go_duration)?;
            Some((spent(&format!("x-ratelimit-remaining-{kind}")), reset))
        })
        .collect();
    if let Some(delay) = pick(&openai, throttled) {
        return Some(delay);
    }
    let now = SystemTime::now();
    let anthropic: Vec<(bool, Duration)> = ["requests", "tokens", "input-tokens", "output-tokens"]
        .iter()
        .filter_map(|kind| {
            let at = text(&format!("anthropic-ratelimit-{kind}-reset")).and_then(parse_rfc3339)?;
            let delay = at.duration_since(now).unwrap_or(Duration::ZERO);
            let empty = spent(&format!("anthropic-ratelimit-{kind}-remaining"));
            Some((empty, bounded(delay)?))
        })
        .collect();
    pick(&anthropic, throttled)
}

/// The longest delay among the spent limits; when `throttled` and none says it is spent, the
/// longest of all.
fn pick(resets: &[(bool, Duration)], throttled: bool) -> Option<Duration> {
    let spent = resets.iter().filter(|(e, _)| *e).map(|(_, d)| *d).max();
    match (spent, throttled) {
        (Some(delay), _) => Some(delay),
        (None, true) => resets.iter().map(|(_, d)| *d).max(),
        (None, false) => None,
    }
}

fn bounded(delay: Duration) -> Option<Duration> {
    (delay <= LONGEST).then_some(delay)
}

/// A delay of `secs` seconds, if it is one and no longer than [`LONGEST`].
fn seconds(secs: f64) -> Option<Duration> {
    bounded(Duration::try_from_secs_f64(secs).ok()?)
}

fn parse_number(s: &str) -> Option<f64> {
    let n: f64 = s.parse().ok()?;
    (n.is_finite() && n >= 0.0).then_some(n)
}

fn parse_retry_after(s: &str) -> Option<Duration> {
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return seconds(parse_number(s)?);
    }
    let at = httpdate::parse_http_date(s).ok()?;
    bounded(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Durations written like Go's `time.Duration`: `1h2m3.5s`, `1m30s`, `6s`, `12ms`, `250us`.
fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = parse_number(&rest[..digits])?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    seconds(total)
}

/// An RFC 3339 instant such as `2026-11-22T15:04:05Z` or `2026-11-22T15:04:05.5+01:00`.
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(range)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(frac.len());
        if digits == 0 {
            return None;
        }
        let padded: String = frac[..digits]
            .chars()
            .chain("000000000".chars())
            .take(9)
            .collect();
        nanos = padded.parse().ok()?;
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            let h: i64 = rest.get(1..3)?.parse().ok()?;
            let m: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (h * 3600 + m * 60)
        }
    };
    // Days from the civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    let secs = u64::try_from(secs).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// Finds a retry delay in an error message or body, as Gemini writes it: `Please retry in
/// 46.2s.` or `"retryDelay": "46s"`.
///
/// ```
/// use std::time::Duration;
/// use tower_llm_queue::classify::retry_delay_in_text;
/// assert_eq!(retry_delay_in_text("Quota exceeded. Please retry in 46s."), Some(Duration::from_secs(46)));
/// assert_eq!(retry_delay_in_text(r#"{"retryDelay": "2.5s"}"#), Some(Duration::from_millis(2500)));
/// assert_eq!(retry_delay_in_text("try later"), None);
/// ```
pub fn retry_delay_in_text(text: &str) -> Option<Duration> {
    let lower = text.to_ascii_lowercase();
    for marker in ["retry in ", "\"retrydelay\":"] {
        let Some(at) = lower.find(marker) else {
            continue;
        };
        let after = lower[at + marker.len()..]
            .trim_start()
            .trim_start_matches('"');
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
            .unwrap_or(after.len());
        let token = after[..end].trim_end_matches('.');
        if let Some(delay) = parse_go_duration(token) {
            return Some(delay);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Classify;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn every_header_form() {
        let secs = Duration::from_secs;
        assert_eq!(
            retry_delay(&headers(&[("retry-after", "7")])),
            Some(secs(7))
        );
        assert_eq!(
            retry_delay(&headers(&[
                ("retry-after-ms", "1500"),
                ("retry-after", "9")
            ])),
            Some(Duration::from_millis(1500))
        );
        let soon = httpdate::fmt_http_date(SystemTime::now() + secs(120));
        let delay = retry_delay(&headers(&[("retry-after", &soon)])).unwrap();
        assert!(delay > secs(115) && delay <= secs(120), "{delay:?}");
        assert_eq!(
            retry_delay(&headers(&[
                ("x-ratelimit-reset-requests", "1m30s"),
                ("x-ratelimit-remaining-requests", "0"),
            ])),
            Some(secs(90))
        );
        assert_eq!(
            retry_delay(&headers(&[
                ("x-ratelimit-reset-requests", "1m30s"),
                ("x-ratelimit-remaining-requests", "12"),
                ("x-ratelimit-reset-tokens", "12ms"),
                ("x-ratelimit-remaining-tokens", "0"),
            ])),
            Some(Duration::from_millis(12))
        );
        let at = SystemTime::now() + secs(30);
        let stamp = format_rfc3339(at);
        let delay = retry_delay(&headers(&[
            ("anthropic-ratelimit-requests-reset", &stamp),
            ("anthropic-ratelimit-requests-remaining", "0"),
        ]))
        .unwrap();
        assert!(
            delay > secs(28) && delay <= secs(30),
            "{delay:?} from {stamp}"
        );
        assert_eq!(retry_delay(&headers(&[])), None);
    }

    fn response(status: u16, pairs: &[(&str, &str)]) -> http::Response<()> {
        let mut response = http::Response::new(());
        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
        *response.headers_mut() = headers(pairs);
        response
    }

    /// Header sets as OpenAI and Anthropic send them: their reset headers come with every
    /// response, spent limit or not.
    #[test]
    fn resets_count_only_for_a_spent_limit_or_a_429() {
        let secs = Duration::from_secs;
        let openai = |remaining_requests: &'static str, remaining_tokens: &'static str| {
            vec![
                ("x-ratelimit-limit-requests", "10000"),
                ("x-ratelimit-remaining-requests", remaining_requests),
                ("x-ratelimit-reset-requests", "6m0s"),
                ("x-ratelimit-limit-tokens", "2000000"),
                ("x-ratelimit-remaining-tokens", remaining_tokens),
                ("x-ratelimit-reset-tokens", "1m30s"),
            ]
        };
        // A 500 or 503 while nothing is spent asks for no wait.
        for status in [500, 503] {
            assert_eq!(
                response_delay(&response(status, &openai("9999", "1999970"))),
                None
            );
        }
        // The token limit is spent: its reset, not the longer one of requests.
        assert_eq!(
            response_delay(&response(429, &openai("9998", "0"))),
            Some(secs(90))
        );
        assert_eq!(
            response_delay(&response(503, &openai("9998", "0"))),
            Some(secs(90))
        );
        // A 429 that names no spent limit: the longest reset.
        let unnamed = [
            ("x-ratelimit-reset-requests", "6m0s"),
            ("x-ratelimit-reset-tokens", "1s"),
        ];
        assert_eq!(response_delay(&response(429, &unnamed)), Some(secs(360)));

        let in_a_minute = format_rfc3339(SystemTime::now() + secs(60));
        let anthropic = |remaining: &'static str| {
            vec![
                ("anthropic-ratelimit-requests-limit", "4000"),
                ("anthropic-ratelimit-requests-remaining", remaining),
                ("anthropic-ratelimit-requests-reset", in_a_minute.as_str()),
            ]
        };
        let overloaded = response(529, &anthropic("3999"));
        assert_eq!(response_delay(&overloaded), None);
        assert_eq!(
            crate::classify::HttpClassifier.classify(Ok(&overloaded)),
            crate::classify::Outcome::RETRYABLE
        );
        for status in [429, 503] {
            let delay = response_delay(&response(status, &anthropic("0"))).unwrap();
            assert!(delay > secs(58) && delay <= secs(60), "{delay:?}");
        }
    }

    #[test]
    fn malformed_values_are_ignored() {
        let huge = "9".repeat(300);
        for bad in [
            "-3",
            "soon",
            "NaN",
            "inf",
            "1e400",
            "1e300",
            "",
            "9999999999999",
            &huge,
        ] {
            assert_eq!(
                retry_delay(&headers(&[("retry-after", bad)])),
                None,
                "{bad:?}"
            );
            assert_eq!(
                retry_delay(&headers(&[("retry-after-ms", bad)])),
                None,
                "{bad:?}"
            );
        }
        for bad in ["1x", "m", "1.2.3s", "s1", "1e300s", "99999999999999999999h"] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
        for bad in [
            "2026-13-01T00:00:00Z",
            "2026-01-01",
            "2026-01-01T00:00:00+0100",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rfc3339_offsets_and_fractions() {
        let z = parse_rfc3339("2024-02-29T12:00:00Z").unwrap();
        let plus = parse_rfc3339("2024-02-29T13:30:00.250+01:30").unwrap();
        assert_eq!(plus.duration_since(z).unwrap(), Duration::from_millis(250));
        assert_eq!(
            z.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_709_208_000
        );
    }

    /// Writes an instant in RFC 3339 (UTC), the inverse of `parse_rfc3339` for the tests.
    fn format_rfc3339(at: SystemTime) -> String {
        let secs = at.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }

    proptest! {
        #[test]
        fn arbitrary_values_never_panic(value in "[0-9.emhsu:+TZ-]{0,30}|\\PC{0,40}", name in 0usize..9) {
            let names = [
                "retry-after", "retry-after-ms", "x-ratelimit-reset-requests",
                "x-ratelimit-reset-tokens", "x-ratelimit-remaining-tokens",
                "anthropic-ratelimit-requests-reset", "anthropic-ratelimit-tokens-reset",
                "anthropic-ratelimit-requests-remaining", "retry-after",
            ];
            let mut map = HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(&value) {
                map.insert(names[name], v);
            }
            if let Some(d) = retry_delay(&map) {
                prop_assert!(d <= LONGEST);
            }
            let _ = retry_delay_in_text(&value);
            let _ = parse_rfc3339(&value);
            let _ = parse_go_duration(&value);
        }
    }
}
