//! Line charts as hand-written SVG: a log-scale x axis (numbers of services
//! or policies), a linear or log y axis, one line per configuration, the
//! range over runs as a band of error bars. No dependency, and small files
//! that render on GitHub.

use std::fmt::Write as _;

/// One point: x, median, and the range over runs.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Point {
    pub fn new(x: f64, y: f64) -> Point {
        Point { x, y, lo: y, hi: y }
    }
}

pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
    /// Dashed (for reference lines such as the direct baseline).
    pub dashed: bool,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_y: bool,
    pub series: Vec<Series>,
}

const COLORS: [&str; 7] = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#666666"];
const W: f64 = 760.0;
const H: f64 = 420.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 56.0;

impl Chart {
    pub fn render(&self) -> String {
        let points: Vec<&Point> =
            self.series.iter().flat_map(|s| &s.points).filter(|p| p.y.is_finite() && p.y > 0.0).collect();
        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="white"/>
<text x="{}" y="22" font-size="15" font-weight="bold" text-anchor="middle">{}</text>
"#,
            LEFT + (W - LEFT - RIGHT) / 2.0,
            escape(&self.title)
        );
        if points.is_empty() {
            svg.push_str("</svg>\n");
            return svg;
        }
        // x: log10, with 1 at the origin.
        let x_max = points.iter().map(|p| p.x).fold(1.0, f64::max);
        let lx = |x: f64| x.max(1.0).log10();
        let x_span = lx(x_max).max(1.0);
        let px = |x: f64| LEFT + lx(x) / x_span * (W - LEFT - RIGHT);
        // y: linear from 0, or log over the data's decades.
        let y_hi = points.iter().map(|p| p.hi.max(p.y)).fold(f64::MIN, f64::max);
        let y_lo = points.iter().map(|p| p.lo.min(p.y)).filter(|v| *v > 0.0).fold(f64::MAX, f64::min);
        let (ymin, ymax) = if self.log_y {
            (10f64.powf(y_lo.log10().floor()), 10f64.powf(y_hi.log10().ceil()))
        } else {
            (0.0, nice_ceiling(y_hi * 1.08))
        };
        let py = |y: f64| {
            let f = if self.log_y {
                (y.max(ymin).log10() - ymin.log10()) / (ymax.log10() - ymin.log10())
            } else {
                (y - ymin) / (ymax - ymin)
            };
            H - BOTTOM - f * (H - TOP - BOTTOM)
        };
        // Grid and ticks.
        let y_ticks: Vec<f64> = if self.log_y {
            let mut t = Vec::new();
            let mut v = ymin;
            while v <= ymax * 1.0001 {
                t.push(v);
                v *= 10.0;
            }
            t
        } else {
            (0..=5).map(|i| ymin + (ymax - ymin) * f64::from(i) / 5.0).collect()
        };
        for t in &y_ticks {
            let y = py(*t);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - RIGHT,
                LEFT - 6.0,
                y + 4.0,
                short(*t)
            );
        }
        let mut xs: Vec<f64> = points.iter().map(|p| p.x).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        for x in xs {
            let x_px = px(x);
            let _ = writeln!(
                svg,
                r##"<line x1="{x_px:.1}" x2="{x_px:.1}" y1="{TOP}" y2="{}" stroke="#e0e0e0"/><text x="{x_px:.1}" y="{}" text-anchor="middle">{}</text>"##,
                H - BOTTOM,
                H - BOTTOM + 16.0,
                short(x)
            );
        }
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
            W - LEFT - RIGHT,
            H - TOP - BOTTOM
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            LEFT + (W - LEFT - RIGHT) / 2.0,
            H - 14.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            svg,
            r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + (H - TOP - BOTTOM) / 2.0,
            escape(&self.y_label)
        );
        // Series.
        for (i, s) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<&Point> = s.points.iter().filter(|p| p.y.is_finite() && p.y > 0.0).collect();
            let path: Vec<String> = pts.iter().map(|p| format!("{:.1},{:.1}", px(p.x), py(p.y))).collect();
            let dash = if s.dashed { r#" stroke-dasharray="6,4""# } else { "" };
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                path.join(" ")
            );
            for p in pts {
                let (x, y) = (px(p.x), py(p.y));
                if p.hi > p.lo {
                    let _ = writeln!(
                        svg,
                        r#"<line x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}" stroke="{color}"/>"#,
                        py(p.lo),
                        py(p.hi)
                    );
                }
                let _ = writeln!(svg, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}"/>"#);
            }
            let ly = TOP + 14.0 + 20.0 * i as f64;
            let lx0 = W - RIGHT + 14.0;
            let _ = writeln!(
                svg,
                r#"<line x1="{lx0}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
                lx0 + 22.0,
                lx0 + 28.0,
                ly + 4.0,
                escape(&s.name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if step * magnitude >= v {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

/// 1, 1k, 10k, 2.5M, 0.35 …
pub fn short(v: f64) -> String {
    let a = v.abs();
    let (value, suffix) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let text = if value.fract().abs() < 1e-9 || value.abs() >= 10.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}").trim_end_matches('0').trim_end_matches('.').to_owned()
    };
    format!("{text}{suffix}")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_series_and_labels() {
        let chart = Chart {
            title: "a < b".into(),
            x_label: "services".into(),
            y_label: "conn/s".into(),
            log_y: false,
            series: vec![Series {
                name: "weir".into(),
                points: vec![Point::new(1.0, 10.0), Point { x: 50_000.0, y: 9.0, lo: 8.0, hi: 11.0 }],
                dashed: false,
            }],
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt; b") && svg.contains(">50k<") && svg.contains("<polyline"));
        assert_eq!(short(1000.0), "1k");
        assert_eq!(short(2500.0), "2.5k");
        assert_eq!(nice_ceiling(7.3), 10.0);
    }
}
