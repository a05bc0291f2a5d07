//! The report: one row per figure, each beside its anchor and their ratio, and the issue's
//! target where there is one. Printed as a Markdown table, which reads as well in a terminal as
//! pasted into docs/PERFORMANCE.md.

/// One figure of the report.
pub struct Row {
    pub backend: &'static str,
    pub measure: String,
    pub value: f64,
    pub unit: &'static str,
    pub anchor: String,
    pub anchor_value: f64,
    pub target: Option<Target>,
}

/// What the issue asks of a figure, and whether this run met it.
pub struct Target {
    pub text: String,
    pub met: bool,
}

impl Target {
    /// `ratio ≥ min`.
    pub fn ratio_at_least(ratio: f64, min: f64) -> Self {
        Self {
            text: format!("≥ {min}"),
            met: ratio >= min,
        }
    }
}

impl Row {
    pub fn ratio(&self) -> f64 {
        self.value / self.anchor_value
    }
}

/// Formats a figure with as many decimals as its size deserves.
fn figure(value: f64) -> String {
    if !value.is_finite() {
        "–".to_owned()
    } else if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// The report as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "backend",
        "measure",
        "value",
        "unit",
        "anchor",
        "anchor value",
        "ratio",
        "target",
        "",
    ];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|row| {
            let (target, verdict) = match &row.target {
                Some(t) => (t.text.clone(), if t.met { "✓" } else { "✗" }),
                None => (String::new(), ""),
            };
            [
                row.backend.to_owned(),
                row.measure.clone(),
                figure(row.value),
                row.unit.to_owned(),
                row.anchor.clone(),
                figure(row.anchor_value),
                figure(row.ratio()),
                target,
                verdict.to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    // Numbers align right, words left.
    let right = [false, false, true, false, false, true, true, false, false];
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .zip(right)
            .map(|((cell, width), right)| {
                let pad = " ".repeat(width - cell.chars().count());
                if right {
                    format!("{pad}{cell}")
                } else {
                    format!("{cell}{pad}")
                }
            })
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(&header.map(str::to_owned));
    // `---:` right-aligns a column when the table is rendered as Markdown.
    let rule: Vec<String> = widths
        .iter()
        .zip(right)
        .map(|(&w, right)| {
            if right {
                format!("{}:", "-".repeat(w + 1))
            } else {
                "-".repeat(w + 2)
            }
        })
        .collect();
    out.push_str(&format!("|{}|\n", rule.join("|")));
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missed_target_is_marked_with_a_cross_and_every_line_has_the_same_width() {
        let rows = [
            Row {
                backend: "embedded",
                measure: "100-event batches, end to end".to_owned(),
                value: 1000.0,
                unit: "events/s",
                anchor: "SQLite 100 rows/txn".to_owned(),
                anchor_value: 50_000.0,
                target: Some(Target::ratio_at_least(0.02, 0.4)),
            },
            Row {
                backend: "embedded",
                measure: "drain, 10k backlog".to_owned(),
                value: 900.0,
                unit: "events/s",
                anchor: "SQLite 100 rows/txn".to_owned(),
                anchor_value: 50_000.0,
                target: None,
            },
        ];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[2].contains("| 0.020 |") && lines[2].ends_with("| ✗ |"));
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width));
    }
}
