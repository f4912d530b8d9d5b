//! Figures of a run: latency histograms (mergeable across processes through hdrhistogram's V2
//! serialization, hex in JSON), counters, the summary table and the JSON report.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    sync::{Mutex, MutexGuard},
};

use hdrhistogram::{
    Histogram,
    serialization::{Deserializer, Serializer, V2Serializer},
};
use serde::{Deserialize, Serialize, de::Error as _};
use serde_json::{Value, json};

/// Highest latency a histogram tracks: 10 minutes, in microseconds. Larger values are clamped.
const MAX_MICROS: u64 = 600_000_000;

/// A latency histogram in microseconds.
#[derive(Debug, Clone)]
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist(Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant histogram bounds"))
    }
}

impl Hist {
    pub fn record(&mut self, micros: u64) {
        self.0.saturating_record(micros.min(MAX_MICROS));
    }

    pub fn merge(&mut self, other: &Hist) {
        if self.0.add(&other.0).is_err() {
            // Different bounds can only come from a different build of this tool: keep what can
            // be kept, value by value.
            for v in other.0.iter_recorded() {
                self.0
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// Percentiles in milliseconds.
    pub fn summary(&self) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1000.0;
        let h = &self.0;
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            min: ms(h.min()),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

impl Serialize for Hist {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = Vec::new();
        V2Serializer::new()
            .serialize(&self.0, &mut buf)
            .map_err(|e| serde::ser::Error::custom(format!("histogram: {e:?}")))?;
        s.serialize_str(&hex::encode(buf))
    }
}

impl<'de> Deserialize<'de> for Hist {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(D::Error::custom)?;
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| D::Error::custom(format!("histogram: {e:?}")))?;
        Ok(Hist(h))
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Everything one worker measured; merged across workers by adding counters, vectors and
/// histograms and keeping the extremes of `mins`/`maxs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub counters: BTreeMap<String, u64>,
    pub mins: BTreeMap<String, u64>,
    pub maxs: BTreeMap<String, u64>,
    pub vectors: BTreeMap<String, Vec<u64>>,
    pub hists: BTreeMap<String, Hist>,
    /// Set when the gateway answered that a feature the scenario needs is unavailable.
    pub unavailable: Option<String>,
    /// Distinct examples of errors, for the report.
    pub samples: BTreeMap<String, String>,
}

impl Stats {
    pub fn add(&mut self, name: &str, n: u64) {
        if n == 0 {
            return;
        }
        match self.counters.get_mut(name) {
            Some(v) => *v += n,
            None => {
                self.counters.insert(name.to_string(), n);
            }
        }
    }

    pub fn get(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    pub fn record(&mut self, hist: &str, micros: u64) {
        match self.hists.get_mut(hist) {
            Some(h) => h.record(micros),
            None => {
                let mut h = Hist::default();
                h.record(micros);
                self.hists.insert(hist.to_string(), h);
            }
        }
    }

    /// Records every value in one histogram (one look-up of its name, not one per value).
    pub fn record_all(&mut self, hist: &str, values: impl IntoIterator<Item = u64>) {
        let mut values = values.into_iter().peekable();
        if values.peek().is_none() {
            return;
        }
        let h = match self.hists.get_mut(hist) {
            Some(h) => h,
            None => self.hists.entry(hist.to_string()).or_default(),
        };
        for v in values {
            h.record(v);
        }
    }

    pub fn hist(&self, name: &str) -> Hist {
        self.hists.get(name).cloned().unwrap_or_default()
    }

    pub fn min(&mut self, name: &str, v: u64) {
        let slot = self.mins.entry(name.to_string()).or_insert(v);
        *slot = (*slot).min(v);
    }

    pub fn max(&mut self, name: &str, v: u64) {
        let slot = self.maxs.entry(name.to_string()).or_insert(v);
        *slot = (*slot).max(v);
    }

    /// Adds `n` at `index` of vector `name` (grown to fit).
    pub fn vec_add(&mut self, name: &str, index: usize, n: u64) {
        let v = self.vectors.entry(name.to_string()).or_default();
        if v.len() <= index {
            v.resize(index + 1, 0);
        }
        v[index] += n;
    }

    pub fn vector(&self, name: &str) -> &[u64] {
        self.vectors.get(name).map_or(&[], Vec::as_slice)
    }

    /// Keeps the first example of each kind of error.
    pub fn sample(&mut self, kind: &str, message: &str) {
        if self.samples.len() < 64 && !self.samples.contains_key(kind) {
            let text: String = message.chars().take(300).collect();
            self.samples.insert(kind.to_string(), text);
        }
    }

    pub fn merge(&mut self, other: Stats) {
        for (k, v) in other.counters {
            self.add(&k, v);
        }
        for (k, v) in other.mins {
            self.min(&k, v);
        }
        for (k, v) in other.maxs {
            self.max(&k, v);
        }
        for (k, v) in other.vectors {
            for (i, n) in v.into_iter().enumerate() {
                self.vec_add(&k, i, n);
            }
        }
        for (k, h) in other.hists {
            match self.hists.get_mut(&k) {
                Some(mine) => mine.merge(&h),
                None => {
                    self.hists.insert(k, h);
                }
            }
        }
        if self.unavailable.is_none() {
            self.unavailable = other.unavailable;
        }
        for (k, v) in other.samples {
            if self.samples.len() < 64 {
                self.samples.entry(k).or_insert(v);
            }
        }
    }

    /// Counters whose name starts with `prefix`, without it.
    pub fn with_prefix(&self, prefix: &str) -> BTreeMap<String, u64> {
        self.counters
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), *v)))
            .collect()
    }
}

/// A worker's statistics shared by its connection tasks.
#[derive(Default)]
pub struct Recorder(Mutex<Stats>);

impl Recorder {
    pub fn lock(&self) -> MutexGuard<'_, Stats> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add(&self, name: &str, n: u64) {
        self.lock().add(name, n);
    }

    pub fn take(&self) -> Stats {
        std::mem::take(&mut *self.lock())
    }
}

/// One row of the summary table.
#[derive(Debug, Clone)]
pub enum Row {
    Value(String, String),
    Latency(String, LatencySummary),
}

/// A titled part of the summary table.
#[derive(Debug, Clone)]
pub struct Section {
    pub title: String,
    pub rows: Vec<Row>,
}

impl Section {
    pub fn new(title: impl Into<String>) -> Self {
        Section {
            title: title.into(),
            rows: Vec::new(),
        }
    }

    pub fn value(&mut self, name: impl Into<String>, value: impl std::fmt::Display) -> &mut Self {
        self.rows.push(Row::Value(name.into(), value.to_string()));
        self
    }

    pub fn latency(&mut self, name: impl Into<String>, l: LatencySummary) -> &mut Self {
        self.rows.push(Row::Latency(name.into(), l));
        self
    }
}

/// A summary's figures: a serde struct, declared with `figures!`, whose fields are both the JSON
/// report's `figures` and the rows of the summary table.
pub trait Figures: Serialize {
    /// The table's sections, each row named by its field (its key in the report).
    fn sections(&self) -> Vec<Section>;
}

/// How a figure shows in the table: as rows named by its path in the report (`name`, then
/// `name.key` for map entries, `name[i]` for list items, `name.field` for an entry's fields).
pub trait Cell {
    fn rows(&self, name: &str, section: &mut Section);
}

macro_rules! cell_by_display {
    ($($t:ty),*) => {
        $(impl Cell for $t {
            fn rows(&self, name: &str, section: &mut Section) {
                section.value(name, self);
            }
        })*
    };
}

cell_by_display!(u64, i64, u32, usize, f64, bool, String);

impl Cell for LatencySummary {
    fn rows(&self, name: &str, section: &mut Section) {
        section.latency(name, *self);
    }
}

impl<T: Cell> Cell for Option<T> {
    fn rows(&self, name: &str, section: &mut Section) {
        match self {
            Some(v) => v.rows(name, section),
            None => {
                section.value(name, "n/a");
            }
        }
    }
}

impl<T: Cell> Cell for BTreeMap<String, T> {
    fn rows(&self, name: &str, section: &mut Section) {
        for (key, v) in self {
            v.rows(&format!("{name}.{key}"), section);
        }
    }
}

impl<T: Cell> Cell for Vec<T> {
    fn rows(&self, name: &str, section: &mut Section) {
        for (i, v) in self.iter().enumerate() {
            v.rows(&format!("{name}[{i}]"), section);
        }
    }
}

/// Declares a serde struct of figures, each field named once: its name is the key in the JSON
/// report and the row in the table.
///
/// - `pub struct Name { "title" { field: Type, ... } ... }` is a summary (`Figures`): the fields
///   are grouped into the table's titled sections, and `..field: Type` last flattens another
///   summary into it (in the report; in the table its sections follow).
/// - `pub struct Name { field: Type, ... }` is an entry of a list or map (`Cell`): its fields show
///   as `name.field` rows.
macro_rules! figures {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $title:literal { $( $(#[$fmeta:meta])* $field:ident : $ty:ty ),* $(,)? } )+
            $( .. $inner:ident : $inner_ty:ty $(,)? )?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
        pub struct $name {
            $( $( $(#[$fmeta])* pub $field: $ty, )* )+
            $( #[serde(flatten)] pub $inner: $inner_ty, )?
        }

        impl $crate::report::Figures for $name {
            fn sections(&self) -> Vec<$crate::report::Section> {
                #[allow(unused_mut)]
                let mut sections = vec![$({
                    let mut section = $crate::report::Section::new($title);
                    $( $crate::report::Cell::rows(&self.$field, stringify!($field), &mut section); )*
                    section
                }),+];
                $( sections.extend($crate::report::Figures::sections(&self.$inner)); )?
                sections
            }
        }
    };
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $crate::report::Cell for $name {
            fn rows(&self, name: &str, section: &mut $crate::report::Section) {
                $( $crate::report::Cell::rows(
                    &self.$field,
                    &format!("{name}.{}", stringify!($field)),
                    section,
                ); )*
            }
        }
    };
}

pub(crate) use figures;

figures! {
    /// The run's own figures, at the top level of the JSON report.
    pub struct RunFigures {
        "run" {
            processes: usize,
            elapsed_secs: f64,
            setup_secs: f64,
            run_secs: f64,
        }
    }
}

/// What a scenario concluded: the table's sections and the report's figures (both from one
/// `Figures`), and problems that make the run a failure.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub sections: Vec<Section>,
    pub figures: Value,
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

impl Summary {
    pub fn new(figures: &impl Figures) -> Self {
        Summary {
            sections: figures.sections(),
            figures: serde_json::to_value(figures)
                .unwrap_or_else(|e| Value::String(format!("figures not serializable: {e}"))),
            problems: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

/// Renders the summary table.
pub fn table(title: &str, summary: &Summary) -> String {
    let mut lines: Vec<(String, String)> = Vec::new();
    for section in summary.sections.iter().filter(|s| !s.rows.is_empty()) {
        lines.push((format!("[{}]", section.title), String::new()));
        for row in &section.rows {
            match row {
                Row::Value(name, value) => lines.push((format!("  {name}"), value.clone())),
                Row::Latency(name, l) => lines.push((
                    format!("  {name}"),
                    if l.count == 0 {
                        "no samples".to_string()
                    } else {
                        format!(
                            "p50 {} | p99 {} | p999 {} | max {} | n={}",
                            ms(l.p50),
                            ms(l.p99),
                            ms(l.p999),
                            ms(l.max),
                            l.count
                        )
                    },
                )),
            }
        }
    }
    let left = lines.iter().map(|(a, _)| a.len()).max().unwrap_or(0);
    let right = lines.iter().map(|(_, b)| b.len()).max().unwrap_or(0);
    let width = (left + right + 7).max(title.len() + 4);
    let rule = format!("+{}+", "-".repeat(width - 2));
    let mut out = String::new();
    let _ = writeln!(out, "{rule}");
    let _ = writeln!(out, "| {:<w$} |", title, w = width - 4);
    let _ = writeln!(out, "{rule}");
    for (a, b) in &lines {
        if b.is_empty() {
            let _ = writeln!(out, "| {:<w$} |", a, w = width - 4);
        } else {
            let _ = writeln!(out, "| {:<left$} | {:>r$} |", a, b, r = width - left - 7);
        }
    }
    let _ = writeln!(out, "{rule}");
    for w in &summary.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    for p in &summary.problems {
        let _ = writeln!(out, "PROBLEM: {p}");
    }
    out
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Rounds for the report: rates and ratios with a few decimals.
pub fn round(v: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (v * f).round() / f
}

/// Writes the JSON report.
pub fn write_json(path: &Path, report: &Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text + "\n")
        .map_err(|e| anyhow::anyhow!("cannot write report {}: {e}", path.display()))
}

/// The latency summaries of all histograms, for the JSON report.
pub fn latencies_json(stats: &Stats) -> Value {
    let map: serde_json::Map<String, Value> = stats
        .hists
        .iter()
        .map(|(k, h)| (k.clone(), json!(h.summary())))
        .collect();
    Value::Object(map)
}

/// Options whose values are secrets.
const SECRET_OPTIONS: [&str; 2] = ["--jwt-secret", "--api-key"];

/// The command line with the values of `--jwt-secret` and `--api-key` replaced, so reports can be
/// shared.
pub fn redact_secret(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut hide_next = false;
    for a in args {
        if hide_next {
            out.push("<redacted>".to_string());
            hide_next = false;
        } else if SECRET_OPTIONS.contains(&a.as_str()) {
            out.push(a.clone());
            hide_next = true;
        } else if let Some(option) = SECRET_OPTIONS
            .iter()
            .find(|o| a.strip_prefix(**o).is_some_and(|v| v.starts_with('=')))
        {
            out.push(format!("{option}=<redacted>"));
        } else {
            out.push(a.clone());
        }
    }
    out
}

/// The command line as one shell-quoted string.
pub fn shell_line(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_json_and_merge() -> anyhow::Result<()> {
        let mut a = Stats::default();
        let mut b = Stats::default();
        for v in 1..=1000 {
            a.record("lat", v);
            b.record("lat", v + 1000);
        }
        a.add("n", 2);
        b.add("n", 3);
        b.vec_add("g", 3, 7);
        b.min("start", 5);
        a.min("start", 9);
        let b: Stats = serde_json::from_str(&serde_json::to_string(&b)?)?;
        a.merge(b);
        let s = a.hist("lat").summary();
        assert_eq!(s.count, 2000);
        assert!((s.p50 - 1.0).abs() < 0.01, "{s:?}");
        assert!((s.max - 2.0).abs() < 0.01, "{s:?}");
        assert_eq!(a.get("n"), 5);
        assert_eq!(a.vector("g"), &[0, 0, 0, 7]);
        assert_eq!(a.mins.get("start"), Some(&5));
        Ok(())
    }

    #[test]
    fn table_lines_up() {
        let mut s = Section::new("connections");
        s.value("ok", 10).latency(
            "connect",
            LatencySummary {
                count: 1,
                ..Default::default()
            },
        );
        let summary = Summary {
            sections: vec![s],
            ..Default::default()
        };
        let t = table("idle", &summary);
        let widths: Vec<usize> = t.lines().map(|l| l.chars().count()).collect();
        assert!(widths.iter().all(|w| *w == widths[0]), "{t}");
    }

    figures! {
        /// An entry of a list.
        pub struct TestEntry {
            a: u64,
            b: Option<f64>,
        }
    }

    figures! {
        pub struct TestInner {
            "inner" {
                x: u64,
            }
        }
    }

    figures! {
        /// Sections, a map, a list of entries, a latency and a flattened part.
        pub struct TestFigures {
            "outer" {
                n: u64,
                kinds: BTreeMap<String, u64>,
                list: Vec<TestEntry>,
                wait_ms: LatencySummary,
            }
            "empty" {
                none: Vec<TestEntry>,
            }
            ..inner: TestInner
        }
    }

    #[test]
    fn figures_are_named_once_in_table_and_report() -> anyhow::Result<()> {
        let f = TestFigures {
            n: 1,
            kinds: [("timeout".to_string(), 2)].into(),
            list: vec![TestEntry { a: 3, b: None }],
            wait_ms: LatencySummary::default(),
            none: Vec::new(),
            inner: TestInner { x: 4 },
        };
        let summary = Summary::new(&f);
        let shown: Vec<(String, Vec<String>)> = summary
            .sections
            .iter()
            .map(|s| {
                let rows = s.rows.iter().map(|r| match r {
                    Row::Value(name, value) => format!("{name}={value}"),
                    Row::Latency(name, l) => format!("{name}~{}", l.count),
                });
                (s.title.clone(), rows.collect())
            })
            .collect();
        let expected = [
            (
                "outer",
                &[
                    "n=1",
                    "kinds.timeout=2",
                    "list[0].a=3",
                    "list[0].b=n/a",
                    "wait_ms~0",
                ][..],
            ),
            ("empty", &[]),
            ("inner", &["x=4"]),
        ];
        let expected: Vec<(String, Vec<String>)> = expected
            .iter()
            .map(|(t, rows)| (t.to_string(), rows.iter().map(|r| r.to_string()).collect()))
            .collect();
        assert_eq!(shown, expected);
        assert_eq!(
            summary.figures,
            json!({
                "n": 1,
                "kinds": {"timeout": 2},
                "list": [{"a": 3, "b": null}],
                "wait_ms": LatencySummary::default(),
                "none": [],
                "x": 4,
            })
        );
        let back: TestFigures = serde_json::from_value(summary.figures)?;
        assert_eq!(back, f);
        // Empty sections are left out of the table.
        assert!(!table("t", &Summary::new(&f)).contains("[empty]"));
        Ok(())
    }

    #[test]
    fn secrets_are_redacted() {
        let argv: Vec<String> = [
            "lt",
            "idle",
            "--jwt-secret",
            "s",
            "--jwt-secret=t",
            "--api-key",
            "k",
            "--api-key=k2",
            "--api-keys",
            "-n",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            redact_secret(&argv).join(" "),
            "lt idle --jwt-secret <redacted> --jwt-secret=<redacted> --api-key <redacted> \
             --api-key=<redacted> --api-keys -n 5"
        );
    }

    #[test]
    fn shell_quoting() {
        let line = shell_line(&["a".into(), "b c".into(), "it's".into()]);
        assert_eq!(line, r"a 'b c' 'it'\''s'");
    }
}
