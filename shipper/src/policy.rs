//! The shipper's pacing: jittered exponential backoff between reconnects,
//! and a token-bucket bandwidth limit whose rate follows a time-of-day
//! schedule. Pure logic: callers pass the time in, so tests need no clock.

use std::time::{Duration, Instant};

use tidemark_config::{BandwidthConfig, RetryConfig};

/// Delays between reconnect attempts after transient failures:
/// `initial * multiplier^(n-1)`, capped at `max`, moved at random by up to
/// `jitter` of itself (so many hosts do not reconnect in step).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
    attempt: u32,
}

impl Backoff {
    /// A backoff with the configured policy.
    pub fn new(cfg: &RetryConfig) -> Backoff {
        Backoff {
            initial: cfg.initial_backoff.into(),
            max: cfg.max_backoff.into(),
            multiplier: cfg.multiplier.max(1.0),
            jitter: cfg.jitter.clamp(0.0, 1.0),
            attempt: 0,
        }
    }

    /// The delay before the next attempt; `unit` in [0, 1) is the random
    /// draw for the jitter.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let exp = self.multiplier.powi(self.attempt.min(64) as i32);
        self.attempt = self.attempt.saturating_add(1);
        let base = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        let spread = base * self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        Duration::from_secs_f64((base + spread).max(0.0))
    }

    /// Attempts since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// A connection worked: the next failure starts from the beginning.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A token bucket limiting bytes per second on the wire, at a rate chosen
/// by the local time of day. Burst: one second of the current rate (at
/// least one maximal frame, so a large frame is never stuck).
#[derive(Debug, Clone)]
pub struct Bandwidth {
    default: Option<u64>,
    windows: Vec<(tidemark_config::TimeWindow, u64)>,
    tokens: f64,
    last: Option<Instant>,
}

impl Bandwidth {
    /// The configured limits.
    pub fn new(cfg: &BandwidthConfig) -> Bandwidth {
        Bandwidth {
            default: cfg.limit.map(|l| l.0),
            windows: cfg.schedule.iter().map(|s| (s.window, s.limit.0)).collect(),
            tokens: 0.0,
            last: None,
        }
    }

    /// The rate in bytes per second at `minute_of_day` (local time), or
    /// `None` for no limit.
    pub fn rate_at(&self, minute_of_day: u16) -> Option<u64> {
        self.windows
            .iter()
            .find(|(w, _)| w.contains(minute_of_day))
            .map(|(_, l)| *l)
            .or(self.default)
    }

    /// Takes `bytes` from the bucket at `now`; returns how long to wait
    /// before sending them (zero if they may go now). The bytes are
    /// accounted for either way: call once per send.
    pub fn take(&mut self, bytes: u64, now: Instant, minute_of_day: u16) -> Duration {
        let Some(rate) = self.rate_at(minute_of_day).filter(|r| *r > 0) else {
            self.last = Some(now);
            return Duration::ZERO;
        };
        let rate = rate as f64;
        let burst = rate.max(bytes as f64);
        match self.last {
            Some(last) => {
                let elapsed = now.saturating_duration_since(last).as_secs_f64();
                self.tokens = (self.tokens + elapsed * rate).min(burst);
            }
            None => self.tokens = burst,
        }
        self.last = Some(now);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

/// Minutes since local midnight, for the bandwidth schedule.
pub fn local_minute_of_day() -> u16 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as libc::time_t);
    // SAFETY: an all-zero `tm` is a valid value for localtime_r to fill.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers refer to live, properly aligned locals.
    let ok = unsafe { !libc::localtime_r(&now, &mut tm).is_null() };
    if ok {
        (tm.tm_hour * 60 + tm.tm_min).clamp(0, 24 * 60 - 1) as u16
    } else {
        ((now / 60) % (24 * 60)) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_config::ByteSize;
    use tidemark_config::ScheduledLimit;

    fn retry(initial: u64, max: u64, mult: f64, jitter: f64) -> RetryConfig {
        RetryConfig {
            initial_backoff: Duration::from_secs(initial).into(),
            max_backoff: Duration::from_secs(max).into(),
            multiplier: mult,
            jitter,
        }
    }

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::new(&retry(1, 10, 2.0, 0.0));
        let d: Vec<u64> = (0..6).map(|_| b.next_delay(0.5).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 8, 10, 10]);
        b.reset();
        assert_eq!(b.next_delay(0.5), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let mut lo = Backoff::new(&retry(10, 100, 1.0, 0.2));
        let mut hi = lo.clone();
        assert_eq!(lo.next_delay(0.0), Duration::from_secs(8));
        assert_eq!(hi.next_delay(1.0), Duration::from_secs(12));
    }

    #[test]
    fn bucket_paces_to_the_scheduled_rate() {
        let cfg = BandwidthConfig {
            limit: Some(ByteSize(1000)),
            schedule: vec![ScheduledLimit {
                window: "08:00-18:00".parse().unwrap(),
                limit: ByteSize(100),
            }],
        };
        let mut bw = Bandwidth::new(&cfg);
        assert_eq!(bw.rate_at(9 * 60), Some(100));
        assert_eq!(bw.rate_at(20 * 60), Some(1000));
        let t0 = Instant::now();
        // Night: a full second of burst, then 1000 B/s.
        assert_eq!(bw.take(1000, t0, 20 * 60), Duration::ZERO);
        let wait = bw.take(500, t0, 20 * 60);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // Office hours: 100 B/s.
        let mut day = Bandwidth::new(&cfg);
        assert_eq!(day.take(100, t0, 9 * 60), Duration::ZERO);
        let wait = day.take(100, t0, 9 * 60);
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        // After the wait the bucket has refilled.
        let later = t0 + Duration::from_secs(3);
        assert_eq!(day.take(100, later, 9 * 60), Duration::ZERO);
    }

    #[test]
    fn no_limit_never_waits() {
        let mut bw = Bandwidth::new(&BandwidthConfig::default());
        assert_eq!(bw.take(u64::MAX / 2, Instant::now(), 0), Duration::ZERO);
    }
}
