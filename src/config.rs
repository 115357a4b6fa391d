//! Configuration from the environment. Every variable has a documented default; a bad value is
//! an error naming the variable, so that a server stops at start-up with a clear message instead
//! of running with a setting nobody asked for.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A variable whose value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    variable: String,
    value: String,
    expected: &'static str,
}

impl ConfigError {
    /// An error about `variable`, set to `value`, which should have been `expected`.
    pub fn new(variable: &str, value: &str, expected: &'static str) -> Self {
        ConfigError {
            variable: variable.to_string(),
            value: value.to_string(),
            expected,
        }
    }

    /// The variable at fault.
    pub fn variable(&self) -> &str {
        &self.variable
    }

    /// Its value, as it was set.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={:?} is not valid: expected {}",
            self.variable, self.value, self.expected
        )
    }
}

impl std::error::Error for ConfigError {}

/// Where variables come from: the process environment, or a fixed set (for tests, which must
/// not change the environment of a process that runs tests in parallel).
#[derive(Debug, Clone, Default)]
pub struct Env {
    fixed: Option<HashMap<String, String>>,
}

impl Env {
    /// The process environment.
    pub fn process() -> Self {
        Env { fixed: None }
    }

    /// Exactly these variables, and no others.
    pub fn fixed<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Env {
            fixed: Some(
                pairs
                    .into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            ),
        }
    }

    /// The value of `name`, trimmed; `None` when unset or empty.
    pub fn get(&self, name: &str) -> Option<String> {
        let value = match &self.fixed {
            Some(map) => map.get(name).cloned(),
            // A value that is not UTF-8 is kept, lossily, so that parsing it names the variable.
            None => std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()),
        }?;
        let value = value.trim();
        (!value.is_empty()).then(|| value.to_string())
    }

    /// `name` parsed as a `T`, or `default` when unset.
    pub fn parse<T: FromStr>(
        &self,
        name: &str,
        default: T,
        expected: &'static str,
    ) -> Result<T, ConfigError> {
        self.parse_optional(name, expected)
            .map(|value| value.unwrap_or(default))
    }

    /// `name` parsed as a `T`, or `None` when unset.
    pub fn parse_optional<T: FromStr>(
        &self,
        name: &str,
        expected: &'static str,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => value
                .parse()
                .map(Some)
                .map_err(|_| ConfigError::new(name, &value, expected)),
        }
    }

    /// `name` parsed as a `T` for which `valid` holds, or `default` when unset.
    pub fn parse_where<T: FromStr>(
        &self,
        name: &str,
        default: T,
        expected: &'static str,
        valid: impl Fn(&T) -> bool,
    ) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(value) => match value.parse() {
                Ok(parsed) if valid(&parsed) => Ok(parsed),
                _ => Err(ConfigError::new(name, &value, expected)),
            },
        }
    }

    /// A whole number of at least 1, or `default` when unset.
    pub fn positive(&self, name: &str, default: u64) -> Result<u64, ConfigError> {
        let expected = "a whole number of at least 1";
        let value = self.parse(name, default, expected)?;
        match value {
            0 => Err(ConfigError::new(name, "0", expected)),
            n => Ok(n),
        }
    }

    /// A whole number of at least 1, or `None` (no limit) when unset.
    pub fn optional_positive(&self, name: &str) -> Result<Option<u64>, ConfigError> {
        let expected = "a whole number of at least 1, or nothing for no limit";
        match self.parse_optional::<u64>(name, expected)? {
            Some(0) => Err(ConfigError::new(name, "0", expected)),
            value => Ok(value),
        }
    }

    /// A duration in whole milliseconds, at least 1, or `default` when unset.
    pub fn millis(&self, name: &str, default: Duration) -> Result<Duration, ConfigError> {
        let expected = "a duration in milliseconds, at least 1";
        let default_ms = u64::try_from(default.as_millis()).unwrap_or(u64::MAX);
        match self.parse(name, default_ms, expected)? {
            0 => Err(ConfigError::new(name, "0", expected)),
            ms => Ok(Duration::from_millis(ms)),
        }
    }
}

/// Reads a server's configuration, or prints what is wrong and exits with status 2: a server
/// with a setting it cannot use must not start.
pub fn or_exit<T>(config: Result<T, ConfigError>) -> T {
    config.unwrap_or_else(|err| {
        eprintln!("configuration error: {err}");
        std::process::exit(2)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_defaults_and_errors() {
        let env = Env::fixed([("A", " 7 "), ("Z", "0"), ("X", "seven"), ("E", "")]);
        assert_eq!(env.positive("A", 1), Ok(7));
        assert_eq!(env.positive("UNSET", 3), Ok(3));
        assert_eq!(env.positive("E", 3), Ok(3), "empty is unset");
        let err = env.positive("Z", 1).unwrap_err();
        assert_eq!(err.variable(), "Z");
        assert_eq!(
            err.to_string(),
            "Z=\"0\" is not valid: expected a whole number of at least 1"
        );
        assert_eq!(env.positive("X", 1).unwrap_err().variable(), "X");
        assert_eq!(env.optional_positive("UNSET"), Ok(None));
        assert_eq!(env.optional_positive("A"), Ok(Some(7)));
        assert!(env.optional_positive("Z").is_err());
        assert_eq!(
            env.millis("A", Duration::ZERO),
            Ok(Duration::from_millis(7))
        );
    }
}
