//! The results as the console draws them: the table per arm with intervals, the periodic rating
//! by turn as lines and time to completion as box plots, in SVG coordinates, and the latest
//! evaluation's table. Plain data for a template; nothing here knows HTTP.

use super::{ArmResults, Estimate};
use crate::protocol::{Protocol, RatingWhen};

/// Plot size in SVG units, and the margin for axis labels.
const PLOT_W: f64 = 560.0;
const PLOT_H: f64 = 240.0;
const PLOT_MARGIN: f64 = 40.0;
/// Series colours, one per arm (colour-blind safe).
const COLOURS: [&str; 6] = [
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00",
];

/// The latest evaluation with simulated users (`collabllm eval`), as the results page shows it
/// (made by `collab::evaluate::view`).
pub struct EvaluationView {
    pub when: String,
    pub users: i32,
    pub baseline: String,
    pub headers: Vec<&'static str>,
    pub rows: Vec<ResultRow>,
    /// (arm, cells) of each arm's paired difference to the baseline.
    pub diffs: Vec<(String, Vec<String>)>,
}

/// One round of an online DPO run (`collabllm loop`) of the study, as its evaluation found it
/// (made by `collab::evaluate::round_view`).
pub struct RoundView {
    /// The run's id and the round's number.
    pub run: String,
    pub round: u32,
    /// The round's evaluation study, whose page holds the whole table.
    pub slug: String,
    pub users: i32,
    /// The trained arm's paired difference to the base in each of `EvaluationView::headers`.
    pub cells: Vec<String>,
    /// The share of first replies that ask, trained vs base, on ambiguous and on clear requests.
    pub asks_ambiguous: String,
    pub asks_clear: String,
}

/// One row of the results table.
pub struct ResultRow {
    pub arm: String,
    pub n: usize,
    pub cells: Vec<String>,
}

pub struct Series {
    pub name: String,
    pub colour: &'static str,
    pub points: String,
    pub dots: Vec<(f64, f64)>,
}

pub struct Tick {
    pub at: f64,
    pub label: String,
}

/// The periodic rating by turn, one line per arm.
pub struct LinePlot {
    pub key: String,
    pub series: Vec<Series>,
    pub x_ticks: Vec<Tick>,
    pub y_ticks: Vec<Tick>,
}

/// Time to completion per arm.
pub struct BoxRow {
    pub name: String,
    pub colour: &'static str,
    pub y: f64,
    pub min: f64,
    pub q1: f64,
    pub median: f64,
    pub q3: f64,
    pub max: f64,
}

pub struct BoxPlot {
    pub rows: Vec<BoxRow>,
    pub x_ticks: Vec<Tick>,
    pub height: f64,
}

/// A tick of the minutes axis, with the decimals the axis needs: a pilot that took seconds gets
/// ticks that differ (0.005, 0.011 …), a study that took an hour whole minutes.
fn minutes_label(value: f64, longest: f64) -> String {
    let decimals = match longest {
        l if l < 0.1 => 3,
        l if l < 1.0 => 2,
        l if l < 10.0 => 1,
        _ => 0,
    };
    format!("{value:.decimals$}")
}

/// Minutes as a median with quartiles, to the hundredth below one minute.
fn fmt_minutes(median: f64, q1: f64, q3: f64) -> String {
    let d = if q3 < 1.0 { 2 } else { 1 };
    format!("{median:.d$} [{q1:.d$}, {q3:.d$}]")
}

fn fmt_estimate(e: &Option<Estimate>) -> String {
    match e {
        Some(e) => fmt_interval(e.mean, e.low, e.high),
        None => "—".into(),
    }
}

/// "mean [low, high]", each number with two decimals unless it is whole (turns, counts, ratings
/// that all agree read "8 [8, 8]", not "8.00 [8.00, 8.00]").
pub fn fmt_interval(mean: f64, low: f64, high: f64) -> String {
    let number = |v: f64| {
        if v.fract() == 0.0 && v.abs() < 1e15 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        }
    };
    format!("{} [{}, {}]", number(mean), number(low), number(high))
}

/// The results table, the rating-by-turn plots and the completion-time box plot.
pub fn result_views(
    arms: &[ArmResults],
    protocol: &Protocol,
) -> (Vec<String>, Vec<ResultRow>, Vec<LinePlot>, Option<BoxPlot>) {
    let final_keys: Vec<String> = protocol
        .final_ratings()
        .iter()
        .map(|r| r.id.clone())
        .collect();
    let periodic_keys: Vec<String> = protocol
        .ratings
        .iter()
        .filter(|r| r.when == RatingWhen::Periodic)
        .map(|r| r.id.clone())
        .collect();
    let mut headers: Vec<String> = final_keys.iter().map(|k| format!("{k} (final)")).collect();
    headers.extend(periodic_keys.iter().map(|k| format!("{k} (periodic)")));
    headers.extend(
        [
            "minutes, median [IQR]",
            "turns",
            "document words",
            "assistant tokens",
            "TTFT ms",
        ]
        .map(String::from),
    );
    let rows = arms
        .iter()
        .map(|a| {
            let mut cells: Vec<String> = final_keys
                .iter()
                .map(|k| fmt_estimate(a.finals.get(k).unwrap_or(&None)))
                .collect();
            cells.extend(
                periodic_keys
                    .iter()
                    .map(|k| fmt_estimate(a.periodic.get(k).unwrap_or(&None))),
            );
            cells.push(
                a.minutes
                    .as_ref()
                    .map_or("—".into(), |s| fmt_minutes(s.median, s.q1, s.q3)),
            );
            cells.extend([&a.turns, &a.words, &a.assistant_tokens, &a.ttft_ms].map(fmt_estimate));
            ResultRow {
                arm: a.arm.clone(),
                n: a.n,
                cells,
            }
        })
        .collect();
    let lines = protocol
        .ratings
        .iter()
        .filter(|r| r.when == RatingWhen::Periodic)
        .filter_map(|spec| {
            let max_turn = arms
                .iter()
                .filter_map(|a| a.by_turn.get(&spec.id))
                .flat_map(|points| points.iter().map(|(t, _)| *t))
                .max()?;
            let step = spec.every_turns.unwrap_or(1).max(1) as i32;
            let x = |t: i32| {
                PLOT_MARGIN
                    + (PLOT_W - 2.0 * PLOT_MARGIN) * f64::from(t) / f64::from(max_turn.max(1))
            };
            let span = f64::from((spec.max - spec.min).max(1));
            let y = |v: f64| {
                PLOT_H
                    - PLOT_MARGIN
                    - (PLOT_H - 2.0 * PLOT_MARGIN) * (v - f64::from(spec.min)) / span
            };
            let series = arms
                .iter()
                .enumerate()
                .filter_map(|(i, a)| {
                    let points = a.by_turn.get(&spec.id)?;
                    let dots: Vec<(f64, f64)> =
                        points.iter().map(|(t, v)| (x(*t), y(*v))).collect();
                    Some(Series {
                        name: a.arm.clone(),
                        colour: COLOURS[i % COLOURS.len()],
                        points: dots
                            .iter()
                            .map(|(px, py)| format!("{px:.1},{py:.1}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        dots,
                    })
                })
                .collect();
            Some(LinePlot {
                key: spec.id.clone(),
                series,
                x_ticks: (1..=max_turn / step)
                    .map(|k| Tick {
                        at: x(k * step),
                        label: (k * step).to_string(),
                    })
                    .collect(),
                y_ticks: (spec.min..=spec.max)
                    .map(|v| Tick {
                        at: y(f64::from(v)),
                        label: v.to_string(),
                    })
                    .collect(),
            })
        })
        .collect();
    let longest = arms
        .iter()
        .filter_map(|a| a.minutes.as_ref().map(|s| s.max))
        .fold(0.0, f64::max);
    let boxes = (longest > 0.0).then(|| {
        let x = |m: f64| PLOT_MARGIN * 2.0 + (PLOT_W - 3.0 * PLOT_MARGIN) * m / longest;
        let rows: Vec<BoxRow> = arms
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                let s = a.minutes.as_ref()?;
                Some(BoxRow {
                    name: a.arm.clone(),
                    colour: COLOURS[i % COLOURS.len()],
                    y: 20.0 + 36.0 * i as f64,
                    min: x(s.min),
                    q1: x(s.q1),
                    median: x(s.median),
                    q3: x(s.q3),
                    max: x(s.max),
                })
            })
            .collect();
        BoxPlot {
            height: 40.0 + 36.0 * arms.len() as f64,
            x_ticks: (0..=4)
                .map(|k| Tick {
                    at: x(longest * f64::from(k) / 4.0),
                    label: minutes_label(longest * f64::from(k) / 4.0, longest),
                })
                .collect(),
            rows,
        }
    });
    (headers, rows, lines, boxes)
}
