//! Reading an OpenAI-compatible chat-completions stream (server-sent events) as its bytes
//! arrive: what the servers need to forward tokens, to notice an error event, and to learn the
//! usage the upstream reports at the end.
//!
//! The parser is pushed bytes as they come (a body frame may end anywhere, even inside a line),
//! which is what a body wrapper needs; SSE crates parse a whole `Stream` instead.

use serde_json::Value;

/// One event of a chat-completions stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Text of the reply.
    Delta(String),
    /// The usage the upstream reports (`stream_options.include_usage`).
    Usage {
        /// Tokens of the prompt.
        prompt: u64,
        /// Tokens of the reply.
        completion: u64,
    },
    /// An error inside the stream.
    Error(String),
    /// `data: [DONE]`.
    Done,
}

/// Splits a byte stream into `data:` payloads, and those into [`Event`]s.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
}

/// The longest line kept while waiting for its end; a longer one is dropped, not buffered.
const MAX_LINE: usize = 1 << 20;

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        SseParser::default()
    }

    /// Feeds the next bytes; calls `each` for every event completed by them.
    pub fn push(&mut self, bytes: &[u8], mut each: impl FnMut(Event)) {
        for &b in bytes {
            if b != b'\n' {
                if self.line.len() < MAX_LINE {
                    self.line.push(b);
                }
                continue;
            }
            let line = std::mem::take(&mut self.line);
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            if let Some(data) = line.strip_prefix(b"data:") {
                let data = data.strip_prefix(b" ").unwrap_or(data);
                parse_data(data, &mut each);
            }
        }
    }
}

fn parse_data(data: &[u8], each: &mut impl FnMut(Event)) {
    if data == b"[DONE]" {
        return each(Event::Done);
    }
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if let Some(error) = value.get("error") {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| error.to_string(), str::to_string);
        return each(Event::Error(message));
    }
    if let Some(text) = value
        .pointer("/choices/0/delta/content")
        .and_then(Value::as_str)
    {
        if !text.is_empty() {
            each(Event::Delta(text.to_string()));
        }
    }
    if let Some(usage) = value.get("usage").filter(|u| u.is_object()) {
        let count = |name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0);
        each(Event::Usage {
            prompt: count("prompt_tokens"),
            completion: count("completion_tokens"),
        });
    }
}

/// A token estimate for text whose exact count is unknown: one per four bytes, rounded up, as
/// OpenAI's guidance for English has it.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n",
            ": a comment\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        );
        for split in 0..stream.len() {
            let mut parser = SseParser::new();
            let mut events = Vec::new();
            parser.push(&stream.as_bytes()[..split], |e| events.push(e));
            parser.push(&stream.as_bytes()[split..], |e| events.push(e));
            assert_eq!(
                events,
                [
                    Event::Delta("Hel".into()),
                    Event::Delta("lo".into()),
                    Event::Usage {
                        prompt: 3,
                        completion: 2
                    },
                    Event::Done
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn errors_and_garbage() {
        let mut events = Vec::new();
        let mut parser = SseParser::new();
        parser.push(
            b"data: {not json\ndata: {\"error\":{\"message\":\"overloaded\"}}\n",
            |e| events.push(e),
        );
        assert_eq!(events, [Event::Error("overloaded".into())]);
        assert_eq!(estimate_tokens("abcde"), 2);
    }
}
