//! Tokens and the deterministic reply.

/// Splits `text` into the mock's tokens, keeping every character: each piece is the whitespace
/// before a token and the token itself, and the last piece also keeps any whitespace after it.
/// A token is a word (a maximal run of letters and digits, as `char::is_alphanumeric` says) or
/// any other single character that is not whitespace (a punctuation mark or a symbol).
/// Concatenating the pieces gives `text` back unless it is only whitespace, which has no tokens.
///
/// This is how the mock streams a reply: one piece per chunk.
///
/// ```
/// use tower_llm_queue_servers::mock::split_tokens;
///
/// assert_eq!(split_tokens("Hello, world! "), ["Hello", ",", " world", "! "]);
/// assert_eq!(split_tokens("don't"), ["don", "'", "t"]);
/// ```
pub fn split_tokens(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some((_, first)) = chars.next() else {
            break;
        };
        if first.is_alphanumeric() {
            while chars.next_if(|(_, c)| c.is_alphanumeric()).is_some() {}
        }
        let end = chars.peek().map_or(text.len(), |&(i, _)| i);
        pieces.push(&text[start..end]);
        start = end;
    }
    if start < text.len() {
        if let Some(last) = pieces.last_mut() {
            let from = start - last.len();
            *last = &text[from..];
        }
    }
    pieces
}

/// The number of tokens in `text`: its words (maximal runs of letters and digits) plus its other
/// characters that are not whitespace (each punctuation mark or symbol is one token).
/// `"Hello, world!"` has 4. It is the number of pieces [`split_tokens`] returns.
///
/// ```
/// use tower_llm_queue_servers::mock::count_tokens;
///
/// assert_eq!(count_tokens("Hello, world!"), 4);
/// assert_eq!(count_tokens("  "), 0);
/// ```
pub fn count_tokens(text: &str) -> u64 {
    let mut count = 0;
    let mut in_word = false;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if !in_word {
                count += 1;
            }
            in_word = true;
        } else {
            in_word = false;
            if !c.is_whitespace() {
                count += 1;
            }
        }
    }
    count
}

/// Words of the replies: letters only, so that each is one token.
const WORDS: &[&str] = &[
    "the", "queue", "model", "token", "answer", "request", "server", "stream", "limit", "window",
    "reply", "user", "time", "and", "of", "a", "to", "is", "with", "each", "every", "fair",
    "quick", "steady", "careful", "mock", "upstream", "retry", "later", "now", "first", "next",
    "slot", "share", "rate", "minute", "second", "waits", "runs", "serves", "keeps", "sends",
    "turn", "order", "load", "quiet", "busy", "small", "large", "good", "plain", "simple", "sure",
    "maybe", "often", "rarely", "here", "there", "soon", "again", "while", "before", "after",
    "then",
];

/// A stable 64-bit hash of the prompt (FNV-1a), so that replies do not change between builds.
fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The tokens of the full reply to `prompt`.
pub(crate) fn reply_tokens(prompt: &str) -> Vec<String> {
    let hash = fnv1a(prompt);
    let len = 20 + (hash % 41) as usize;
    let mut rng = fastrand::Rng::with_seed(hash);
    let mut tokens: Vec<String> = Vec::with_capacity(len);
    let mut words_in_sentence = 0;
    let mut sentence_len = rng.usize(6..=12);
    let mut after_word = false;
    while tokens.len() + 1 < len {
        let room = len - 1 - tokens.len();
        if after_word && room >= 2 && words_in_sentence >= sentence_len {
            tokens.push(".".to_owned());
            words_in_sentence = 0;
            sentence_len = rng.usize(6..=12);
            after_word = false;
            continue;
        }
        if after_word && room >= 2 && words_in_sentence >= 2 && rng.u8(..8) == 0 {
            tokens.push(",".to_owned());
            after_word = false;
            continue;
        }
        let word = WORDS[rng.usize(..WORDS.len())];
        let mut token = String::with_capacity(word.len() + 1);
        if !tokens.is_empty() {
            token.push(' ');
        }
        if words_in_sentence == 0 {
            let mut chars = word.chars();
            if let Some(c) = chars.next() {
                token.extend(c.to_uppercase());
                token.push_str(chars.as_str());
            }
        } else {
            token.push_str(word);
        }
        tokens.push(token);
        words_in_sentence += 1;
        after_word = true;
    }
    tokens.push(".".to_owned());
    tokens
}

/// The mock's answer to a classification of `text` into one of `labels` (a structured-output
/// request whose schema makes `label` an enum): the first label that the text contains as a
/// word, ignoring case, with confidence 0.9; else one chosen by a stable hash of the text, with
/// a confidence from 0.5 to 0.89 by the same hash. Like a real provider, it never answers a
/// label outside the enum. With no labels, an empty label.
///
/// ```
/// use tower_llm_queue_servers::mock::classify_for;
///
/// let labels = ["billing", "bug", "praise"];
/// assert_eq!(classify_for("My BILLING address changed", &labels), ("billing".into(), 0.9));
/// let (label, confidence) = classify_for("hello", &labels);
/// assert!(labels.contains(&label.as_str()) && (0.5..0.9).contains(&confidence));
/// assert_eq!(classify_for("hello", &labels), (label, confidence));
/// ```
pub fn classify_for(text: &str, labels: &[&str]) -> (String, f64) {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    if let Some(label) = labels
        .iter()
        .find(|label| words.iter().any(|w| *w == label.to_lowercase()))
    {
        return ((*label).to_owned(), 0.9);
    }
    if labels.is_empty() {
        return (String::new(), 0.0);
    }
    let hash = fnv1a(text);
    let label = labels[(hash % labels.len() as u64) as usize];
    let confidence = 0.5 + ((hash >> 16) % 40) as f64 / 100.0;
    (label.to_owned(), confidence)
}

/// The mock's reply to `prompt`, truncated to `max_tokens` tokens.
///
/// The full reply depends on the prompt alone: sentences of plain English words drawn by a
/// generator seeded with a stable hash of the prompt, 20 to 60 tokens long (by the same hash),
/// ending with a full stop. Its tokens are those of [`split_tokens`], so
/// `count_tokens(&reply_for(p, None))` is its length, and `reply_for(p, Some(n))` is its first
/// `n` tokens (all of it when `n` is larger; nothing when `n` is 0).
///
/// ```
/// use tower_llm_queue_servers::mock::{count_tokens, reply_for};
///
/// let reply = reply_for("Why is the sky blue?", None);
/// assert_eq!(reply, reply_for("Why is the sky blue?", None));
/// assert!((20..=60).contains(&count_tokens(&reply)));
/// assert!(reply.starts_with(&reply_for("Why is the sky blue?", Some(5))));
/// assert_eq!(count_tokens(&reply_for("Why is the sky blue?", Some(5))), 5);
/// ```
pub fn reply_for(prompt: &str, max_tokens: Option<u64>) -> String {
    let tokens = reply_tokens(prompt);
    let keep = max_tokens.map_or(tokens.len(), |n| {
        usize::try_from(n).unwrap_or(usize::MAX).min(tokens.len())
    });
    tokens[..keep].concat()
}
