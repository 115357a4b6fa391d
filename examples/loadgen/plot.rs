//! The plots, as SVG: for a scenario, the upstream's admitted rate against Q, the requests
//! waiting before it and its 429s over time, one line per target; and the latency distribution
//! per class.

use std::path::Path;

use plotters::prelude::*;
use tower_llm_queue_servers::loadgen::{Class, TargetReport};

type Error = Box<dyn std::error::Error>;

/// The colour of a target's line, the same in every plot.
fn colour(target: &str) -> RGBColor {
    match target {
        "direct" => RGBColor(214, 39, 40),
        "tower" => RGBColor(255, 127, 14),
        "ours" => RGBColor(31, 119, 180),
        _ => RGBColor(44, 160, 44),
    }
}

const FONT: &str = "sans-serif";

/// Three panels over scenario time: admitted over the window as a share of Q (with Q), requests
/// waiting before the upstream, and 429s per bin.
pub fn timeline(reports: &[TargetReport], path: &Path) -> Result<(), Error> {
    let Some(first) = reports.first() else {
        return Ok(());
    };
    let root = SVGBackend::new(path, (900, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!("{}: the upstream over time", first.scenario),
        (FONT, 22),
    )?;
    let panels = root.split_evenly((3, 1));
    let end = reports
        .iter()
        .map(|r| r.series.bin_s * r.series.q_share.len() as f64)
        .fold(1.0, f64::max);

    let share_max = reports
        .iter()
        .flat_map(|r| r.series.q_share.iter().copied())
        .fold(1.2, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&panels[0])
        .caption("admitted over the last minute, share of Q", (FONT, 16))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..end, 0.0..share_max)?;
    chart
        .configure_mesh()
        .x_desc("scenario seconds")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, 1.0), (end, 1.0)],
            BLACK.stroke_width(1),
        ))?
        .label("Q")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK));
    for report in reports {
        let c = colour(&report.target);
        let bin = report.series.bin_s;
        let points = report
            .series
            .q_share
            .iter()
            .enumerate()
            .map(|(i, &share)| ((i + 1) as f64 * bin, share));
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))?
            .label(report.target.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    let waiting_max = reports
        .iter()
        .flat_map(|r| r.series.waiting.iter().map(|&(_, n)| n as f64))
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&panels[1])
        .caption("requests waiting before the upstream", (FONT, 16))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..end, 0.0..waiting_max)?;
    chart
        .configure_mesh()
        .x_desc("scenario seconds")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for report in reports {
        let c = colour(&report.target);
        let points = report.series.waiting.iter().map(|&(t, n)| (t, n as f64));
        chart.draw_series(LineSeries::new(points, c.stroke_width(2)))?;
    }

    let throttled_max = reports
        .iter()
        .flat_map(|r| r.series.throttled.iter().map(|&n| n as f64))
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&panels[2])
        .caption("429s from the upstream per 5 s", (FONT, 16))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..end, 0.0..throttled_max)?;
    chart
        .configure_mesh()
        .x_desc("scenario seconds")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for report in reports {
        let c = colour(&report.target);
        let bin = report.series.bin_s;
        let points = report
            .series
            .throttled
            .iter()
            .enumerate()
            .map(|(i, &n)| (i as f64 * bin, n as f64));
        chart.draw_series(LineSeries::new(points, c.stroke_width(2)))?;
    }
    root.present()?;
    Ok(())
}

/// The share of served requests within each latency, one panel per class, one line per target.
pub fn latency(reports: &[TargetReport], path: &Path) -> Result<(), Error> {
    let Some(first) = reports.first() else {
        return Ok(());
    };
    let classes: Vec<Class> = [Class::Interactive, Class::Batch]
        .into_iter()
        .filter(|class| {
            reports
                .iter()
                .any(|r| r.series.latency_s.contains_key(class))
        })
        .collect();
    if classes.is_empty() {
        return Ok(());
    }
    let root = SVGBackend::new(path, (900, 380 * classes.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!("{}: end-to-end latency of served requests", first.scenario),
        (FONT, 22),
    )?;
    let panels = root.split_evenly((classes.len(), 1));
    for (panel, class) in panels.iter().zip(&classes) {
        let end = reports
            .iter()
            .filter_map(|r| r.series.latency_s.get(class)?.last().copied())
            .fold(1.0, f64::max)
            * 1.05;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{} requests", class.as_str()), (FONT, 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..end, 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("scenario seconds")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
            .draw()?;
        for report in reports {
            let Some(latencies) = report.series.latency_s.get(class) else {
                continue;
            };
            let c = colour(&report.target);
            let n = latencies.len() as f64;
            let points = latencies
                .iter()
                .enumerate()
                .map(|(i, &t)| (t, (i + 1) as f64 / n));
            chart
                .draw_series(LineSeries::new(points, c.stroke_width(2)))?
                .label(report.target.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
