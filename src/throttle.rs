//! Counting attempts per key over a sliding window, in memory: the limits on what one client can
//! make the server do (sessions per address, logins, frames per session). The table is bounded,
//! so a flood of distinct keys cannot grow it without end.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most distinct keys a throttle tracks before it forgets the expired ones (and, failing that,
/// all of them).
const MAX_KEYS: usize = 100_000;

/// At most `max` hits per key within `window`.
pub struct Throttle {
    max: usize,
    window: Duration,
    hits: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl Throttle {
    /// `max` 0 never limits.
    pub fn new(max: usize, window: Duration) -> Self {
        Self {
            max,
            window,
            hits: Mutex::default(),
        }
    }

    /// How long until `key` may try again, when it has used up its hits.
    pub fn wait(&self, key: &str) -> Option<Duration> {
        if self.max == 0 {
            return None;
        }
        let now = Instant::now();
        let mut hits = self.hits.lock().expect("throttle lock");
        let times = hits.get_mut(key)?;
        while times.front().is_some_and(|t| now - *t >= self.window) {
            times.pop_front();
        }
        (times.len() >= self.max).then(|| self.window - (now - times[0]))
    }

    pub fn hit(&self, key: &str) {
        if self.max == 0 {
            return;
        }
        let now = Instant::now();
        let mut hits = self.hits.lock().expect("throttle lock");
        if hits.len() >= MAX_KEYS && !hits.contains_key(key) {
            hits.retain(|_, times| times.back().is_some_and(|t| now - *t < self.window));
            if hits.len() >= MAX_KEYS {
                hits.clear();
            }
        }
        let times = hits.entry(key.to_string()).or_default();
        times.push_back(now);
        while times.len() > self.max {
            times.pop_front();
        }
    }

    pub fn clear(&self, key: &str) {
        self.hits.lock().expect("throttle lock").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_limited_after_max_hits_and_others_are_not() {
        let t = Throttle::new(2, Duration::from_secs(60));
        t.hit("a");
        assert!(t.wait("a").is_none());
        t.hit("a");
        let wait = t.wait("a").expect("limited after two hits");
        assert!(wait <= Duration::from_secs(60) && wait > Duration::from_secs(55));
        assert!(t.wait("b").is_none());
        t.clear("a");
        assert!(t.wait("a").is_none());
    }

    #[test]
    fn hits_expire_with_the_window() {
        let t = Throttle::new(1, Duration::from_millis(20));
        t.hit("a");
        assert!(t.wait("a").is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(t.wait("a").is_none());
    }

    #[test]
    fn zero_never_limits() {
        let t = Throttle::new(0, Duration::from_secs(60));
        for _ in 0..10 {
            t.hit("a");
        }
        assert!(t.wait("a").is_none());
    }
}
