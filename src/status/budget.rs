//! The status writer's budget, adapting to the apiserver: it starts low, grows while writes are
//! answered quickly and more tasks wait than it lets through, and halves when the apiserver
//! throttles (429), writes time out or their latency climbs. `status.max_writes_per_second` is
//! its ceiling, never passed. A token bucket spends it (bursts up to one second's worth).

use std::time::Duration;

use tokio::time::Instant;

/// Writes per second at the start, and the least the budget falls to (both capped by the
/// ceiling).
const START: f64 = 50.0;
const FLOOR: f64 = 5.0;

/// How often the budget is reconsidered.
const PERIOD: Duration = Duration::from_secs(1);

/// Growth per period while the apiserver keeps up and the budget is what holds writes back;
/// the cut on a sign of overload.
const GROWTH: f64 = 1.5;
const CUT: f64 = 0.5;

/// A period whose writes took longer than this on average is a sign of overload: the apiserver
/// (or etcd) queues them, or the client retried 429s after the apiserver's Retry-After.
const SLOW: Duration = Duration::from_secs(1);

/// How one write ended, for the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Answered (written, gone or rejected), after this long.
    In(Duration),
    /// 429: the apiserver's priority and fairness refused it.
    Throttled,
    /// No answer in time, or a server error.
    Failed,
}

/// Adapts and spends the status write rate.
#[derive(Debug)]
pub struct Budget {
    ceiling: f64,
    rate: f64,
    tokens: f64,
    refilled: Instant,
    period: Period,
}

#[derive(Debug)]
struct Period {
    started: Instant,
    answered: u32,
    latency: Duration,
    overloaded: bool,
    /// Tasks were left waiting for the budget (not for their `flush_interval`).
    held_back: bool,
}

impl Period {
    fn new(started: Instant) -> Self {
        Self {
            started,
            answered: 0,
            latency: Duration::ZERO,
            overloaded: false,
            held_back: false,
        }
    }
}

impl Budget {
    /// A budget of at most `ceiling` writes per second.
    pub fn new(ceiling: u32, now: Instant) -> Self {
        let ceiling = f64::from(ceiling.max(1));
        let rate = START.min(ceiling);
        Self {
            ceiling,
            rate,
            tokens: rate,
            refilled: now,
            period: Period::new(now),
        }
    }

    /// Writes per second now.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// How many writes may start now, at most `room`; the caller says how many it started with
    /// [`Budget::spend`].
    pub fn available(&mut self, now: Instant, room: usize) -> usize {
        self.tokens =
            (self.tokens + self.rate * (now - self.refilled).as_secs_f64()).min(self.rate);
        self.refilled = now;
        if now - self.period.started >= PERIOD {
            self.adapt(now);
        }
        (self.tokens.max(0.0).floor() as usize).min(room)
    }

    /// `started` writes began; `waiting` more were due and left for lack of budget.
    pub fn spend(&mut self, started: usize, waiting: bool) {
        self.tokens -= started as f64;
        self.period.held_back |= waiting;
    }

    /// A write ended.
    pub fn answered(&mut self, answer: Answer) {
        match answer {
            Answer::In(latency) => {
                self.period.answered += 1;
                self.period.latency += latency;
            }
            Answer::Throttled | Answer::Failed => self.period.overloaded = true,
        }
    }

    fn adapt(&mut self, now: Instant) {
        let period = std::mem::replace(&mut self.period, Period::new(now));
        let slow = period.answered > 0 && period.latency / period.answered > SLOW;
        if period.overloaded || slow {
            self.rate = (self.rate * CUT).max(FLOOR.min(self.ceiling));
            self.tokens = self.tokens.min(self.rate);
        } else if period.held_back && period.answered > 0 {
            self.rate = (self.rate * GROWTH).min(self.ceiling);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Answer = Answer::In(Duration::from_millis(20));

    /// One period: `writes` answered with `answer`, the budget the limit or not.
    fn period(budget: &mut Budget, now: &mut Instant, answer: Answer, held_back: bool) -> f64 {
        let ready = budget.available(*now, usize::MAX);
        budget.spend(ready, held_back);
        for _ in 0..ready.max(1) {
            budget.answered(answer);
        }
        *now += PERIOD;
        budget.available(*now, 0);
        budget.rate()
    }

    #[test]
    fn grows_while_writes_are_fast_and_tasks_wait_up_to_the_ceiling() {
        let mut now = Instant::now();
        let mut budget = Budget::new(500, now);
        assert_eq!(budget.rate(), 50.0, "starts low");
        let rates: Vec<f64> = (0..8)
            .map(|_| period(&mut budget, &mut now, FAST, true))
            .collect();
        assert_eq!(rates[0], 75.0);
        assert!(rates.windows(2).all(|w| w[1] >= w[0]), "{rates:?}");
        assert_eq!(*rates.last().unwrap(), 500.0, "{rates:?}");
    }

    #[test]
    fn stays_where_it_is_while_it_holds_nothing_back() {
        let mut now = Instant::now();
        let mut budget = Budget::new(500, now);
        for _ in 0..5 {
            assert_eq!(period(&mut budget, &mut now, FAST, false), 50.0);
        }
    }

    #[test]
    fn halves_on_throttling_timeouts_or_slow_answers_down_to_the_floor() {
        let mut now = Instant::now();
        let mut budget = Budget::new(500, now);
        for _ in 0..8 {
            period(&mut budget, &mut now, FAST, true);
        }
        assert_eq!(
            period(&mut budget, &mut now, Answer::Throttled, true),
            250.0
        );
        assert_eq!(period(&mut budget, &mut now, Answer::Failed, true), 125.0);
        let slow = Answer::In(SLOW + Duration::from_millis(1));
        assert_eq!(period(&mut budget, &mut now, slow, true), 62.5);
        for _ in 0..10 {
            period(&mut budget, &mut now, Answer::Throttled, true);
        }
        assert_eq!(budget.rate(), FLOOR);
    }

    #[test]
    fn never_spends_more_than_one_second_of_the_rate_at_once() {
        let mut now = Instant::now();
        let mut budget = Budget::new(20, now);
        assert_eq!(
            budget.rate(),
            20.0,
            "a ceiling below the start is the start"
        );
        now += Duration::from_secs(30);
        assert_eq!(budget.available(now, usize::MAX), 20);
        assert_eq!(budget.available(now, 3), 3, "and never more than the room");
        budget.spend(20, true);
        assert_eq!(budget.available(now, usize::MAX), 0);
        now += Duration::from_millis(500);
        assert_eq!(budget.available(now, usize::MAX), 10);
    }
}
