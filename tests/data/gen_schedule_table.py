#!/usr/bin/env python3
"""Derive tests/data/schedule_table.tsv from cronsim, an independent cron implementation.

Run:  pip install cronsim==2.8 && python3 tests/data/gen_schedule_table.py > tests/data/schedule_table.tsv

Why cronsim: it follows the Vixie cron daylight-saving rule that PRODUCT.md "Time semantics" asks
for (wall-clock vs periodic schedules), the Vixie day-of-month/day-of-week rule, Sunday as 0 or 7,
and `N/step` as `N-max/step`. The Rust test (tests/schedule_table.rs) only reads the TSV, so
running the test suite needs no Python.

Where cronsim's answer is not the contract's, the case is left out and reported on stderr
(nothing is "fixed up" here; such cases are derived by hand in tests/schedule_table.rs):
  * cronsim applies the wall-clock rule to 5-field expressions only, so 6-field wall-clock
    expressions are generated only in zones without daylight saving;
  * cronsim returns the first occurrence of a repeated wall time even when asked for instants
    after it (its answer is then not strictly later than `after`);
  * results are checked against the contract's definition, independently of the code under
    test: each is strictly later, its local wall time matches (or, wall-clock, it ends a gap
    that swallowed a match; never a second occurrence), and a brute-force scan of every
    minute (second, for 6 fields) up to the last result finds no skipped instant. The scan
    catches cronsim missing the repeat of a wall time when a fold is not a whole hour tick
    (Lord Howe's 30-minute fold, Chatham's fold at :45).
cronsim has no macros; a macro row is evaluated through its crontab(5) definition.
"""

import sys
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError

UTC = timezone.utc
RESULTS = 5  # instants per case

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# Plain cases: (tag, expression, zone, after).
PLAIN = [
    # every field kind, UTC, 5 fields
    ("every-minute", "* * * * *", "UTC", "2026-01-01T00:00:00Z"),
    ("every-minute-fraction", "* * * * *", "UTC", "2026-05-17T10:20:30.5Z"),
    ("step-minutes", "*/15 * * * *", "UTC", "2026-01-01T00:07:00Z"),
    ("step-7-wraps-hour", "*/7 * * * *", "UTC", "2026-01-01T00:50:00Z"),
    ("top-of-hour", "0 * * * *", "UTC", "2026-12-31T22:30:00Z"),
    ("daily-0930", "30 9 * * *", "UTC", "2026-01-01T09:30:00Z"),
    ("weekdays-names", "0 9 * * MON-FRI", "UTC", "2026-01-01T12:00:00Z"),
    ("weekdays-numbers", "0 9 * * 1-5", "UTC", "2026-01-01T12:00:00Z"),
    ("weekdays-lowercase-list", "0 12 * * mon,wed,fri", "UTC", "2026-01-01T00:00:00Z"),
    ("first-of-month", "0 0 1 * *", "UTC", "2026-01-15T00:00:00Z"),
    ("list-days", "0 12 1,15 * *", "UTC", "2026-01-10T00:00:00Z"),
    ("list-month-names", "15 10 * JAN,JUL *", "UTC", "2026-01-31T10:15:00Z"),
    ("month-range-names", "0 0 1 jan-mar *", "UTC", "2026-02-15T00:00:00Z"),
    ("sunday-name", "0 0 * * SUN", "UTC", "2026-01-01T00:00:00Z"),
    ("sunday-0", "0 0 * * 0", "UTC", "2026-01-01T00:00:00Z"),
    ("sunday-7", "0 0 * * 7", "UTC", "2026-01-01T00:00:00Z"),
    ("fri-to-7", "0 0 * * 5-7", "UTC", "2026-01-01T00:00:00Z"),
    ("dow-1-7-step-2", "0 6 * * 1-7/2", "UTC", "2026-01-01T00:00:00Z"),
    ("dow-star-step", "0 0 * * */2", "UTC", "2026-01-01T00:00:00Z"),
    ("hour-range-step", "0 8-18/2 * * *", "UTC", "2026-01-01T17:00:00Z"),
    ("hour-star-step-5", "0 */5 * * *", "UTC", "2026-01-01T21:00:00Z"),
    ("number-slash-step", "5/15 * * * *", "UTC", "2026-01-01T00:00:00Z"),
    ("range-step-minutes", "1-59/20 * * * *", "UTC", "2026-01-01T00:00:00Z"),
    ("mixed-list", "0,10-12,50 * * * *", "UTC", "2026-01-01T00:00:00Z"),
    ("dom-or-dow-13-fri", "0 0 13 * FRI", "UTC", "2026-01-01T00:00:00Z"),
    ("dom-or-dow-man-page", "30 4 1,15 * 5", "UTC", "2026-01-01T00:00:00Z"),
    ("dom-or-dow-first-week-mon", "0 0 1-7 * MON", "UTC", "2026-01-01T00:00:00Z"),
    ("dom-star-step-and-dow", "0 0 */10 * MON", "UTC", "2026-01-01T00:00:00Z"),
    ("dom-star-and-dow-star-step", "0 0 13 * */7", "UTC", "2026-01-01T00:00:00Z"),
    ("quarterly", "0 0 1 */3 *", "UTC", "2026-01-01T00:00:00Z"),
    ("evening-weekdays", "0 22 * * 1-5", "UTC", "2026-01-02T22:00:00Z"),
    ("whole-february", "0 0 * 2 *", "UTC", "2028-02-26T12:00:00Z"),
    ("leap-day", "0 0 29 2 *", "UTC", "2026-01-01T00:00:00Z"),
    ("leap-day-noon-after-one", "0 12 29 2 *", "UTC", "2028-02-29T12:00:00Z"),
    ("leap-day-or-monday", "0 0 29 2 MON", "UTC", "2027-02-01T00:00:00Z"),
    ("leap-day-and-sunday", "0 0 29 2 */7", "UTC", "2026-01-01T00:00:00Z"),
    ("feb-28-29", "0 0 28-29 2 *", "UTC", "2027-01-01T00:00:00Z"),
    ("day-31", "0 0 31 * *", "UTC", "2026-01-01T00:00:00Z"),
    ("day-31-short-months", "0 0 31 4,6,9,11,12 *", "UTC", "2026-01-01T00:00:00Z"),
    ("day-30-skips-february", "0 0 30 * *", "UTC", "2026-01-01T00:00:00Z"),
    ("day-30-31", "0 0 30,31 * *", "UTC", "2026-01-30T12:00:00Z"),
    ("new-year-eve-last-minute", "59 23 31 12 *", "UTC", "2026-06-01T00:00:00Z"),
    ("yearly", "@yearly", "UTC", "2026-01-01T00:00:00Z"),
    ("annually", "@annually", "UTC", "2026-03-01T00:00:00Z"),
    ("monthly", "@monthly", "UTC", "2026-01-31T23:59:59Z"),
    ("weekly", "@weekly", "UTC", "2026-01-01T00:00:00Z"),
    ("daily", "@daily", "UTC", "2026-01-01T00:00:00Z"),
    ("midnight", "@midnight", "UTC", "2026-01-01T00:00:01Z"),
    ("hourly", "@hourly", "UTC", "2026-01-01T00:59:59Z"),
    # 6 fields (seconds first), UTC and zones without daylight saving
    ("6f-every-5s", "*/5 * * * * *", "UTC", "2026-01-01T00:00:58Z"),
    ("6f-every-5s-fraction", "*/5 * * * * *", "UTC", "2026-01-01T00:00:04.999Z"),
    ("6f-minute-step", "0 */5 * * * *", "UTC", "2026-01-01T00:00:00Z"),
    ("6f-daily-with-second", "30 0 9 * * *", "UTC", "2026-01-01T09:00:30Z"),
    ("6f-second-list", "15,45 * * * * *", "UTC", "2026-01-01T00:00:00Z"),
    ("6f-second-range-step", "0-10/5 30 * * * *", "UTC", "2026-01-01T00:00:00Z"),
    ("6f-leap-day", "10 0 0 29 2 *", "UTC", "2026-01-01T00:00:00Z"),
    ("6f-office-hours", "*/20 * 9-17 * * MON-FRI", "UTC", "2026-01-02T17:59:00Z"),
    ("6f-last-second-of-year", "59 59 23 31 12 *", "UTC", "2026-01-01T00:00:00Z"),
    ("6f-sunday-7", "0 0 0 * * 7", "UTC", "2026-01-01T00:00:00Z"),
    ("6f-shanghai-every-5s", "*/5 * * * * *", "Asia/Shanghai", "2026-01-01T00:00:00+08:00"),
    ("6f-kolkata-daily", "0 30 9 * * *", "Asia/Kolkata", "2026-01-01T00:00:00Z"),
    # zones with unusual but constant offsets
    ("kolkata-0900", "0 9 * * *", "Asia/Kolkata", "2026-01-01T00:00:00Z"),
    ("kathmandu-hourly", "@hourly", "Asia/Kathmandu", "2026-01-01T00:00:00Z"),
    ("shanghai-weekdays", "0 9 * * MON-FRI", "Asia/Shanghai", "2026-01-01T00:00:00Z"),
    ("tokyo-monthly-31", "0 0 31 * *", "Asia/Tokyo", "2026-01-31T00:00:00+09:00"),
    # daylight-saving zones away from any transition: plain local time
    ("ny-summer-daily", "0 9 * * *", "America/New_York", "2026-07-01T00:00:00Z"),
    ("berlin-winter-weekdays", "30 8 * * 1-5", "Europe/Berlin", "2026-01-01T00:00:00Z"),
    ("sydney-summer-6f", "0 0 12 * * *", "Australia/Sydney", "2026-01-01T00:00:00Z"),
    ("lord-howe-6f-halfhour", "0 */30 * * * *", "Australia/Lord_Howe", "2026-07-01T00:00:00Z"),
]

# Transitions to probe: (zone, a day on which the UTC offset changes).
TRANSITIONS = [
    ("America/New_York", "2026-03-08"),
    ("America/New_York", "2026-11-01"),
    ("Europe/Berlin", "2026-03-29"),
    ("Europe/Berlin", "2026-10-25"),
    ("Europe/London", "2026-03-29"),
    ("Europe/London", "2026-10-25"),
    ("Australia/Sydney", "2026-10-04"),
    ("Australia/Sydney", "2026-04-05"),
    ("Australia/Lord_Howe", "2026-10-04"),
    ("Australia/Lord_Howe", "2026-04-05"),
    ("Pacific/Chatham", "2026-09-27"),
    ("Pacific/Chatham", "2026-04-05"),
    ("America/Sao_Paulo", "2018-11-04"),
    ("America/Sao_Paulo", "2018-02-18"),
    ("Pacific/Apia", "2011-12-29"),
]


def find_transition(zone, day):
    """The instant, old offset and new offset of the offset change around `day` (UTC scan)."""
    tz = ZoneInfo(zone)
    start = datetime.fromisoformat(day).replace(tzinfo=UTC) - timedelta(days=1)
    previous = start.astimezone(tz).utcoffset()
    for minute in range(0, 3 * 24 * 60):
        instant = start + timedelta(minutes=minute)
        offset = instant.astimezone(tz).utcoffset()
        if offset != previous:
            return instant, previous, offset
    raise SystemExit(f"no transition near {zone} {day}")


def templates(local_start, minutes):
    """Expressions aimed at the affected wall times [local_start, local_start + minutes)."""
    h, m0 = local_start.hour, local_start.minute
    inside = (m0 + min(minutes, 60) // 2) % 60  # a minute inside the affected window
    h2 = (h + 1) % 24
    return [
        # wall-clock: minute and hour explicit
        ("w-inside", f"{inside} {h} * * *"),
        ("w-zero", f"0 {h} * * *"),
        ("w-list-minutes", f"{m0},{inside} {h} * * *"),
        ("w-range-hours", f"{inside} {h}-{h2} * * *" if h2 > h else f"{inside} {h},{h2} * * *"),
        ("w-list-hours", f"15 {h},{(h + 2) % 24} * * *"),
        ("w-daily", "@daily"),
        ("w-0-0", "0 0 * * *"),
        # periodic: minute or hour starts with *
        ("p-half-hourly", "*/30 * * * *"),
        ("p-hourly", "@hourly"),
        ("p-minute-inside", f"{inside} * * * *"),
        ("p-quarter-in-hour", f"*/15 {h} * * *"),
        ("p-every-2h", "0 */2 * * *"),
        ("p-every-minute-in-hour", f"* {h} * * *"),
        ("p-every-10-minutes", "*/10 * * * *"),
        # 6-field periodic (cronsim's real-time walk is the contract's periodic rule)
        ("p6-every-20-minutes", "0 */20 * * * *"),
        ("p6-every-30s-in-hour", f"*/30 * {h} * * *"),
    ]


def crosses_transition(zone, after, results):
    tz = ZoneInfo(zone)
    offsets = {instant.astimezone(tz).utcoffset() for instant in [after, *results]}
    return len(offsets) > 1


def expand(expr):
    return MACROS.get(expr.lower(), expr)


def wall_clock(expr):
    fields = expand(expr).split()
    minute, hour = (fields[0], fields[1]) if len(fields) == 5 else (fields[1], fields[2])
    return not minute.startswith("*") and not hour.startswith("*")


def local_matches(sim, local):
    return (
        local.month in sim.months
        and sim.match_day(local.date())
        and local.hour in sim.hours
        and local.minute in sim.minutes
        and local.second in sim.seconds
    )


def check(expr, zone, after, results):
    """The contract's definition, evaluated on cronsim's answers; returns a problem or None."""
    tz = ZoneInfo(zone)
    sim = CronSim(expand(expr), after.astimezone(tz))
    # Python compares and subtracts datetimes of one zone by wall time, ignoring the fold: work in
    # UTC, converting to the zone only to read wall times.
    previous = after.astimezone(UTC)
    for result in results:
        result = result.astimezone(UTC)
        if result <= previous:
            return f"{result.isoformat()} is not after {previous.isoformat()}"
        previous = result
        local = result.astimezone(tz)
        naive = local.replace(tzinfo=None)
        if not wall_clock(expr) or zone == "UTC":
            if not local_matches(sim, naive):
                return f"{local.isoformat()} does not match"
            continue
        first = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
        if local_matches(sim, naive):
            if first != result:
                return f"{local.isoformat()} is a second occurrence"
            continue
        before = (result - timedelta(seconds=1)).astimezone(tz).replace(tzinfo=None)
        if naive - before == timedelta(seconds=1):
            return f"{local.isoformat()} neither matches nor ends a gap"
    return missing(sim, expr, zone, after, results)


def fires(sim, expr, tz, instant):
    """The contract's rule for one instant, by brute force (`instant` in UTC, whole seconds)."""
    naive = instant.astimezone(tz).replace(tzinfo=None)
    matches = local_matches(sim, naive)
    if not wall_clock(expr):
        return matches
    if matches and naive.replace(tzinfo=tz, fold=0).astimezone(UTC) == instant:
        return True  # first occurrence of a matching wall time
    before = (instant - timedelta(seconds=1)).astimezone(tz).replace(tzinfo=None)
    gap = naive - before - timedelta(seconds=1)  # wall times skipped just before `instant`
    if gap <= timedelta(0):
        return False
    step = timedelta(seconds=1 if len(expand(expr).split()) == 6 else 60)
    probe = before + timedelta(seconds=1)
    while probe < naive:  # a gap ends here: does it swallow a matching wall time?
        if local_matches(sim, probe):
            return True
        probe += step
    return False


def missing(sim, expr, zone, after, results):
    """Scans every candidate instant between `after` and the last result: none may be skipped.
    5-field schedules can only fire on a whole minute (all zones here have whole-minute offsets),
    6-field ones on a whole second; spans over 8 days are not scanned."""
    tz = ZoneInfo(zone)
    step = 1 if len(expand(expr).split()) == 6 else 60
    start = int(after.timestamp()) // step * step + step
    end = int(results[-1].timestamp())
    if end - start > 8 * 86400 or (step == 1 and end - start > 86400):
        return None
    expected = {int(r.timestamp()) for r in results}
    for second in range(start, end, step):
        if second not in expected and fires(sim, expr, tz, datetime.fromtimestamp(second, UTC)):
            return f"{datetime.fromtimestamp(second, UTC).astimezone(tz).isoformat()} is skipped"
    return None


def run(expr, zone, after_text):
    tz = ZoneInfo(zone)
    after = datetime.fromisoformat(after_text.replace("Z", "+00:00"))
    results = []
    try:
        sim = CronSim(expand(expr), after.astimezone(tz))
        for _ in range(RESULTS):
            results.append(next(sim))
    except StopIteration:
        pass  # cronsim gives up after 50 years; the test compares what it has
    return after, results


def main():
    rows = []
    dropped = 0

    def add(name, expr, zone, after_text):
        nonlocal dropped
        after, results = run(expr, zone, after_text)
        problem = check(expr, zone, after, results) if results else "no result"
        six_fields = len(expand(expr).split()) == 6
        if not problem and six_fields and wall_clock(expr) and crosses_transition(zone, after, results):
            # cronsim does not apply the wall-clock rule to 6 fields: such cases are hand-derived.
            problem = "6-field wall-clock schedule across a daylight-saving change"
        if problem:
            print(f"drop {name} {expr!r} {zone} {after_text}: {problem}", file=sys.stderr)
            dropped += 1
            return
        rows.append((name, expr, zone, after_text, " ".join(r.isoformat() for r in results)))

    for tag, expr, zone, after in PLAIN:
        add(tag, expr, zone, after)

    for zone, day in TRANSITIONS:
        tz = ZoneInfo(zone)
        instant, old, new = find_transition(zone, day)
        kind = "gap" if new > old else "fold"
        # Affected wall times: the missing ones (gap) or the repeated ones (fold).
        wall_start = (instant + (old if kind == "gap" else new)).replace(tzinfo=None)
        minutes = int(abs((new - old).total_seconds()) // 60)
        short = zone.split("/")[-1].lower()
        afters = [("before", instant - timedelta(hours=2))]
        if kind == "fold":
            afters.append(("in-repeat", instant + timedelta(minutes=min(minutes // 3, 10))))
        for when, after in afters:
            after_text = after.astimezone(tz).isoformat()
            for tag, expr in templates(wall_start, minutes):
                add(f"{short}-{day}-{kind}-{when}-{tag}", expr, zone, after_text)

    print(f"# Generated by tests/data/gen_schedule_table.py from cronsim; do not edit by hand.")
    print(f"# {len(rows)} cases; each expects the first instants strictly after `after`, RFC 3339 in the zone.")
    print("name\texpr\ttz\tafter\texpected")
    for row in rows:
        print("\t".join(row))
    print(f"{len(rows)} rows, {dropped} dropped", file=sys.stderr)


if __name__ == "__main__":
    main()
