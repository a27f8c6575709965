//! The 24-hour lag chart of a group page: inline SVG rendered on the
//! server from the group's lag history (`tidemark_receiver::lag_ring`), so
//! it shows without JavaScript, prints and reads in screenshots. Pure:
//! slots and `now` in, markup out.
//!
//! The chart draws each minute's highest lag as a line (a minute without
//! a report leaves a gap: no data is not zero lag), marks minutes the
//! shipper said critical, and labels the scale. A text summary beside it
//! ([`lag_summary`]) says the same for screen readers and people in a
//! hurry.

use std::fmt::Write;

use tidemark_receiver::lag_ring::{LagSlot, SLOTS, SLOT_SECONDS};

use crate::view::{lag_ms, utc};

/// Space left of the plot for the scale's labels, and below it.
const LEFT: u32 = 56;
const BOTTOM: u32 = 20;
const TOP: u32 = 8;

fn minute_of(now_ns: u64) -> u64 {
    now_ns / 1_000_000_000 / SLOT_SECONDS
}

/// A round top for the scale, in ms: 1, 2 or 5 times a power of ten
/// seconds (at least one second).
fn scale_top(max_ms: u32) -> u64 {
    let max = u64::from(max_ms).max(1_000);
    let mut unit = 1_000u64;
    loop {
        for m in [1, 2, 5] {
            if m * unit >= max {
                return m * unit;
            }
        }
        unit *= 10;
    }
}

/// The first minute of the 24 hours up to `now_ns`, and the slots within
/// them.
fn last_day(slots: &[LagSlot], now_ns: u64) -> (u64, Vec<&LagSlot>) {
    let now = minute_of(now_ns);
    let first = now.saturating_sub(SLOTS as u64 - 1);
    let shown = slots
        .iter()
        .filter(|s| (first..=now).contains(&s.minute))
        .collect();
    (first, shown)
}

/// The chart of `slots` (oldest first, as the ring gives them) for the
/// 24 hours up to `now_ns`, `width` × `height` pixels.
pub fn lag_chart(slots: &[LagSlot], now_ns: u64, width: u32, height: u32) -> String {
    let (width, height) = (width.max(LEFT + 100), height.max(TOP + BOTTOM + 40));
    let (first, shown) = last_day(slots, now_ns);
    let top = scale_top(shown.iter().map(|s| s.max_lag_ms).max().unwrap_or(0));
    let plot_w = f64::from(width - LEFT - 4);
    let plot_h = f64::from(height - TOP - BOTTOM);
    let x = |minute: u64| f64::from(LEFT) + (minute - first) as f64 * plot_w / (SLOTS - 1) as f64;
    let y =
        |ms: u32| f64::from(TOP) + plot_h - (u64::from(ms).min(top) as f64 * plot_h / top as f64);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" id="lag-chart" role="img" aria-labelledby="lag-chart-title lag-chart-desc" width="{width}" height="{height}" viewBox="0 0 {width} {height}">"#
    );
    let _ = write!(
        svg,
        r#"<title id="lag-chart-title">Replication lag over the last 24 hours</title><desc id="lag-chart-desc">{}</desc>"#,
        lag_summary(slots, now_ns)
    );
    // The frame and the scale.
    let (x0, y0, y_top) = (LEFT, TOP as f64 + plot_h, TOP);
    let _ = write!(
        svg,
        r##"<g fill="none" stroke="#c8c8c8" stroke-width="1"><line x1="{x0}" y1="{y0:.1}" x2="{x1}" y2="{y0:.1}"/><line x1="{x0}" y1="{y_top}" x2="{x0}" y2="{y0:.1}"/><line x1="{x0}" y1="{ymid:.1}" x2="{x1}" y2="{ymid:.1}" stroke-dasharray="3 3"/></g>"##,
        x1 = width - 4,
        ymid = TOP as f64 + plot_h / 2.0,
    );
    let label = lag_ms;
    let _ = write!(
        svg,
        r##"<g font-family="system-ui, sans-serif" font-size="11" fill="#555"><text x="{lx}" y="{ty}" text-anchor="end">{top_label}</text><text x="{lx}" y="{my:.1}" text-anchor="end">{mid_label}</text><text x="{lx}" y="{y0:.1}" text-anchor="end">0</text><text x="{x0}" y="{by}">24 h ago</text><text x="{xr}" y="{by}" text-anchor="end">now</text></g>"##,
        lx = LEFT - 4,
        ty = TOP + 10,
        my = TOP as f64 + plot_h / 2.0 + 4.0,
        top_label = label(top),
        mid_label = label(top / 2),
        by = height - 4,
        xr = width - 4,
    );
    // Minutes the shipper said critical, behind the line.
    let step = plot_w / (SLOTS - 1) as f64;
    for s in shown.iter().filter(|s| s.critical) {
        let _ = write!(
            svg,
            r##"<rect class="critical" x="{:.1}" y="{TOP}" width="{:.1}" height="{plot_h:.1}" fill="#f8d3d3"/>"##,
            x(s.minute) - step / 2.0,
            step.max(1.0)
        );
    }
    // The line: a gap wherever a minute has no slot.
    let mut path = String::new();
    let mut prev: Option<u64> = None;
    for s in &shown {
        let cmd = if prev.is_some_and(|p| p + 1 == s.minute) {
            'L'
        } else {
            'M'
        };
        let _ = write!(path, "{cmd}{:.1} {:.1}", x(s.minute), y(s.max_lag_ms));
        if cmd == 'M' {
            // A lone minute still shows, as a short tick.
            let _ = write!(path, "h1");
        }
        prev = Some(s.minute);
    }
    if !path.is_empty() {
        let _ = write!(
            svg,
            r##"<path class="lag" d="{path}" fill="none" stroke="#0b4f8a" stroke-width="1.5"/>"##
        );
    }
    svg.push_str("</svg>");
    svg
}

/// One sentence of what the chart shows: the lag now, the 24 h highest
/// and when, or that there is no history.
pub fn lag_summary(slots: &[LagSlot], now_ns: u64) -> String {
    let (_, shown) = last_day(slots, now_ns);
    let Some(last) = shown.iter().max_by_key(|s| s.minute) else {
        return "No lag reported by the shipper in the last 24 hours.".into();
    };
    let worst = shown
        .iter()
        .max_by_key(|s| (s.max_lag_ms, s.minute))
        .expect("not empty");
    let ms = |v: u32| lag_ms(u64::from(v));
    let critical = shown.iter().filter(|s| s.critical).count();
    let mut text = format!(
        "Lag {} at {} (last report); 24 h highest {} at {}; {} minute(s) with reports",
        ms(last.last_lag_ms),
        minute_utc(last.minute),
        ms(worst.max_lag_ms),
        minute_utc(worst.minute),
        shown.len(),
    );
    if critical > 0 {
        let _ = write!(text, ", {critical} of them critical");
    }
    text.push('.');
    text
}

/// `HH:MM UTC` of a minute.
fn minute_utc(minute: u64) -> String {
    let full = utc(minute * SLOT_SECONDS * 1_000_000_000);
    // "YYYY-MM-DD HH:MM:SS UTC" → "HH:MM UTC".
    format!("{} UTC", &full[11..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000_000_000;
    const NOW: u64 = 29_610_000 * MIN;

    fn slot(minutes_ago: u64, lag_ms: u32, critical: bool) -> LagSlot {
        LagSlot {
            minute: NOW / MIN - minutes_ago,
            max_lag_ms: lag_ms,
            last_lag_ms: lag_ms,
            pending_bytes: 0,
            critical,
        }
    }

    #[test]
    fn an_empty_history_is_an_empty_chart_that_says_so() {
        let svg = lag_chart(&[], NOW, 600, 160);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("<title id=\"lag-chart-title\">"));
        assert!(!svg.contains("<path"), "no line without data");
        assert!(svg.contains("No lag reported"));
    }

    #[test]
    fn the_line_follows_the_slots_with_gaps_where_none_came() {
        let slots = [
            slot(10, 1_000, false),
            slot(9, 4_000, false),
            // 8 .. 6 missing: a gap, not zero.
            slot(5, 2_000, true),
            slot(4, 500, false),
        ];
        let svg = lag_chart(&slots, NOW, 600, 160);
        let d = svg
            .split(" d=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(d.matches('M').count(), 2, "two runs: {d}");
        assert_eq!(d.matches('L').count(), 2, "{d}");
        // 4 s highest: the scale tops at 5 s, the line's peak below the top.
        assert!(svg.contains(">5 s<"), "{svg}");
        assert_eq!(svg.matches("class=\"critical\"").count(), 1);
        // The peak: y of 4 s of a 5 s scale in a 132-pixel plot.
        let peak_y = 8.0 + 132.0 - 4.0 / 5.0 * 132.0;
        assert!(d.contains(&format!(" {peak_y:.1}")), "{d}");
        // Everything inside the box.
        for n in d.split(|c: char| !(c.is_ascii_digit() || c == '.')) {
            if let Ok(v) = n.parse::<f64>() {
                assert!((0.0..=600.0).contains(&v), "{v} in {d}");
            }
        }
    }

    #[test]
    fn slots_outside_the_day_are_not_drawn() {
        let old = LagSlot {
            minute: NOW / MIN - SLOTS as u64,
            ..slot(0, 9_000_000, false)
        };
        let svg = lag_chart(&[old, slot(1, 1_500, false)], NOW, 600, 160);
        assert!(
            svg.contains(">2 s<"),
            "the scale ignores the old slot: {svg}"
        );
        assert_eq!(svg.matches('M').count(), 1);
    }

    #[test]
    fn the_summary_names_the_lag_now_and_the_day_s_highest() {
        let slots = [slot(120, 42_000, false), slot(1, 3_000, true)];
        let text = lag_summary(&slots, NOW);
        assert!(text.starts_with("Lag 3 s at "), "{text}");
        assert!(text.contains("24 h highest 42 s at "), "{text}");
        assert!(
            text.contains("2 minute(s) with reports, 1 of them critical."),
            "{text}"
        );
    }
}
