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
pub fn figure(value: f64) -> String {
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

/// A reading of one anchor, before and after the figures divided by it.
pub struct AnchorRow {
    pub backend: &'static str,
    pub anchor: &'static str,
    pub before: f64,
    pub after: f64,
}

impl AnchorRow {
    /// What the figures are divided by.
    pub fn value(&self) -> f64 {
        (self.before + self.after) / 2.0
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
    let right = [false, false, true, false, false, true, true, false, false];
    let cells = rows.iter().map(|row| {
        let (target, verdict) = match &row.target {
            Some(t) => (t.text.clone(), if t.met { "✓" } else { "✗" }),
            None => (String::new(), ""),
        };
        vec![
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
    });
    markdown(&header, &right, cells.collect())
}

/// The anchors as a Markdown table, with how far apart the two readings were.
pub fn anchor_table(anchors: &[AnchorRow]) -> String {
    let header = ["backend", "anchor", "before", "after", "used", "spread"];
    let right = [false, false, true, true, true, true];
    let cells = anchors.iter().map(|a| {
        let spread = (a.before - a.after).abs() / a.value() * 100.0;
        vec![
            a.backend.to_owned(),
            a.anchor.to_owned(),
            figure(a.before),
            figure(a.after),
            figure(a.value()),
            format!("{spread:.0}%"),
        ]
    });
    markdown(&header, &right, cells.collect())
}

/// A Markdown table padded so its columns also line up in a terminal; numbers align right.
pub fn markdown(header: &[&str], right: &[bool], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .zip(right)
            .map(|((cell, &width), &right)| {
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
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut out = line(&header);
    // `---:` right-aligns a column when the table is rendered.
    let rule: Vec<String> = widths
        .iter()
        .zip(right)
        .map(|(&w, &right)| {
            if right {
                format!("{}:", "-".repeat(w + 1))
            } else {
                "-".repeat(w + 2)
            }
        })
        .collect();
    out.push_str(&format!("|{}|\n", rule.join("|")));
    for row in &rows {
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

    #[test]
    fn an_anchor_is_the_mean_of_its_two_readings_and_shows_their_spread() {
        let anchor = AnchorRow {
            backend: "postgres",
            anchor: "pgbench 1 row/txn",
            before: 900.0,
            after: 1100.0,
        };
        assert_eq!(anchor.value(), 1000.0);
        assert!(anchor_table(&[anchor])
            .lines()
            .nth(2)
            .unwrap()
            .ends_with(" 20% |"));
    }
}
