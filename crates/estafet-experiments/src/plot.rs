//! Figures written as PNG and SVG (plotters), with the font shipped in `assets/` (DejaVu Sans
//! Mono, Bitstream Vera licence beside it) so that text renders on a machine with no fonts.
//!
//! Three kinds, each drawn for a reader who has to tell many models apart in print:
//! - [`Figure`]: lines with a marker at every measured point and an optional band (the 95%
//!   interval over seeds); series differ in colour (eight of the Okabe–Ito colour-blind-safe
//!   palette), marker (five shapes) and dash (solid, dashed, dotted), so that 40 series stay
//!   distinct, and any two that share a colour differ in marker and dash. A log length axis is
//!   in powers of two, labelled with the lengths themselves (64, 128, 256).
//! - [`Heatmap`]: a value per row and column (model × evaluation length), coloured from the
//!   baseline to the solved level and printed in each cell.
//! - [`DotChart`]: one dot per row with its interval as a bar, and the reference levels drawn.

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

/// One labelled line.
#[derive(Clone)]
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// `(x, low, high)`: a shaded band around the line (the 95% interval over seeds); empty
    /// for none.
    pub band: Vec<(f64, f64, f64)>,
}

impl Curve {
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            points,
            band: Vec::new(),
        }
    }
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
    /// A length axis: log scale in powers of two, labelled with the lengths.
    pub log_x: bool,
    pub log_y: bool,
    pub curves: Vec<Curve>,
    pub references: Vec<Reference>,
}

/// Values on a grid: rows (models) × columns (lengths).
pub struct Heatmap {
    pub title: String,
    pub x_label: String,
    pub columns: Vec<String>,
    pub rows: Vec<String>,
    /// `values[row][column]`; `None` is drawn as an empty cell.
    pub values: Vec<Vec<Option<f64>>>,
    /// The values drawn at the two ends of the colour scale (baseline and solved level).
    pub low: f64,
    pub high: f64,
}

/// One row of a [`DotChart`]: a mean and its interval.
pub struct Dot {
    pub label: String,
    pub mean: f64,
    pub low: f64,
    pub high: f64,
}

/// A dot per row with its interval, and vertical reference lines.
pub struct DotChart {
    pub title: String,
    pub x_label: String,
    pub dots: Vec<Dot>,
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

/// Okabe & Ito (2008), the colour-blind-safe qualitative palette, black last.
const COLOURS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),   // blue
    RGBColor(213, 94, 0),    // vermillion
    RGBColor(0, 158, 115),   // bluish green
    RGBColor(204, 121, 167), // reddish purple
    RGBColor(230, 159, 0),   // orange
    RGBColor(86, 180, 233),  // sky blue
    RGBColor(150, 130, 0),   // a darker yellow, readable on white
    RGBColor(0, 0, 0),       // black
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Marker {
    Circle,
    Square,
    Triangle,
    Cross,
    Diamond,
}

const MARKERS: [Marker; 5] = [
    Marker::Circle,
    Marker::Square,
    Marker::Triangle,
    Marker::Cross,
    Marker::Diamond,
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dash {
    Solid,
    Dashed,
    Dotted,
}

/// Series `i`'s colour, marker and dash: colours cycle every 8, markers every 5 (coprime, so
/// the first 40 pairs differ), dashes change with each pass through the colours.
fn style(i: usize) -> (RGBColor, Marker, Dash) {
    let dash = [Dash::Solid, Dash::Dashed, Dash::Dotted][(i / COLOURS.len()) % 3];
    (COLOURS[i % COLOURS.len()], MARKERS[i % MARKERS.len()], dash)
}

/// The marker at a backend point.
fn marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    at: (i32, i32),
    kind: Marker,
    colour: RGBColor,
) -> Result<()> {
    let (x, y) = at;
    let r = 4;
    let filled = colour.filled();
    let line = colour.stroke_width(2);
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e:?}");
    match kind {
        Marker::Circle => area.draw(&Circle::new(at, r, filled)).map_err(e),
        Marker::Square => area
            .draw(&Rectangle::new([(x - r, y - r), (x + r, y + r)], filled))
            .map_err(e),
        Marker::Triangle => area
            .draw(&Polygon::new(
                vec![(x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)],
                filled,
            ))
            .map_err(e),
        Marker::Cross => {
            area.draw(&PathElement::new(
                vec![(x - r, y - r), (x + r, y + r)],
                line,
            ))
            .map_err(e)?;
            area.draw(&PathElement::new(
                vec![(x - r, y + r), (x + r, y - r)],
                line,
            ))
            .map_err(e)
        }
        Marker::Diamond => area
            .draw(&Polygon::new(
                vec![
                    (x, y - r - 1),
                    (x + r + 1, y),
                    (x, y + r + 1),
                    (x - r - 1, y),
                ],
                filled,
            ))
            .map_err(e),
    }
}

/// A polyline between backend points, solid, dashed or dotted.
fn polyline<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    points: &[(i32, i32)],
    dash: Dash,
    style: ShapeStyle,
) -> Result<()> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e:?}");
    match dash {
        Dash::Solid => area
            .draw(&PathElement::new(points.to_vec(), style))
            .map_err(e),
        Dash::Dashed => area
            .draw(&DashedPathElement::new(points.iter().copied(), 9, 5, style))
            .map_err(e),
        Dash::Dotted => area
            .draw(&DashedPathElement::new(points.iter().copied(), 2, 4, style))
            .map_err(e),
    }
}

/// A tick label on a linear or log-10 axis: short decimals, powers of ten when large or small.
fn tick(v: f64, log: bool) -> String {
    if log || (v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-2)) {
        format!("{v:.0e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A length axis tick: the length `2^v` itself, written out (64, 1024, 16384); `1M` from 2^20.
fn length_tick(v: f64) -> String {
    let n = 2f64.powf(v).round();
    if n >= 1_048_576.0 && (n / 1_048_576.0).fract() == 0.0 {
        format!("{}M", n / 1_048_576.0)
    } else {
        format!("{n:.0}")
    }
}

/// Writes `STEM.png` and `STEM.svg` of `draw` at `size`, each atomically.
fn save(
    stem: &Path,
    size: (u32, u32),
    draw: impl Fn(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
    draw_svg: impl Fn(&DrawingArea<SVGBackend, Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    let png = stem.with_extension("png");
    let tmp = stem.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        draw(&root)?;
        root.present()
            .with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &png).with_context(|| format!("cannot write {}", png.display()))?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        draw_svg(&root)?;
        root.present().context("cannot render the SVG")?;
    }
    crate::run_dir::write_atomic(&stem.with_extension("svg"), svg.as_bytes())
}

impl Figure {
    /// Writes `STEM.png` and `STEM.svg`, each atomically (temporary file, then rename).
    pub fn save(&self, stem: &Path) -> Result<()> {
        // Room for the legend beside the plot, one line per series.
        let height = 560.max(90 + 18 * self.curves.len() as u32);
        save(stem, (1000, height), |a| self.draw(a), |a| self.draw(a))
    }

    /// `x` as drawn: `log2 x` on a length axis.
    fn x(&self, x: f64) -> f64 {
        if self.log_x { x.log2() } else { x }
    }

    fn bounds(&self) -> ((f64, f64), (f64, f64)) {
        let finite = |v: f64, log: bool| v.is_finite() && (!log || v > 0.0);
        let xs: Vec<f64> = self
            .curves
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.0))
            .filter(|&x| finite(x, self.log_x))
            .map(|x| self.x(x))
            .collect();
        let ys: Vec<f64> = self
            .curves
            .iter()
            // The bands do not widen the frame: a 95% interval over three seeds can reach far
            // past the metric's range, so it is drawn cut at the frame instead.
            .flat_map(|c| c.points.iter().map(|p| p.1))
            .chain(self.references.iter().map(|r| r.y))
            .filter(|&y| finite(y, self.log_y))
            .collect();
        let lo_hi = |v: &[f64]| {
            (
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            )
        };
        let x = match lo_hi(&xs) {
            (lo, _) if !lo.is_finite() => (0.0, 1.0),
            (lo, hi) if self.log_x => (lo - 0.25, hi + 0.25),
            (lo, hi) if hi > lo => (lo - 0.03 * (hi - lo), hi + 0.03 * (hi - lo)),
            (lo, hi) => (lo - 1.0, hi + 1.0),
        };
        let y = match lo_hi(&ys) {
            (lo, _) if !lo.is_finite() => (1.0, 10.0),
            (lo, hi) if self.log_y => (lo / 1.5, hi * 1.5),
            (lo, hi) if hi > lo => (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)),
            (lo, hi) => (lo - 1.0, hi + 1.0),
        };
        (x, y)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e:?}");
        let (width, _) = root.dim_in_pixel();
        // The legend beside the plot, as wide as its longest label.
        let legend_width = self
            .curves
            .iter()
            .map(|c| 64 + text_width(&c.label))
            .max()
            .unwrap_or(0)
            .clamp(120, 480);
        let (plot_area, legend_area) = root.split_horizontally(width as i32 - legend_width);
        let ((x0, x1), (y0, y1)) = self.bounds();
        let mut builder = ChartBuilder::on(&plot_area);
        builder
            .caption(&self.title, ("sans-serif", 19))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80);
        // The exponents of 2 inside a length axis: its ticks.
        let octaves: Vec<f64> = if self.log_x {
            (x0.ceil() as i64..=x1.floor() as i64)
                .map(|k| k as f64)
                .collect()
        } else {
            Vec::new()
        };
        // plotters types a chart by its axes, so each scale of y is its own branch.
        macro_rules! finish {
            ($chart:expr) => {{
                let mut chart = $chart.map_err(e)?;
                let x_fmt = |v: &f64| tick(*v, false);
                let y_fmt = |v: &f64| tick(*v, self.log_y);
                chart
                    .configure_mesh()
                    .x_labels(if self.log_x { 0 } else { 10 })
                    .x_label_formatter(&x_fmt)
                    .y_label_formatter(&y_fmt)
                    .x_desc(&self.x_label)
                    .y_desc(&self.y_label)
                    .label_style(("sans-serif", 13))
                    .light_line_style(WHITE.mix(0.0))
                    .bold_line_style(BLACK.mix(0.08))
                    .draw()
                    .map_err(e)?;
                // Everything below is drawn in pixels on `root`, whose origin is the backend's.
                let to_px = |x: f64, y: f64| chart.backend_coord(&(self.x(x), y));
                // A length axis: a tick, a faint grid line and the length at each power of two.
                for &k in &octaves {
                    let (bottom, top) =
                        (chart.backend_coord(&(k, y0)), chart.backend_coord(&(k, y1)));
                    root.draw(&PathElement::new(vec![bottom, top], BLACK.mix(0.08)))
                        .map_err(e)?;
                    root.draw(&PathElement::new(
                        vec![bottom, (bottom.0, bottom.1 + 5)],
                        BLACK.stroke_width(1),
                    ))
                    .map_err(e)?;
                    let label = length_tick(k);
                    root.draw(&Text::new(
                        label.clone(),
                        (bottom.0 - 4 * label.len() as i32, bottom.1 + 8),
                        ("sans-serif", 13).into_font(),
                    ))
                    .map_err(e)?;
                }
                for r in &self.references {
                    let left = chart.backend_coord(&(x0, r.y));
                    let right = chart.backend_coord(&(x1, r.y));
                    polyline(
                        root,
                        &[left, right],
                        Dash::Dashed,
                        BLACK.mix(0.55).stroke_width(1),
                    )?;
                    root.draw(&Text::new(
                        r.label.clone(),
                        (left.0 + 4, left.1 - 15),
                        ("sans-serif", 12).into_font().color(&BLACK.mix(0.7)),
                    ))
                    .map_err(e)?;
                }
                for (i, curve) in self.curves.iter().enumerate() {
                    let (colour, _, _) = style(i);
                    let band: Vec<(f64, f64, f64)> = curve
                        .band
                        .iter()
                        .copied()
                        .filter(|b| b.0.is_finite() && b.1.is_finite() && b.2.is_finite())
                        .filter(|b| !self.log_y || b.1 > 0.0)
                        .collect();
                    if band.len() >= 2 {
                        let cut = |y: f64| y.clamp(y0, y1);
                        let outline: Vec<(i32, i32)> = band
                            .iter()
                            .map(|b| to_px(b.0, cut(b.2)))
                            .chain(band.iter().rev().map(|b| to_px(b.0, cut(b.1))))
                            .collect();
                        root.draw(&Polygon::new(outline, colour.mix(0.13).filled()))
                            .map_err(e)?;
                    }
                }
                for (i, curve) in self.curves.iter().enumerate() {
                    let (colour, kind, dash) = style(i);
                    let points: Vec<(i32, i32)> = curve
                        .points
                        .iter()
                        .filter(|p| p.0.is_finite() && p.1.is_finite())
                        .filter(|p| (!self.log_x || p.0 > 0.0) && (!self.log_y || p.1 > 0.0))
                        .map(|p| to_px(p.0, p.1))
                        .collect();
                    polyline(root, &points, dash, colour.stroke_width(2))?;
                    // Markers on every measured point, unless they would merge into a line.
                    if points.len() <= 40 {
                        for &p in &points {
                            marker(root, p, kind, colour)?;
                        }
                    }
                }
            }};
        }
        if self.log_y {
            finish!(builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale()))
        } else {
            finish!(builder.build_cartesian_2d(x0..x1, y0..y1))
        }
        self.legend(&legend_area)
    }

    /// The legend beside the plot: each series' line, dash and marker, and its label.
    fn legend<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e:?}");
        let top = 50;
        for (i, curve) in self.curves.iter().enumerate() {
            let (colour, kind, dash) = style(i);
            let y = top + 18 * i as i32;
            polyline(area, &[(8, y), (44, y)], dash, colour.stroke_width(2))?;
            marker(area, (26, y), kind, colour)?;
            area.draw(&Text::new(
                curve.label.clone(),
                (52, y - 7),
                ("sans-serif", 13).into_font(),
            ))
            .map_err(e)?;
        }
        Ok(())
    }
}

/// The viridis colour map at `t` in [0, 1] (five stops, linear between them): dark for the
/// baseline, bright for the solved level, readable in grey and by colour-blind readers.
fn viridis(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Pixels a label of `text` takes in the shipped monospace font at size 13.
fn text_width(text: &str) -> i32 {
    8 * text.chars().count() as i32
}

impl Heatmap {
    const CELL_HEIGHT: i32 = 26;

    /// Writes `STEM.png` and `STEM.svg`.
    pub fn save(&self, stem: &Path) -> Result<()> {
        let height = 130 + Self::CELL_HEIGHT as u32 * self.rows.len() as u32;
        save(stem, (1000, height), |a| self.draw(a), |a| self.draw(a))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e:?}");
        let (width, _) = root.dim_in_pixel();
        let font = ("sans-serif", 13).into_font();
        root.draw(&Text::new(
            self.title.clone(),
            (12, 10),
            ("sans-serif", 19).into_font(),
        ))
        .map_err(e)?;
        let left = 20 + self.rows.iter().map(|r| text_width(r)).max().unwrap_or(0);
        let top = 50;
        let scale_width = 150;
        let cell_w =
            ((width as i32 - left - scale_width - 20) / self.columns.len().max(1) as i32).max(30);
        let h = Self::CELL_HEIGHT;
        let t = |v: f64| {
            if self.high == self.low {
                1.0
            } else {
                (v - self.low) / (self.high - self.low)
            }
        };
        for (r, row) in self.rows.iter().enumerate() {
            let y = top + h * r as i32;
            root.draw(&Text::new(
                row.clone(),
                (left - 10 - text_width(row), y + 6),
                font.clone(),
            ))
            .map_err(e)?;
            for (c, value) in self.values[r].iter().enumerate() {
                let x = left + cell_w * c as i32;
                let corners = [(x, y), (x + cell_w - 1, y + h - 1)];
                match value {
                    Some(v) if v.is_finite() => {
                        let colour = viridis(t(*v));
                        root.draw(&Rectangle::new(corners, colour.filled()))
                            .map_err(e)?;
                        let text = format!("{v:.2}");
                        let ink = if t(*v) < 0.6 { WHITE } else { BLACK };
                        root.draw(&Text::new(
                            text.clone(),
                            (x + (cell_w - text_width(&text)) / 2, y + 6),
                            font.clone().color(&ink),
                        ))
                        .map_err(e)?;
                    }
                    _ => {
                        root.draw(&Rectangle::new(corners, BLACK.mix(0.05).filled()))
                            .map_err(e)?;
                    }
                }
            }
        }
        let bottom = top + h * self.rows.len() as i32;
        for (c, column) in self.columns.iter().enumerate() {
            let x = left + cell_w * c as i32 + (cell_w - text_width(column)) / 2;
            root.draw(&Text::new(column.clone(), (x, bottom + 8), font.clone()))
                .map_err(e)?;
        }
        let grid_w = cell_w * self.columns.len() as i32;
        root.draw(&Text::new(
            self.x_label.clone(),
            (left + (grid_w - text_width(&self.x_label)) / 2, bottom + 32),
            font.clone(),
        ))
        .map_err(e)?;
        // The colour scale: the baseline at the bottom, the solved level at the top.
        let sx = left + grid_w + 30;
        let span = (bottom - top).max(40);
        for k in 0..span {
            let colour = viridis(1.0 - k as f64 / span as f64);
            root.draw(&Rectangle::new(
                [(sx, top + k), (sx + 16, top + k + 1)],
                colour.filled(),
            ))
            .map_err(e)?;
        }
        for (label, y) in [
            (format!("{:.2} solved", self.high), top),
            (format!("{:.2} baseline", self.low), top + span - 14),
        ] {
            root.draw(&Text::new(label, (sx + 22, y), font.clone()))
                .map_err(e)?;
        }
        Ok(())
    }
}

impl DotChart {
    const ROW_HEIGHT: u32 = 26;

    /// Writes `STEM.png` and `STEM.svg`.
    pub fn save(&self, stem: &Path) -> Result<()> {
        let height = 120 + Self::ROW_HEIGHT * self.dots.len() as u32;
        save(stem, (1000, height), |a| self.draw(a), |a| self.draw(a))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e:?}");
        let values: Vec<f64> = self
            .dots
            .iter()
            .flat_map(|d| [d.low, d.high, d.mean])
            .chain(self.references.iter().map(|r| r.y))
            .filter(|v| v.is_finite())
            .collect();
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (x0, x1) = match (lo.is_finite(), hi > lo) {
            (false, _) => (0.0, 1.0),
            (true, true) => (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)),
            (true, false) => (lo - 1.0, hi + 1.0),
        };
        let n = self.dots.len().max(1) as f64;
        let label_area = 20
            + self
                .dots
                .iter()
                .map(|d| text_width(&d.label))
                .max()
                .unwrap_or(0);
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 19))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(label_area as u32)
            .build_cartesian_2d(x0..x1, -0.5..n - 0.5)
            .map_err(e)?;
        let x_fmt = |v: &f64| tick(*v, false);
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_label_formatter(&x_fmt)
            .x_desc(&self.x_label)
            .label_style(("sans-serif", 13))
            .light_line_style(WHITE.mix(0.0))
            .bold_line_style(BLACK.mix(0.08))
            .draw()
            .map_err(e)?;
        // The first row at the top.
        let row_y = |i: usize| n - 1.0 - i as f64;
        for r in &self.references {
            let points = [
                chart.backend_coord(&(r.y, -0.5)),
                chart.backend_coord(&(r.y, n - 0.5)),
            ];
            polyline(root, &points, Dash::Dashed, BLACK.mix(0.55).stroke_width(1))?;
            root.draw(&Text::new(
                r.label.clone(),
                (points[1].0 + 3, points[1].1 + 2),
                ("sans-serif", 12).into_font().color(&BLACK.mix(0.7)),
            ))
            .map_err(e)?;
        }
        for (i, dot) in self.dots.iter().enumerate() {
            let (colour, kind, _) = style(i);
            let y = row_y(i);
            let at = chart.backend_coord(&(dot.mean, y));
            root.draw(&Text::new(
                dot.label.clone(),
                (
                    at.0.min(chart.backend_coord(&(x0, y)).0) - 10 - text_width(&dot.label),
                    at.1 - 7,
                ),
                ("sans-serif", 13).into_font(),
            ))
            .map_err(e)?;
            if dot.high > dot.low {
                let (a, b) = (
                    chart.backend_coord(&(dot.low, y)),
                    chart.backend_coord(&(dot.high, y)),
                );
                root.draw(&PathElement::new(vec![a, b], colour.stroke_width(2)))
                    .map_err(e)?;
                for end in [a, b] {
                    root.draw(&PathElement::new(
                        vec![(end.0, end.1 - 5), (end.0, end.1 + 5)],
                        colour.stroke_width(2),
                    ))
                    .map_err(e)?;
                }
            }
            marker(root, at, kind, colour)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 40 series differ in colour or marker, and any two of the first 24 that share
    /// a colour also differ in dash: what lets a reader tell 16+ models apart.
    #[test]
    fn forty_series_stay_distinct() {
        for i in 0..40 {
            for j in i + 1..40 {
                let (a, b) = (style(i), style(j));
                assert!(a.0 != b.0 || a.1 != b.1, "{i} and {j}");
                if j < 24 && a.0 == b.0 {
                    assert_ne!(a.2, b.2, "{i} and {j} share colour and dash");
                }
            }
        }
    }

    #[test]
    fn length_ticks_are_the_lengths() {
        assert_eq!(length_tick(6.0), "64");
        assert_eq!(length_tick(14.0), "16384");
        assert_eq!(length_tick(20.0), "1M");
    }
}
