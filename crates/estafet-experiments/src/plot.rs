//! Line plots written as PNG and SVG (plotters), with the font shipped in `assets/` (DejaVu Sans
//! Mono, Bitstream Vera licence beside it) so that text renders on a machine with no fonts.

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// One labelled line.
#[derive(Clone)]
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A dashed horizontal reference line (a baseline, a threshold).
#[derive(Clone)]
pub struct Reference {
    pub label: String,
    pub y: f64,
}

pub struct Figure {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub curves: Vec<Curve>,
    pub references: Vec<Reference>,
}

const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| ())
            .expect("the shipped font parses");
    });
}

/// A tick label: powers of ten on a log axis, short decimals on a linear one.
fn tick(v: f64, log: bool) -> String {
    if log || (v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-2)) {
        format!("{v:.0e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

impl Figure {
    /// Writes `STEM.png` and `STEM.svg`, each atomically (temporary file, then rename).
    pub fn save(&self, stem: &Path) -> Result<()> {
        register_font();
        let png = stem.with_extension("png");
        let tmp = stem.with_extension("tmp.png");
        {
            let root = BitMapBackend::new(&tmp, (900, 560)).into_drawing_area();
            self.draw(&root)?;
            root.present()
                .with_context(|| format!("cannot write {}", tmp.display()))?;
        }
        std::fs::rename(&tmp, &png).with_context(|| format!("cannot write {}", png.display()))?;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
            self.draw(&root)?;
            root.present().context("cannot render the SVG")?;
        }
        crate::run_dir::write_atomic(&stem.with_extension("svg"), svg.as_bytes())
    }

    fn bounds(&self) -> ((f64, f64), (f64, f64)) {
        let points = self.curves.iter().flat_map(|c| c.points.iter());
        let finite = |v: f64, log: bool| v.is_finite() && (!log || v > 0.0);
        let xs: Vec<f64> = points
            .clone()
            .map(|p| p.0)
            .filter(|&x| finite(x, self.log_x))
            .collect();
        let ys: Vec<f64> = points
            .map(|p| p.1)
            .chain(self.references.iter().map(|r| r.y))
            .filter(|&y| finite(y, self.log_y))
            .collect();
        let span = |v: &[f64], log: bool| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            match (lo.is_finite(), log) {
                (false, _) => (1.0, 10.0),
                (true, true) => (lo / 1.5, hi * 1.5),
                (true, false) if hi > lo => (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)),
                (true, false) => (lo - 1.0, hi + 1.0),
            }
        };
        (span(&xs, self.log_x), span(&ys, self.log_y))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, plotters::coord::Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let ((x0, x1), (y0, y1)) = self.bounds();
        let mut builder = ChartBuilder::on(root);
        builder
            .caption(&self.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(85);
        // plotters types a chart by its axes, so each combination of scales is its own branch.
        macro_rules! finish {
            ($chart:expr) => {{
                let mut chart = $chart.map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let x_fmt = |v: &f64| tick(*v, self.log_x);
                let y_fmt = |v: &f64| tick(*v, self.log_y);
                chart
                    .configure_mesh()
                    .x_label_formatter(&x_fmt)
                    .y_label_formatter(&y_fmt)
                    .x_desc(&self.x_label)
                    .y_desc(&self.y_label)
                    .label_style(("sans-serif", 13))
                    .draw()
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                for (i, curve) in self.curves.iter().enumerate() {
                    let color = Palette99::pick(i).to_rgba();
                    chart
                        .draw_series(LineSeries::new(
                            curve
                                .points
                                .iter()
                                .copied()
                                .filter(|p| p.0.is_finite() && p.1.is_finite()),
                            color.stroke_width(2),
                        ))
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?
                        .label(&curve.label)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                        });
                }
                for r in &self.references {
                    let style = BLACK.mix(0.6).stroke_width(1);
                    let dashes: Vec<(f64, f64)> = (0..60)
                        .filter(|i| i % 2 == 0)
                        .flat_map(|i| {
                            let at = |k: f64| {
                                if self.log_x {
                                    x0 * (x1 / x0).powf(k / 60.0)
                                } else {
                                    x0 + (x1 - x0) * k / 60.0
                                }
                            };
                            [(at(i as f64), r.y), (at(i as f64 + 1.0), r.y)]
                        })
                        .collect();
                    for pair in dashes.chunks(2) {
                        chart
                            .draw_series(LineSeries::new(pair.to_vec(), style))
                            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    }
                    chart
                        .draw_series(std::iter::once(Text::new(
                            r.label.clone(),
                            (x0, r.y),
                            ("sans-serif", 12).into_font(),
                        )))
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 13))
                    .draw()
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            }};
        }
        match (self.log_x, self.log_y) {
            (false, false) => finish!(builder.build_cartesian_2d(x0..x1, y0..y1)),
            (false, true) => finish!(builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale())),
            (true, false) => finish!(builder.build_cartesian_2d((x0..x1).log_scale(), y0..y1)),
            (true, true) => {
                finish!(builder.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale()))
            }
        }
        Ok(())
    }
}
