//! The tokens a reply actually cost, read from the reply as it passes: what the upstream's
//! tokens-per-minute limit is corrected with once a stream ends.

use serde_json::Value;
use tower_llm_queue::rate::Meter;

use super::sse::{estimate_tokens, Event, SseParser};

/// The longest non-streamed reply read for its `usage`.
const MAX_JSON: usize = 1 << 20;

/// Reads a chat-completions reply — a stream or one JSON document — for the usage the upstream
/// reports (`usage.total_tokens`, or prompt + completion). A stream cut before its usage counts
/// what it carried: the prompt's estimate plus an estimate of the text streamed. Only a reply
/// that starts as a JSON document is kept, up to 1 MiB, to be read at its end.
#[derive(Debug)]
pub struct UsageMeter {
    prompt_estimate: u64,
    parser: SseParser,
    streamed: u64,
    reported: Option<u64>,
    /// The reply so far, while it may be one JSON document (it starts with `{`).
    json: Option<Vec<u8>>,
}

impl UsageMeter {
    /// A meter for a request whose prompt is estimated at `prompt_estimate` tokens.
    pub fn new(prompt_estimate: u64) -> Self {
        UsageMeter {
            prompt_estimate,
            parser: SseParser::new(),
            streamed: 0,
            reported: None,
            json: Some(Vec::new()),
        }
    }
}

impl Meter for UsageMeter {
    fn observe(&mut self, data: &[u8]) {
        let (streamed, reported) = (&mut self.streamed, &mut self.reported);
        self.parser.push(data, |event| match event {
            Event::Delta(text) => *streamed += estimate_tokens(&text),
            Event::Usage { prompt, completion } => *reported = Some(prompt + completion),
            Event::Error(_) | Event::Done => {}
        });
        if let Some(json) = &mut self.json {
            let starts_as_json = match json.iter().chain(data).find(|b| !b.is_ascii_whitespace()) {
                Some(first) => *first == b'{',
                None => true,
            };
            if starts_as_json && json.len() + data.len() <= MAX_JSON {
                json.extend_from_slice(data);
            } else {
                self.json = None;
            }
        }
    }

    fn finish(&mut self) -> Option<u64> {
        if let Some(reported) = self.reported {
            return Some(reported);
        }
        let reply = self.json.as_deref().map(serde_json::from_slice::<Value>);
        if let Some(Ok(reply)) = reply {
            let usage = &reply["usage"];
            if let Some(total) = usage["total_tokens"].as_u64() {
                return Some(total);
            }
        }
        Some(self.prompt_estimate + self.streamed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_of_a_stream_a_document_and_a_cut_stream() {
        let mut stream = UsageMeter::new(10);
        stream.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello there\"}}]}\n\n");
        stream.observe(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n",
        );
        assert_eq!(stream.finish(), Some(10));
        assert!(stream.json.is_none(), "a stream is not kept");

        let mut document = UsageMeter::new(10);
        document.observe(b"  {\"usage\": {\"total_tokens\"");
        document.observe(b": 42}}");
        assert_eq!(document.finish(), Some(42));

        let mut cut = UsageMeter::new(10);
        cut.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"12345678\"}}]}\n\n");
        assert_eq!(cut.finish(), Some(10 + 2));
    }
}
