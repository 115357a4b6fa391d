//! The mock LLM provider: its token counts, replies and configuration.

use std::time::Duration;

use tower_llm_queue_servers::mock::{
    addr_from_lookup, count_tokens, reply_for, split_tokens, Faults, MockConfig, ENV_VARS,
};

// ---------------------------------------------------------------------------------------------
// Tokens and replies

#[test]
fn tokens_are_words_and_marks() {
    assert_eq!(count_tokens("Hello, world!"), 4);
    assert_eq!(count_tokens("  spaced   out  "), 2);
    assert_eq!(count_tokens("don't stop-now 42x"), 7);
    assert_eq!(count_tokens(""), 0);
    assert_eq!(
        split_tokens("Hello, world! "),
        ["Hello", ",", " world", "! "]
    );
    let text = "  Some text: with (marks), digits 123 and ünïcode… ";
    let pieces = split_tokens(text);
    assert_eq!(pieces.concat(), text);
    assert_eq!(pieces.len() as u64, count_tokens(text));
}

#[test]
fn replies_are_deterministic_modest_and_truncate_by_tokens() {
    let mut lengths = Vec::new();
    for i in 0..300 {
        let prompt = format!("question number {i}");
        let reply = reply_for(&prompt, None);
        assert_eq!(reply, reply_for(&prompt, None));
        let n = count_tokens(&reply);
        assert!((20..=60).contains(&n), "{n} tokens: {reply}");
        assert_eq!(split_tokens(&reply).concat(), reply);
        assert_eq!(split_tokens(&reply).len() as u64, n);
        assert!(reply.ends_with('.'));
        for max in [0, 1, 7, n - 1, n, n + 5] {
            let short = reply_for(&prompt, Some(max));
            assert!(reply.starts_with(&short));
            assert_eq!(count_tokens(&short), max.min(n));
        }
        lengths.push(n);
    }
    assert!(lengths.iter().min().unwrap() < &25 && lengths.iter().max().unwrap() > &55);
    assert_ne!(reply_for("a", None), reply_for("b", None));
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[test]
fn configuration_from_the_environment() {
    let lookup = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(
        MockConfig::from_lookup(|_| None).unwrap(),
        MockConfig::default()
    );
    assert_eq!(
        MockConfig::from_lookup(lookup(&[("MOCK_RPM", ""), ("MOCK_TPM", " ")])).unwrap(),
        MockConfig::default(),
        "empty is unset"
    );

    let config = MockConfig::from_lookup(lookup(&[
        ("MOCK_RPM", "60"),
        ("MOCK_TPM", "10000"),
        ("MOCK_CONCURRENCY", "4"),
        ("MOCK_TOKENS_PER_SECOND", "inf"),
        ("MOCK_TTFT_MS", "0"),
        ("MOCK_FAULT_500", "0.1"),
        ("MOCK_FAULT_503", "0.2"),
        ("MOCK_FAULT_529", "0.05"),
        ("MOCK_FAULT_LATENCY", "1"),
        ("MOCK_LATENCY_MS", "750"),
        ("MOCK_FAULT_CUT", "0.01"),
        ("MOCK_FAULT_ERROR_EVENT", "0"),
        ("MOCK_SEED", "42"),
    ]))
    .unwrap();
    assert_eq!(
        config,
        MockConfig {
            rpm: Some(60),
            tpm: Some(10000),
            concurrency: Some(4),
            tokens_per_second: f64::INFINITY,
            time_to_first_token: Duration::ZERO,
            faults: Faults {
                error_500: 0.1,
                error_503: 0.2,
                overloaded_529: 0.05,
                latency: 1.0,
                latency_amount: Duration::from_millis(750),
                cut_stream: 0.01,
                error_event: 0.0,
            },
            seed: 42,
        }
    );

    let bad: &[(&str, &str)] = &[
        ("MOCK_RPM", "abc"),
        ("MOCK_RPM", "0"),
        ("MOCK_TPM", "-1"),
        ("MOCK_CONCURRENCY", "1.5"),
        ("MOCK_TOKENS_PER_SECOND", "-3"),
        ("MOCK_TOKENS_PER_SECOND", "NaN"),
        ("MOCK_TTFT_MS", "fast"),
        ("MOCK_FAULT_500", "1.5"),
        ("MOCK_FAULT_503", "-0.1"),
        ("MOCK_FAULT_529", "x"),
        ("MOCK_FAULT_LATENCY", "NaN"),
        ("MOCK_LATENCY_MS", "-1"),
        ("MOCK_FAULT_CUT", "half"),
        ("MOCK_FAULT_ERROR_EVENT", "2"),
        ("MOCK_SEED", "-5"),
    ];
    for &(name, value) in bad {
        let error = MockConfig::from_lookup(|n| (n == name).then(|| value.to_owned())).unwrap_err();
        assert_eq!(error.variable(), name);
        assert_eq!(error.value(), value);
        let text = error.to_string();
        assert!(text.contains(name) && text.contains(value), "{text}");
        let _: &dyn std::error::Error = &error;
    }

    assert_eq!(
        addr_from_lookup(|_| None).unwrap(),
        "127.0.0.1:8089".parse().unwrap()
    );
    let addr = addr_from_lookup(|n| match n {
        "MOCK_BIND" => Some("0.0.0.0".into()),
        "MOCK_PORT" => Some("0".into()),
        _ => None,
    });
    assert_eq!(addr.unwrap(), "0.0.0.0:0".parse().unwrap());
    for (name, value) in [
        ("MOCK_PORT", "70000"),
        ("MOCK_PORT", "http"),
        ("MOCK_BIND", "localhost"),
    ] {
        let error = addr_from_lookup(|n| (n == name).then(|| value.to_owned())).unwrap_err();
        assert_eq!(error.variable(), name);
        assert!(error.to_string().contains(value));
    }

    // Every variable listed is read by one of the two.
    let mut read = Vec::new();
    let _ = MockConfig::from_lookup(|n| {
        read.push(n.to_owned());
        None
    });
    let _ = addr_from_lookup(|n| {
        read.push(n.to_owned());
        None
    });
    let mut listed: Vec<String> = ENV_VARS.iter().map(|v| v.name.to_owned()).collect();
    listed.sort();
    read.sort();
    assert_eq!(read, listed);
}
