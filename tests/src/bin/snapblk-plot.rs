//! `snapblk-plot`: the latency plots next to the benchmark tables.
//!
//! Reads the results of `scripts/bench-cold.sh` (JSON lines: one run of one side on one
//! workload, with its latency curve `lat_pct_us` as snapblk-bench or fio reported it) and draws,
//! per workload, the latency distribution of every side as an SVG: x is the percentile on a
//! "nines" scale (p50, p90, p99, p99.9, p99.99), y the completion latency on a logarithmic scale.
//! Each side is drawn from its median run (by the workload's metric), the run the tables quote.
//!
//! Threads: none; a plain converter run once after a benchmark.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use plotters::prelude::*;
use serde_json::Value;

/// Draw latency-distribution plots (SVG) from bench-cold.sh results.
#[derive(Parser, Debug)]
#[command(name = "snapblk-plot")]
struct Args {
    /// results.jsonl written by scripts/bench-cold.sh.
    results: PathBuf,
    /// Directory the SVG files go to (created if missing); one `latency-WORKLOAD.svg` each.
    #[arg(long)]
    out_dir: PathBuf,
}

/// One side's curve: (percentile, latency in microseconds), ascending percentile.
type Curve = Vec<(f64, f64)>;

/// A workload's name and the curve of each side that has one.
type Workload = (String, BTreeMap<String, Curve>);

/// Position of percentile `p` on the "nines" axis: 0 at p0, 1 at p90, 2 at p99, 3 at p99.9.
fn nines(p: f64) -> f64 {
    -(1.0 - (p / 100.0).min(0.99999)).log10()
}

/// The run whose metric is the median of the side's successful runs.
fn median_run<'a>(runs: &[&'a Value], metric: &str) -> Option<&'a Value> {
    let mut ok: Vec<&Value> = runs
        .iter()
        .copied()
        .filter(|r| r.get("failed").is_none() && r["errors"].as_u64().unwrap_or(0) == 0)
        .filter(|r| r[metric].as_f64().is_some())
        .collect();
    ok.sort_by(|a, b| {
        let key = |r: &Value| r[metric].as_f64().unwrap_or(0.0);
        key(a).total_cmp(&key(b))
    });
    ok.get(ok.len().checked_sub(1)? / 2).copied()
}

fn curve(run: &Value) -> Curve {
    let mut c: Curve = run["lat_pct_us"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.parse::<f64>().ok()?, v.as_f64()?)))
                .filter(|&(p, us)| p > 0.0 && p < 100.0 && us > 0.0)
                .collect()
        })
        .unwrap_or_default();
    c.sort_by(|a, b| a.0.total_cmp(&b.0));
    c
}

/// The sides' curves per workload, in the order the workloads first appear.
fn load(path: &Path) -> Result<Vec<Workload>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let rows: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect::<Result<_, _>>()?;
    let mut order: Vec<String> = Vec::new();
    for r in &rows {
        if let Some(w) = r["workload"].as_str() {
            if !order.iter().any(|o| o == w) {
                order.push(w.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for w in order {
        let of_w: Vec<&Value> = rows
            .iter()
            .filter(|r| r["workload"] == w.as_str())
            .collect();
        let metric = of_w
            .first()
            .and_then(|r| r["metric"].as_str())
            .unwrap_or("iops")
            .to_string();
        let mut sides: BTreeMap<String, Curve> = BTreeMap::new();
        let names: BTreeSet<&str> = of_w.iter().filter_map(|r| r["side"].as_str()).collect();
        for side in names {
            let runs: Vec<&Value> = of_w.iter().copied().filter(|r| r["side"] == side).collect();
            if let Some(run) = median_run(&runs, &metric) {
                let c = curve(run);
                if c.len() >= 2 {
                    sides.insert(side.to_string(), c);
                }
            }
        }
        out.push((w, sides));
    }
    Ok(out)
}

fn color(side: &str) -> RGBColor {
    match side {
        "snapblk" => RGBColor(200, 30, 30),
        "snapblk-base" => RGBColor(240, 140, 140),
        "device" => RGBColor(20, 20, 20),
        "null-device-latency" => RGBColor(150, 150, 150),
        s if s.contains("io_uring") && s.contains("direct") => RGBColor(30, 80, 200),
        s if s.contains("io_uring") => RGBColor(90, 150, 230),
        s if s.contains("direct") => RGBColor(20, 140, 60),
        _ => RGBColor(120, 190, 120),
    }
}

fn plot(path: &Path, workload: &str, sides: &BTreeMap<String, Curve>) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let all = sides.values().flatten();
    let (mut lo, mut hi) = (f64::MAX, 0f64);
    for &(_, us) in all {
        lo = lo.min(us);
        hi = hi.max(us);
    }
    let x_max = sides
        .values()
        .filter_map(|c| c.last())
        .map(|&(p, _)| nines(p))
        .fold(2.0f64, f64::max);
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{workload}: completion latency by percentile"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, (lo * 0.8..hi * 1.25).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (us, log)")
        // One label per nine: p0, p90, p99, p99.9, p99.99.
        .x_labels(x_max.ceil() as usize + 1)
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            match x.round() as u32 {
                0..=2 => format!("p{p:.0}"),
                3 => format!("p{p:.1}"),
                _ => format!("p{p:.2}"),
            }
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (side, c) in sides {
        let col = color(side);
        chart
            .draw_series(LineSeries::new(
                c.iter().map(|&(p, us)| (nines(p), us)),
                col.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(side.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], col.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn run(args: &Args) -> Result<usize, String> {
    std::fs::create_dir_all(&args.out_dir)
        .map_err(|e| format!("{}: {e}", args.out_dir.display()))?;
    let mut n = 0;
    for (w, sides) in load(&args.results)? {
        if sides.is_empty() {
            continue;
        }
        let name: String = w
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = args.out_dir.join(format!("latency-{name}.svg"));
        plot(&path, &w, &sides)?;
        println!("{}", path.display());
        n += 1;
    }
    Ok(n)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(0) => {
            eprintln!(
                "snapblk-plot: {}: no run with a latency curve",
                args.results.display()
            );
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapblk-plot: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_run_of_each_side_is_plotted_and_failed_runs_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let results = dir.path().join("r.jsonl");
        let row = |side: &str, iops: f64, p50: f64, failed: bool| {
            let mut v = serde_json::json!({
                "workload": "cold-randread-4k-q32", "side": side, "metric": "iops",
                "iops": iops, "errors": 0,
                "lat_pct_us": {"50.000000": p50, "99.000000": p50 * 4.0, "99.900000": p50 * 9.0},
            });
            if failed {
                v["failed"] = Value::Bool(true);
            }
            v.to_string()
        };
        let text = [
            row("snapblk", 10.0, 100.0, false),
            row("snapblk", 30.0, 300.0, false),
            row("snapblk", 20.0, 200.0, false),
            row("qsd-io_uring-direct", 5.0, 50.0, true),
            row("device", 40.0, 40.0, false),
        ]
        .join("\n");
        std::fs::write(&results, text).unwrap();
        let loaded = load(&results).unwrap();
        assert_eq!(loaded.len(), 1);
        let sides = &loaded[0].1;
        assert_eq!(
            sides["snapblk"][0],
            (50.0, 200.0),
            "the median run is drawn"
        );
        assert!(
            !sides.contains_key("qsd-io_uring-direct"),
            "failed runs are not"
        );
        let out = dir.path().join("plots");
        let n = run(&Args {
            results,
            out_dir: out.clone(),
        })
        .unwrap();
        assert_eq!(n, 1);
        let svg = std::fs::read_to_string(out.join("latency-cold-randread-4k-q32.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("snapblk") && svg.contains("device"));
    }

    #[test]
    fn nines_axis_puts_p90_p99_p999_one_apart() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
    }
}
