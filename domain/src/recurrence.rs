//! Recurrence math: when the next occurrence of a recurring task is due.
//!
//! The rule is evaluated in the task's IANA time zone, starting at the completed occurrence's due
//! date, so "every Monday 09:00 in New York" stays at 09:00 local time across daylight-saving
//! changes. The next occurrence is the first instance strictly after that due date which is also
//! later than the completion time, so completing late does not leave a pile of overdue copies.
//! `COUNT` counts occurrences of the series (the first task is occurrence 1); `UNTIL` ends it.

use chrono::{DateTime, Utc};

use crate::values::{Recurrence, TimeZone};

/// What follows a completed occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextOccurrence {
    /// The next occurrence (number `occurrence`) is due at `due_at`.
    Due { due_at: DateTime<Utc>, occurrence: u32 },
    /// COUNT or UNTIL ended the series.
    SeriesEnded,
}

/// How many rule instances are examined at most before giving up (a rule whose instances all lie
/// before the completion time, e.g. after years of lateness with a secondly rule).
const MAX_STEPS: usize = 100_000;

/// The occurrence after occurrence number `occurrence` (1-based), which was due at `due_at` and
/// completed at `completed_at`.
pub fn next_occurrence(rule: &Recurrence, timezone: TimeZone, due_at: DateTime<Utc>, completed_at: DateTime<Utc>, occurrence: u32) -> NextOccurrence {
    let mut count = None;
    let without_count: Vec<&str> = rule
        .as_ref()
        .split(';')
        .filter(|part| match part.strip_prefix("COUNT=") {
            Some(n) => {
                count = n.parse::<u32>().ok();
                false
            }
            None => true,
        })
        .collect();
    if count.is_some_and(|c| occurrence >= c) {
        return NextOccurrence::SeriesEnded;
    }
    let Ok(parsed) = without_count.join(";").parse::<rrule::RRule<rrule::Unvalidated>>() else {
        return NextOccurrence::SeriesEnded;
    };
    let tz = rrule::Tz::Tz(timezone.tz());
    let start = due_at.with_timezone(&tz);
    let Ok(set) = parsed.build(start) else { return NextOccurrence::SeriesEnded };
    let threshold = due_at.max(completed_at);
    set.into_iter()
        .take(MAX_STEPS)
        .map(|d| d.with_timezone(&Utc))
        .find(|d| *d > threshold)
        .map_or(NextOccurrence::SeriesEnded, |due_at| NextOccurrence::Due { due_at, occurrence: occurrence + 1 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
    }
    fn rule(s: &str) -> Recurrence {
        Recurrence::parse(s.into()).unwrap()
    }
    fn zone(s: &str) -> TimeZone {
        TimeZone::parse(s.into()).unwrap()
    }

    /// given a rule in a zone, when occurrence `n` due at `due` is completed at `done`, then ...
    struct Given {
        rule: Recurrence,
        zone: TimeZone,
    }
    fn given(r: &str, z: &str) -> Given {
        Given { rule: rule(r), zone: zone(z) }
    }
    impl Given {
        #[track_caller]
        fn when_completed(&self, n: u32, due: DateTime<Utc>, done: DateTime<Utc>) -> NextOccurrence {
            next_occurrence(&self.rule, self.zone, due, done, n)
        }
        #[track_caller]
        fn then_next(&self, n: u32, due: DateTime<Utc>, done: DateTime<Utc>, want: DateTime<Utc>) {
            assert_eq!(self.when_completed(n, due, done), NextOccurrence::Due { due_at: want, occurrence: n + 1 });
        }
    }

    #[test]
    fn daily_on_time_and_early() {
        let g = given("FREQ=DAILY", "UTC");
        g.then_next(1, utc(2026, 3, 1, 9, 0), utc(2026, 3, 1, 8, 0), utc(2026, 3, 2, 9, 0));
        g.then_next(1, utc(2026, 3, 1, 9, 0), utc(2026, 2, 20, 8, 0), utc(2026, 3, 2, 9, 0));
    }

    #[test]
    fn daily_with_interval() {
        given("FREQ=DAILY;INTERVAL=3", "UTC").then_next(1, utc(2026, 3, 1, 9, 0), utc(2026, 3, 1, 9, 0), utc(2026, 3, 4, 9, 0));
    }

    #[test]
    fn weekly_byday_picks_the_next_listed_day() {
        let g = given("FREQ=WEEKLY;BYDAY=MO,TH", "UTC");
        // 2026-03-02 is a Monday.
        g.then_next(1, utc(2026, 3, 2, 9, 0), utc(2026, 3, 2, 10, 0), utc(2026, 3, 5, 9, 0));
        g.then_next(2, utc(2026, 3, 5, 9, 0), utc(2026, 3, 5, 10, 0), utc(2026, 3, 9, 9, 0));
    }

    #[test]
    fn monthly_bymonthday_and_month_end() {
        given("FREQ=MONTHLY;BYMONTHDAY=15", "UTC").then_next(1, utc(2026, 1, 15, 9, 0), utc(2026, 1, 15, 9, 0), utc(2026, 2, 15, 9, 0));
        // The last day of every month.
        let last = given("FREQ=MONTHLY;BYMONTHDAY=-1", "UTC");
        last.then_next(1, utc(2026, 1, 31, 9, 0), utc(2026, 1, 31, 9, 0), utc(2026, 2, 28, 9, 0));
        last.then_next(2, utc(2026, 2, 28, 9, 0), utc(2026, 2, 28, 9, 0), utc(2026, 3, 31, 9, 0));
        // RFC 5545: a month without the 31st is skipped.
        given("FREQ=MONTHLY", "UTC").then_next(1, utc(2026, 1, 31, 9, 0), utc(2026, 1, 31, 9, 0), utc(2026, 3, 31, 9, 0));
        // Leap years.
        given("FREQ=MONTHLY;BYMONTHDAY=-1", "UTC").then_next(1, utc(2028, 1, 31, 9, 0), utc(2028, 1, 31, 9, 0), utc(2028, 2, 29, 9, 0));
    }

    #[test]
    fn yearly_including_february_29() {
        given("FREQ=YEARLY", "UTC").then_next(1, utc(2026, 6, 1, 9, 0), utc(2026, 6, 1, 9, 0), utc(2027, 6, 1, 9, 0));
        given("FREQ=YEARLY", "UTC").then_next(1, utc(2028, 2, 29, 9, 0), utc(2028, 2, 29, 9, 0), utc(2032, 2, 29, 9, 0));
    }

    #[test]
    fn weekly_nine_am_new_york_keeps_local_time_across_both_dst_changes() {
        let g = given("FREQ=WEEKLY;BYDAY=MO", "America/New_York");
        // 2026-03-02 09:00 EST = 14:00Z; DST starts 2026-03-08; 2026-03-09 09:00 EDT = 13:00Z.
        g.then_next(1, utc(2026, 3, 2, 14, 0), utc(2026, 3, 2, 15, 0), utc(2026, 3, 9, 13, 0));
        // 2026-10-26 09:00 EDT = 13:00Z; DST ends 2026-11-01; 2026-11-02 09:00 EST = 14:00Z.
        g.then_next(5, utc(2026, 10, 26, 13, 0), utc(2026, 10, 26, 13, 30), utc(2026, 11, 2, 14, 0));
    }

    #[test]
    fn late_completion_skips_missed_instances() {
        let g = given("FREQ=DAILY", "UTC");
        // Due 1 March, completed 5 March 12:00: the next is 6 March, not 2 March.
        g.then_next(1, utc(2026, 3, 1, 9, 0), utc(2026, 3, 5, 12, 0), utc(2026, 3, 6, 9, 0));
        given("FREQ=WEEKLY;BYDAY=MO", "Europe/Berlin").then_next(1, utc(2026, 3, 2, 8, 0), utc(2026, 3, 20, 8, 0), utc(2026, 3, 23, 8, 0));
    }

    #[test]
    fn count_ends_the_series() {
        let g = given("FREQ=DAILY;COUNT=3", "UTC");
        g.then_next(1, utc(2026, 3, 1, 9, 0), utc(2026, 3, 1, 9, 0), utc(2026, 3, 2, 9, 0));
        g.then_next(2, utc(2026, 3, 2, 9, 0), utc(2026, 3, 2, 9, 0), utc(2026, 3, 3, 9, 0));
        assert_eq!(g.when_completed(3, utc(2026, 3, 3, 9, 0), utc(2026, 3, 3, 9, 0)), NextOccurrence::SeriesEnded);
    }

    #[test]
    fn until_ends_the_series() {
        let g = given("FREQ=DAILY;UNTIL=20260303T090000Z", "UTC");
        g.then_next(1, utc(2026, 3, 2, 9, 0), utc(2026, 3, 2, 9, 0), utc(2026, 3, 3, 9, 0));
        assert_eq!(g.when_completed(2, utc(2026, 3, 3, 9, 0), utc(2026, 3, 3, 9, 0)), NextOccurrence::SeriesEnded);
        // Completed so late that every remaining instance has passed.
        assert_eq!(g.when_completed(1, utc(2026, 3, 2, 9, 0), utc(2026, 4, 1, 9, 0)), NextOccurrence::SeriesEnded);
    }
}
