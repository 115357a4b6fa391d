//! Reading JSON by the few fields one needs, borrowed from the text, where building it as a
//! [`serde_json::Value`] would allocate every key and value only to look at three of them.
//!
//! A typed read skips the fields it does not name at any depth, while a `Value` refuses text
//! nested deeper than serde_json's recursion limit (128). A reader that wants the same outcome
//! as its `Value` reading first checks [`shallow`], and reads a deeper text as a `Value`.

/// The deepest nesting of arrays and objects that [`shallow`] accepts: well under
/// serde_json's recursion limit.
pub const SHALLOW: usize = 32;

/// Whether the JSON text `json` nests arrays and objects at most [`SHALLOW`] deep. Brackets
/// inside strings do not count; the text need not be valid.
pub fn shallow(json: &[u8]) -> bool {
    // No deeper than its brackets: a count the compiler vectorizes settles most texts.
    let brackets = json.iter().filter(|&&b| b == b'[' || b == b'{').count();
    if brackets <= SHALLOW {
        return true;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > SHALLOW {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_brackets_outside_strings() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(shallow(nested(SHALLOW).as_bytes()));
        assert!(!shallow(nested(SHALLOW + 1).as_bytes()));
        let quoted = format!(r#"{{"a": "{}\"{}"}}"#, "[".repeat(100), "{".repeat(100));
        assert!(shallow(quoted.as_bytes()));
        // Every text deeper than SHALLOW that a Value reads is refused here, and every text
        // a Value refuses for its depth too.
        for depth in [SHALLOW + 1, 127, 128, 129, 200] {
            let text = nested(depth);
            assert!(!shallow(text.as_bytes()));
            if serde_json::from_str::<serde_json::Value>(&text).is_err() {
                assert!(depth > SHALLOW);
            }
        }
    }
}
