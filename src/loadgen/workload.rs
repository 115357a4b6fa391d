//! The workload a scenario describes, drawn from its seed: the users, what each asks, and when
//! the open-loop ones ask it. The same scenario and seed give the same workload to every target.

use std::sync::Arc;

use super::scenario::{Arrival, Class, Scenario};
use crate::mock::{count_tokens, reply_for};

/// One simulated user.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    /// Its index among the scenario's users.
    pub index: usize,
    /// Its name: `group-00`, or the group's name for a group of one.
    pub name: Arc<str>,
    /// The index of its group.
    pub group: usize,
    /// Its class.
    pub class: Class,
    /// Whether its requests stream.
    pub stream: bool,
    /// How it sends.
    pub arrival: Arrival,
    prompt_tokens: [u64; 2],
    max_tokens: [u64; 2],
}

/// One request a user makes.
#[derive(Debug, Clone, PartialEq)]
pub struct Ask {
    /// The user's index.
    pub user: usize,
    /// The user's name.
    pub user_name: Arc<str>,
    /// Its number among the user's requests, from 0.
    pub seq: u64,
    /// The user's class.
    pub class: Class,
    /// Whether it streams.
    pub stream: bool,
    /// The prompt: `prompt_tokens` words.
    pub prompt: String,
    /// The prompt's tokens, as the upstream counts them.
    pub prompt_tokens: u64,
    /// The longest reply asked for.
    pub max_tokens: u64,
    /// The tokens of the reply the upstream will give (the mock's reply is known from the
    /// prompt): with the prompt's, what the request asks of the tokens-per-minute quota.
    pub reply_tokens: u64,
}

impl Ask {
    /// The tag that names the request to the upstream (the OpenAI `user` field), so that its
    /// log of arrivals tells which user request each attempt belongs to: `name#seq`.
    pub fn tag(&self) -> String {
        format!("{}#{}", self.user_name, self.seq)
    }

    /// The tokens it asks of the quota: prompt and reply.
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.reply_tokens
    }

    /// The chat-completions body of the request.
    pub fn body(&self, model: &str) -> serde_json::Value {
        let mut body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": self.max_tokens,
            "stream": self.stream,
            "user": self.tag(),
        });
        if self.stream {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        body
    }
}

/// Words of the prompts: letters only, so that each is one token to the mock.
const WORDS: &[&str] = &[
    "please",
    "explain",
    "summarize",
    "the",
    "report",
    "quarterly",
    "numbers",
    "customer",
    "ticket",
    "invoice",
    "release",
    "notes",
    "draft",
    "email",
    "about",
    "our",
    "new",
    "plan",
    "compare",
    "options",
    "write",
    "short",
    "answer",
    "list",
    "risks",
    "budget",
    "team",
    "week",
];

fn mix(seed: u64, user: usize, stream: u64) -> u64 {
    let mut x = seed ^ (user as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ stream.rotate_left(32);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}

impl User {
    /// Every user of `scenario`, in the order of its groups.
    pub fn all(scenario: &Scenario) -> Vec<User> {
        let mut users = Vec::new();
        for (g, group) in scenario.users.iter().enumerate() {
            for i in 0..group.count {
                let name = match group.count {
                    1 => group.name.clone(),
                    _ => format!("{}-{i:02}", group.name),
                };
                users.push(User {
                    index: users.len(),
                    name: name.into(),
                    group: g,
                    class: group.class,
                    stream: group.streams(),
                    arrival: group.arrival,
                    prompt_tokens: group.prompt_tokens,
                    max_tokens: group.max_tokens,
                });
            }
        }
        users
    }

    /// The generator of the user's requests: the same sequence for every target.
    pub fn asks(&self, seed: u64) -> Asks {
        Asks {
            user: self.clone(),
            rng: fastrand::Rng::with_seed(mix(seed, self.index, 1)),
            seq: 0,
        }
    }

    /// The generator of the user's timing (arrivals, pauses): apart from its requests, so that
    /// a closed-loop user asks the same things whatever its timing.
    pub fn timing(&self, seed: u64) -> fastrand::Rng {
        fastrand::Rng::with_seed(mix(seed, self.index, 2))
    }

    /// The open-loop arrival times of the user, in scenario seconds from the start, before
    /// `scenario.duration_s`; empty for a closed-loop user.
    pub fn arrivals(&self, scenario: &Scenario) -> Vec<f64> {
        let mut rng = self.timing(scenario.seed);
        let end = scenario.duration_s;
        let mut times = Vec::new();
        match self.arrival {
            Arrival::Poisson { per_minute } => {
                let mut t = 0.0;
                let mut phase_end = phase_end(scenario, t);
                while t < end {
                    let rate = per_minute / 60.0 * scenario.demand_at(t);
                    if rate <= 0.0 {
                        t = phase_end;
                        phase_end = phase_end_after(scenario, t);
                        continue;
                    }
                    let next = t + exponential(&mut rng, 1.0 / rate);
                    if next >= phase_end && phase_end < end {
                        // Memoryless: start again at the phase's end with its new rate.
                        t = phase_end;
                        phase_end = phase_end_after(scenario, t);
                        continue;
                    }
                    t = next;
                    if t < end {
                        times.push(t);
                    }
                }
            }
            Arrival::Bursts { size, every_s } => {
                let mut t = rng.f64() * every_s;
                while t < end {
                    times.extend(std::iter::repeat_n(t, size as usize));
                    t += every_s;
                }
            }
            Arrival::Closed { .. } => {}
        }
        times
    }

    /// Its first request's time and its pauses, for a closed-loop user: `None` otherwise.
    pub fn think(&self) -> Option<(f64, bool)> {
        match self.arrival {
            Arrival::Closed { think_s, together } => Some((think_s, together)),
            _ => None,
        }
    }
}

fn phase_end(scenario: &Scenario, t: f64) -> f64 {
    phase_end_after(scenario, t)
}

/// The end of the phase `t` is in (or infinity after the last).
fn phase_end_after(scenario: &Scenario, t: f64) -> f64 {
    scenario
        .phases
        .iter()
        .map(|p| p.until_s)
        .find(|&until| t < until)
        .unwrap_or(f64::INFINITY)
}

/// An exponential draw of mean `mean`.
pub fn exponential(rng: &mut fastrand::Rng, mean: f64) -> f64 {
    -(1.0 - rng.f64()).ln() * mean
}

/// A user's requests, one after another.
#[derive(Debug, Clone)]
pub struct Asks {
    user: User,
    rng: fastrand::Rng,
    seq: u64,
}

impl Iterator for Asks {
    type Item = Ask;

    fn next(&mut self) -> Option<Ask> {
        let user = &self.user;
        let [low, high] = user.prompt_tokens;
        let words = self.rng.u64(low..=high);
        let mut prompt = String::with_capacity(words as usize * 8);
        for i in 0..words {
            if i > 0 {
                prompt.push(' ');
            }
            prompt.push_str(WORDS[self.rng.usize(..WORDS.len())]);
        }
        let [low, high] = user.max_tokens;
        let max_tokens = self.rng.u64(low..=high);
        let reply_tokens = count_tokens(&reply_for(&prompt, Some(max_tokens)));
        let ask = Ask {
            user: user.index,
            user_name: user.name.clone(),
            seq: self.seq,
            class: user.class,
            stream: user.stream,
            prompt_tokens: count_tokens(&prompt),
            prompt,
            max_tokens,
            reply_tokens,
        };
        self.seq += 1;
        Some(ask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(users: &str) -> Scenario {
        let text = format!(
            r#"
            name = "t"
            duration_s = 600
            seed = 7
            [quota]
            rpm = 60
            tpm = 10000
            concurrency = 4
            [[phases]]
            until_s = 300
            demand = 3
            [[phases]]
            until_s = 600
            demand = 0.5
            {users}
            "#
        );
        Scenario::parse(&text).unwrap()
    }

    #[test]
    fn users_and_their_requests_are_the_seeds() {
        let s = scenario(
            r#"
            [[users]]
            name = "light"
            count = 3
            arrival = { kind = "poisson", per_minute = 20 }
            prompt_tokens = [10, 30]
            max_tokens = [5, 40]
            [[users]]
            name = "heavy"
            class = "batch"
            arrival = { kind = "closed", think_s = 2 }
            prompt_tokens = [100, 100]
            max_tokens = [60, 60]
            "#,
        );
        let users = User::all(&s);
        let names: Vec<&str> = users.iter().map(|u| &*u.name).collect();
        assert_eq!(names, ["light-00", "light-01", "light-02", "heavy"]);
        assert!(!users[3].stream);
        let asks: Vec<Ask> = users[0].asks(s.seed).take(50).collect();
        assert_eq!(asks, users[0].asks(s.seed).take(50).collect::<Vec<_>>());
        assert_ne!(asks, users[1].asks(s.seed).take(50).collect::<Vec<_>>());
        for ask in &asks {
            assert!((10..=30).contains(&ask.prompt_tokens));
            assert_eq!(count_tokens(&ask.prompt), ask.prompt_tokens);
            assert!(ask.reply_tokens <= ask.max_tokens && ask.reply_tokens >= 5);
        }
        assert_eq!(asks[3].tag(), "light-00#3");
        let body = asks[0].body("m");
        assert_eq!(body["user"], "light-00#0");
        assert_eq!(body["stream_options"]["include_usage"], true);
        let heavy = users[3].asks(s.seed).next().unwrap();
        assert_eq!(heavy.prompt_tokens, 100);
        assert!(heavy.body("m").get("stream_options").is_none());
        assert_eq!(users[3].think(), Some((2.0, false)));
        assert!(users[3].arrivals(&s).is_empty());
    }

    #[test]
    fn poisson_arrivals_follow_the_phases() {
        let s = scenario(
            r#"
            [[users]]
            name = "u"
            count = 20
            arrival = { kind = "poisson", per_minute = 10 }
            prompt_tokens = [1, 1]
            max_tokens = [1, 1]
            "#,
        );
        let users = User::all(&s);
        let all: Vec<f64> = users.iter().flat_map(|u| u.arrivals(&s)).collect();
        let first = all.iter().filter(|&&t| t < 300.0).count() as f64;
        let second = all.iter().filter(|&&t| t >= 300.0).count() as f64;
        // 20 users × 10/min × 5 min × 3 = 3000, then × 0.5 = 500.
        assert!((first - 3000.0).abs() < 200.0, "{first}");
        assert!((second - 500.0).abs() < 80.0, "{second}");
        assert!(all.iter().all(|&t| (0.0..600.0).contains(&t)));
        assert_eq!(users[4].arrivals(&s), users[4].arrivals(&s));
    }

    #[test]
    fn bursts_come_whole_at_each_users_phase() {
        let s = scenario(
            r#"
            [[users]]
            name = "b"
            arrival = { kind = "bursts", size = 4, every_s = 100 }
            prompt_tokens = [1, 1]
            max_tokens = [1, 1]
            "#,
        );
        let times = User::all(&s)[0].arrivals(&s);
        assert_eq!(times.len(), 24);
        assert!(times[..4].iter().all(|&t| t == times[0]) && times[0] < 100.0);
        assert!((times[4] - times[0] - 100.0).abs() < 1e-9);
    }
}
