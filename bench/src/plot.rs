//! results.svg: throughput side by side, and the scaling curves.

use crate::runner::{Results, Run};
use crate::systems::Kind;
use plotters::prelude::*;
use std::path::Path;

const SYSTEMS: [Kind; 6] =
    [Kind::Mosquitto, Kind::Rumqttd, Kind::Rmqtt, Kind::Notary, Kind::NotarySigned, Kind::Sidecar];

fn color(k: Kind) -> RGBColor {
    match k {
        Kind::Mosquitto => RGBColor(0x3b, 0x6e, 0xa5),
        Kind::Rumqttd => RGBColor(0xe0, 0x8a, 0x1e),
        Kind::Rmqtt => RGBColor(0x8e, 0x44, 0xad),
        Kind::Notary => RGBColor(0x2e, 0x9e, 0x4f),
        Kind::NotarySigned => RGBColor(0x9b, 0x4d, 0xca),
        Kind::Sidecar => RGBColor(0xc0, 0x39, 0x2b),
    }
}

/// What a run achieved: notarized msg/s for the notary (none when it did
/// not notarize everything: a gap), delivered for the plain brokers.
fn rate(r: &Run) -> Option<f64> {
    if r.system.notarizes() {
        r.notarized_per_s
    } else {
        Some(r.delivered_per_s)
    }
}

/// 140000 -> "140k".
fn thousands(v: &f64) -> String {
    if *v >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

/// The legend box, the same on every panel.
fn legend<'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
) -> anyhow::Result<()> {
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.9)).draw().map_err(fail)
}

fn fail(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

pub fn draw(r: &Results, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1280, 960)).into_drawing_area();
    root.fill(&WHITE).map_err(fail)?;
    let panels = root.split_evenly((2, 2));
    throughput(r, &panels[0])?;
    let scaling = |pick: &dyn Fn(&Run) -> bool, x: &dyn Fn(&Run) -> f64| -> Vec<(Kind, Vec<(f64, f64)>)> {
        SYSTEMS
            .iter()
            .map(|&k| {
                let mut v: Vec<(f64, f64)> = r
                    .scaling
                    .iter()
                    .filter(|s| s.system == k && pick(s))
                    .filter_map(|s| Some((x(s), rate(s)?)))
                    .collect();
                v.sort_by(|a, b| a.0.total_cmp(&b.0));
                v.dedup_by(|a, b| a.0 == b.0);
                (k, v)
            })
            .filter(|(_, v)| !v.is_empty())
            .collect()
    };
    let by_publishers = scaling(&|s| s.payload == r.plan.payload, &|s| s.publishers as f64);
    let by_payload = scaling(&|s| s.publishers == r.plan.publishers, &|s| s.payload as f64);
    curves(&panels[1], "msg/s vs publishing connections (QoS 0)", "connections", &by_publishers)?;
    curves(&panels[2], "msg/s vs payload size (QoS 0)", "payload bytes", &by_payload)?;
    store(r, &panels[3])?;
    root.present().map_err(fail)?;
    Ok(())
}

fn throughput(r: &Results, area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> anyhow::Result<()> {
    let max = r.runs.iter().filter_map(rate).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("Throughput (notarized for mqtt-notary, delivered for plain brokers)", ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..SYSTEMS.len() as f64, 0.0..max)
        .map_err(fail)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(SYSTEMS.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < SYSTEMS.len() {
                SYSTEMS[i].label().to_owned()
            } else {
                String::new()
            }
        })
        .y_desc("msg/s")
        .y_label_formatter(&thousands)
        .draw()
        .map_err(fail)?;
    for (q, shade, offset) in [(0u8, 1.0, 0.1), (1u8, 0.5, 0.5)] {
        let bars: Vec<_> = r
            .runs
            .iter()
            .filter(|x| x.qos == q)
            .filter_map(|x| {
                let i = SYSTEMS.iter().position(|k| *k == x.system)? as f64;
                let c = color(x.system).mix(shade);
                Some(Rectangle::new([(i + offset, 0.0), (i + offset + 0.38, rate(x)?)], c.filled()))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(fail)?
            .label(if q == 0 { "QoS 0 (solid)" } else { "QoS 1 (light)" })
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], BLACK.mix(shade).filled()));
    }
    legend(&mut chart)
}

fn curves(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    series: &[(Kind, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let points = series.iter().flat_map(|(_, v)| v.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, 0.0f64, 1.0f64);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (1.0, 10.0);
    }
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((x0 * 0.8..x1 * 1.25).log_scale(), 0.0..y1 * 1.1)
        .map_err(fail)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("msg/s")
        .y_label_formatter(&thousands)
        .draw()
        .map_err(fail)?;
    for (kind, pts) in series {
        let c = color(*kind);
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(fail)?
            .label(kind.label())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(fail)?;
    }
    legend(&mut chart)
}

fn store(r: &Results, area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> anyhow::Result<()> {
    let rss: Vec<(f64, f64)> = r.store.iter().map(|p| (p.stored as f64 / 1e6, p.rss_mib)).collect();
    let p99: Vec<(f64, f64)> = r.store.iter().map(|p| (p.stored as f64 / 1e6, p.proof_http.p99_ms)).collect();
    let x1 = rss.iter().map(|p| p.0).fold(0.1, f64::max) * 1.05;
    let y1 = rss.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2;
    let l1 = p99.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption("mqtt-notary as the store grows", ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.0..x1, 0.0..y1)
        .map_err(fail)?
        .set_secondary_coord(0.0..x1, 0.0..l1);
    chart
        .configure_mesh()
        .x_desc("messages stored (millions)")
        .y_desc("RSS MiB")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(fail)?;
    chart
        .configure_secondary_axes()
        .y_desc("proof request p99 ms (HTTP)")
        .y_label_formatter(&|y| format!("{y:.1}"))
        .draw()
        .map_err(fail)?;
    let green = color(Kind::Notary);
    chart
        .draw_series(LineSeries::new(rss.clone(), green.stroke_width(2)))
        .map_err(fail)?
        .label("resident memory")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], green.stroke_width(2)));
    chart.draw_series(rss.iter().map(|&p| Circle::new(p, 3, green.filled()))).map_err(fail)?;
    chart
        .draw_secondary_series(LineSeries::new(p99, BLACK.stroke_width(1)))
        .map_err(fail)?
        .label("proof request p99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.stroke_width(1)));
    legend(&mut chart)
}
