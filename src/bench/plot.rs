//! `ember bench boot --plot FILE.svg`: every run of every VMM as a dot per phase, with each
//! VMM's median marked, so distributions (and bimodal ones) show at a glance.

use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;

use super::boot::{BootRun, PHASES};

/// Drawing the plot failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {reason}")]
pub struct PlotError {
    path: String,
    reason: String,
}

/// One colour per VMM, in `--compare` order.
const COLOURS: [RGBColor; 3] = [RGBColor(214, 39, 40), RGBColor(31, 119, 180), GREEN];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Draws `results` (one VMM's runs each, named) into the SVG file `path`.
pub fn plot(path: &Path, results: &[(&str, &[BootRun])]) -> Result<(), PlotError> {
    draw(path, results).map_err(|reason| PlotError {
        path: path.display().to_string(),
        reason,
    })
}

fn draw(path: &Path, results: &[(&str, &[BootRun])]) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let longest = results
        .iter()
        .flat_map(|(_, runs)| runs.iter())
        .flat_map(|run| PHASES.iter().filter_map(|(_, sample)| sample(run)))
        .map(ms)
        .fold(1.0f64, f64::max);
    let rows = PHASES.len() as f64;
    let height = 120 + 90 * u32::try_from(PHASES.len()).unwrap_or(4);
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("ember bench boot: every run, per phase", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(190)
        .build_cartesian_2d(0f64..longest * 1.05, -0.5f64..rows - 0.5)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("milliseconds since spawn")
        .y_labels(PHASES.len())
        .y_label_formatter(&|y| {
            // Rows top to bottom in PHASES order; labels sit on whole numbers.
            let row = rows - 1.0 - y.round();
            PHASES
                .iter()
                .enumerate()
                .find(|(i, _)| *i as f64 == row)
                .map(|(_, (name, _))| (*name).to_owned())
                .unwrap_or_default()
        })
        .disable_y_mesh()
        .draw()
        .map_err(|e| err(&e))?;
    let lanes = results.len().max(1) as f64;
    for (index, (name, runs)) in results.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        // Each VMM gets its own lane inside a phase's row.
        let lane = (index as f64 + 0.5) / lanes * 0.6 - 0.3;
        let mut dots = Vec::new();
        let mut medians = Vec::new();
        for (row, (_, sample)) in PHASES.iter().enumerate() {
            let y = rows - 1.0 - row as f64 - lane;
            let mut values: Vec<f64> = runs.iter().filter_map(sample).map(ms).collect();
            values.sort_by(f64::total_cmp);
            dots.extend(values.iter().map(|&x| (x, y)));
            if let Some(&median) = values.get(values.len() / 2) {
                medians.push((median, y));
            }
        }
        chart
            .draw_series(
                dots.into_iter()
                    .map(|p| Circle::new(p, 3, colour.mix(0.5).filled())),
            )
            .map_err(|e| err(&e))?
            .label(*name)
            .legend(move |(x, y)| Circle::new((x, y), 4, colour.filled()));
        chart
            .draw_series(medians.into_iter().map(|(x, y)| {
                PathElement::new(vec![(x, y - 0.12), (x, y + 0.12)], colour.stroke_width(3))
            }))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ms: u64) -> BootRun {
        BootRun {
            first_serial: Duration::from_millis(ms),
            boot_timer: None,
            marker: Duration::from_millis(ms + 5),
            exit: Duration::from_millis(ms + 10),
            kernel_load: None,
            overhead_kib: None,
            cpu: None,
        }
    }

    #[test]
    fn a_plot_has_every_run_and_both_vmms() {
        let path = std::env::temp_dir().join(format!("ember-plot-{}.svg", std::process::id()));
        let ember = [run(30), run(32), run(40)];
        let qemu = [run(80), run(90)];
        plot(&path, &[("ember", &ember), ("qemu", &qemu)]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        // 5 runs x 3 phases with samples, plus one legend dot per VMM.
        assert_eq!(svg.matches("<circle").count(), 5 * 3 + 2);
        for label in [
            "ember",
            "qemu",
            "spawn-&gt;marker",
            "milliseconds since spawn",
        ] {
            assert!(svg.contains(label), "{label}");
        }
    }
}
