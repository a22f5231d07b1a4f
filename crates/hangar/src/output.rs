//! Table or JSON output for CLI commands.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a.iter().map(|x| cell(Some(x))).collect::<Vec<_>>().join(","),
        Some(other) => other.to_string(),
    }
}

/// Print a typed answer (a `hangar-wire` type) as [`print`] prints JSON: the same keys
/// the server sent, since it serialized the same type.
pub fn print_as<T: serde::Serialize>(out: Output, v: &T, cols: &[&str]) -> anyhow::Result<()> {
    let v = serde_json::to_value(v).map_err(|e| anyhow::anyhow!("cannot print the answer as JSON: {e}"))?;
    print(out, &v, cols);
    Ok(())
}

/// Print a value: pretty JSON, or a table of the given columns (one row per element of
/// an array, or one row for an object).
pub fn print(out: Output, v: &Value, cols: &[&str]) {
    if out == Output::Json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    let rows: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    let grid: Vec<Vec<String>> = rows.iter().map(|r| cols.iter().map(|c| cell(r.get(*c))).collect()).collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| grid.iter().map(|r| r[i].chars().count()).max().unwrap_or(0).max(c.len()).min(60))
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let c: String = c.chars().take(60).collect();
                format!("{c:<w$}", w = widths[i])
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(cols.iter().map(|c| c.to_uppercase()).collect()));
    for r in grid {
        println!("{}", line(r));
    }
}
