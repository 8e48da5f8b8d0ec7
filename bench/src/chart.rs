//! PNG charts of a report: load throughput per loader and model, and the distribution of fan-out
//! delivery latency. Text is drawn with an embedded font, so no system fonts are needed.

use std::{path::Path, sync::Once};

use anyhow::anyhow;
use plotters::prelude::*;

use crate::report::{LOADERS, Report};

const FONT: &str = "sans-serif";

fn register_font() -> anyhow::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| anyhow!("the embedded font is not a font"));
    });
    result
}

/// Writes `throughput.png` and `fanout.png` into `out`.
pub fn write(out: &Path, report: &Report) -> anyhow::Result<()> {
    register_font()?;
    throughput(&out.join("throughput.png"), report)?;
    fanout(&out.join("fanout.png"), report)?;
    Ok(())
}

/// Horizontal bars: GB/s of each loader, one group per model.
fn throughput(path: &Path, report: &Report) -> anyhow::Result<()> {
    let models: Vec<&str> = report.models.iter().map(|m| m.id.as_str()).collect();
    let rows: Vec<(String, f64, usize)> = LOADERS
        .iter()
        .flat_map(|loader| {
            models.iter().enumerate().filter_map(move |(mi, model)| {
                report
                    .loaders
                    .iter()
                    .find(|r| r.loader == *loader && r.model == *model)
                    .map(|r| (format!("{loader} ({model})"), r.gb_per_s, mi))
            })
        })
        .collect();
    bars(path, "Load throughput, warm page cache (GB/s, higher is better)", &rows)
}

/// Horizontal bars of GB/s, labelled, coloured by the group each row names.
pub fn bars(path: &Path, caption: &str, rows: &[(String, f64, usize)]) -> anyhow::Result<()> {
    register_font()?;
    let max = rows.iter().map(|r| r.1).fold(0.0, f64::max).max(0.1) * 1.15;
    // Room for the longest label (about 8 px a character at this size).
    let label_px = rows.iter().map(|r| r.0.chars().count() as u32 * 8 + 16).max().unwrap_or(0).max(330);
    let root = BitMapBackend::new(path, (770 + label_px, 60 + 34 * rows.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, (FONT, 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(label_px)
        .build_cartesian_2d(0.0..max, (0..rows.len()).into_segmented())
        .map_err(draw)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("GB/s")
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => rows.get(*i).map_or(String::new(), |r| r.0.clone()),
            _ => String::new(),
        })
        .y_labels(rows.len())
        .label_style((FONT, 14))
        .draw()
        .map_err(draw)?;
    let colours = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(148, 103, 189)];
    chart
        .draw_series(rows.iter().enumerate().map(|(i, (_, gbps, model))| {
            let colour = colours[model % colours.len()];
            let mut bar =
                Rectangle::new([(0.0, SegmentValue::Exact(i)), (*gbps, SegmentValue::Exact(i + 1))], colour.filled());
            bar.set_margin(4, 4, 0, 0);
            bar
        }))
        .map_err(draw)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, (_, gbps, _))| {
            Text::new(format!("{gbps:.2}"), (*gbps + max * 0.01, SegmentValue::CenterOf(i)), (FONT, 13))
        }))
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

/// A histogram of fan-out delivery latency, with the p50 and p99 marked.
fn fanout(path: &Path, report: &Report) -> anyhow::Result<()> {
    let latencies = &report.fanout.latencies_ms;
    let top = report.fanout.max_ms.max(0.1);
    let bins = 60usize;
    let width = top / bins as f64;
    let mut counts = vec![0u32; bins];
    for &l in latencies {
        let bin = ((l.max(0.0) / width) as usize).min(bins - 1);
        counts[bin] += 1;
    }
    let highest = counts.iter().copied().max().unwrap_or(1).max(1);
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let caption = format!(
        "Fan-out delivery latency: {} watchers × {} loads, {} samples (p50 {:.2} ms, p99 {:.2} ms)",
        report.fanout.watchers, report.fanout.loads, report.fanout.samples, report.fanout.p50_ms, report.fanout.p99_ms
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..top, 0u32..highest + highest / 10 + 1)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("emit → receipt (ms)")
        .y_desc("messages")
        .label_style((FONT, 14))
        .draw()
        .map_err(draw)?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let x = i as f64 * width;
            Rectangle::new([(x, 0), (x + width, c)], RGBColor(31, 119, 180).filled())
        }))
        .map_err(draw)?;
    for (p, colour) in [(report.fanout.p50_ms, GREEN), (report.fanout.p99_ms, RED)] {
        chart.draw_series(LineSeries::new([(p, 0), (p, highest)], colour.stroke_width(2))).map_err(draw)?;
    }
    root.present().map_err(draw)?;
    Ok(())
}

fn draw<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}
