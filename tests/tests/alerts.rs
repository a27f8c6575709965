//! The monitoring that ships with Tidemark: the Prometheus alert rules
//! (`packaging/prometheus/tidemark-alerts.yml`), their `promtool` unit
//! tests and the Grafana dashboard (`packaging/grafana/`). `promtool`
//! must accept the rules and pass their tests, the dashboard must be
//! well-formed with valid PromQL, and every metric either of them names
//! must be one the daemons really export. That list is read from the
//! daemons' sources at test time, so renaming a metric breaks this test
//! instead of silently blinding an alert.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tidemark_e2e::require_tool;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn rules_file() -> PathBuf {
    workspace().join("packaging/prometheus/tidemark-alerts.yml")
}

fn rules_test_file() -> PathBuf {
    workspace().join("packaging/prometheus/tidemark-alerts.test.yml")
}

fn dashboard_file() -> PathBuf {
    workspace().join("packaging/grafana/tidemark-dashboard.json")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs `promtool` with `args` and fails the test, showing its output,
/// unless it succeeds.
fn promtool(args: &[&str], file: &Path) {
    let out = Command::new("promtool")
        .args(args)
        .arg(file)
        .output()
        .expect("running promtool");
    assert!(
        out.status.success(),
        "promtool {} {} failed:\n{}{}",
        args.join(" "),
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// Reading metric names out of Rust sources.

/// A string literal in a Rust source: the byte offset of its opening
/// quote and its text, escapes left as written (metric names have none).
struct Literal {
    start: usize,
    text: String,
}

/// A Rust source with every comment and the inside of every string and
/// character literal blanked out (same byte offsets), so parentheses and
/// paths can be matched on `code` without being fooled by text, plus the
/// string literals themselves.
struct Lexed {
    code: String,
    literals: Vec<Literal>,
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn lex(src: &str) -> Lexed {
    let s = src.as_bytes();
    let mut code = s.to_vec();
    let mut literals = Vec::new();
    let blank = |code: &mut Vec<u8>, from: usize, to: usize| {
        code[from..to].iter_mut().for_each(|b| *b = b' ');
    };
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(s.len(), |n| i + n);
            blank(&mut code, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            let end = src[i + 2..].find("*/").map_or(s.len(), |n| i + 2 + n + 2);
            blank(&mut code, i, end);
            i = end;
        } else if s[i] == b'r'
            && (i == 0
                || !is_ident(s[i - 1])
                || (s[i - 1] == b'b' && (i < 2 || !is_ident(s[i - 2]))))
            && rest[1..]
                .iter()
                .position(|&b| b != b'#')
                .map(|n| rest[1 + n])
                == Some(b'"')
        {
            // A raw string: r"…", r#"…"#, …
            let hashes = rest[1..].iter().take_while(|&&b| b == b'#').count();
            let open = i + 1 + hashes;
            let closing = format!("\"{}", "#".repeat(hashes));
            let close = open
                + 1
                + src[open + 1..]
                    .find(&closing)
                    .expect("unterminated raw string");
            literals.push(Literal {
                start: open,
                text: src[open + 1..close].to_string(),
            });
            blank(&mut code, open + 1, close);
            i = close + closing.len();
        } else if s[i] == b'"' {
            let mut j = i + 1;
            while j < s.len() && s[j] != b'"' {
                j += if s[j] == b'\\' { 2 } else { 1 };
            }
            let j = j.min(s.len());
            literals.push(Literal {
                start: i,
                text: src[i + 1..j].to_string(),
            });
            blank(&mut code, i + 1, j);
            i = j + 1;
        } else if s[i] == b'\'' {
            // A character literal ('x', '\n', '"', 'é') or a lifetime ('a).
            let end = if rest.get(1) == Some(&b'\\') {
                // The escape is at least one character: '\'' ends at 3.
                rest.get(3..)
                    .and_then(|r| r.iter().position(|&b| b == b'\''))
                    .map(|n| i + 3 + n + 1)
            } else {
                src[i + 1..]
                    .chars()
                    .next()
                    .map(|c| i + 1 + c.len_utf8())
                    .filter(|&after| s.get(after) == Some(&b'\''))
                    .map(|after| after + 1)
            };
            match end {
                Some(end) => {
                    blank(&mut code, i + 1, end - 1);
                    i = end;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    Lexed {
        code: String::from_utf8(code).expect("blanking keeps UTF-8"),
        literals,
    }
}

/// `src` without its unit tests: everything from `#[cfg(test)] mod` on.
fn without_test_module(src: &str) -> &str {
    src.find("#[cfg(test)]\nmod ").map_or(src, |at| &src[..at])
}

/// Whether `s` is a Tidemark metric name (`tidemark_[a-z0-9_]+`).
fn is_metric_name(s: &str) -> bool {
    s.strip_prefix("tidemark_").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    })
}

/// The series names one `Exposition` call exposes, named as
/// `metrics/src/exposition.rs` does (and its tests assert): the unit's
/// suffix (`_seconds`, `_bytes`, `_ratio`) after the name, then `_total`
/// for a counter, `_info` for an info metric, and a histogram's family
/// with its `_bucket`, `_sum` and `_count` series.
fn exposed_names(method: &str, name: &str, args: &str) -> Vec<String> {
    let unit = [
        ("Unit::Seconds", "_seconds"),
        ("Unit::Bytes", "_bytes"),
        ("Unit::Ratio", "_ratio"),
    ]
    .iter()
    .find(|(path, _)| args.contains(path))
    .map_or("", |(_, suffix)| suffix);
    match method {
        "gauge" => vec![format!("{name}{unit}")],
        "counter" => vec![format!("{name}{unit}_total")],
        "histogram" => ["", "_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{name}{unit}{s}"))
            .collect(),
        "state_set" => vec![name.to_string()],
        "info" => vec![format!("{name}_info")],
        other => unreachable!("not an exposition method: {other}"),
    }
}

/// The `Exposition` methods, as called on one: `e.gauge(…)`.
const EXPOSITION_METHODS: [&str; 5] = ["gauge", "counter", "histogram", "state_set", "info"];

/// Every metric `src` exports through an `Exposition` call: (method, name,
/// the exposed series names). Usually the name is the call's first
/// argument, `e.gauge("tidemark_…", …)`; a name literal elsewhere (a
/// table looped over, a constant) belongs to the next call in the file
/// whose first argument is not a literal, `e.gauge(name, …)`. A name with
/// no such call after it fails the test: the way metrics are exported
/// changed, and this parser has to learn it rather than guess.
fn exposition_calls(src: &str) -> Vec<(String, String, Vec<String>)> {
    let lexed = lex(src);
    let code = lexed.code.as_bytes();
    // (method, offset of `(`, the arguments, the name literal if the first
    // argument is one).
    let mut sites: Vec<(&str, usize, &str, Option<&Literal>)> = Vec::new();
    for method in EXPOSITION_METHODS {
        for (at, _) in lexed.code.match_indices(&format!(".{method}(")) {
            let open = at + 1 + method.len();
            let mut depth = 0;
            let close = (open..code.len())
                .find(|&j| {
                    match code[j] {
                        b'(' => depth += 1,
                        b')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .expect("a call is closed");
            let args = &lexed.code[open + 1..close];
            let first = open + 1 + (args.len() - args.trim_start().len());
            let literal = lexed
                .literals
                .iter()
                .find(|l| l.start == first && is_metric_name(&l.text));
            sites.push((method, open, args, literal));
        }
    }
    sites.sort_by_key(|&(_, open, _, _)| open);
    let mut calls = Vec::new();
    for lit in lexed.literals.iter().filter(|l| is_metric_name(&l.text)) {
        let direct = sites
            .iter()
            .find(|(_, _, _, l)| l.is_some_and(|l| l.start == lit.start));
        let indirect = || {
            sites
                .iter()
                .find(|(_, open, _, l)| *open > lit.start && l.is_none())
        };
        let Some(&(method, _, args, _)) = direct.or_else(indirect) else {
            panic!(
                "cannot tell how {:?} is exported: no Exposition call takes it (see exposition_calls)",
                lit.text
            );
        };
        let names = exposed_names(method, &lit.text, args);
        calls.push((method.to_string(), lit.text.clone(), names));
    }
    calls
}

/// The `.rs` files under `dir`, test-only directories (`tests/`) left out.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if !path.ends_with("tests") {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// What the daemons export, read from their sources (unit tests left out).
struct Exported {
    /// Series names, and histogram family names, with the source file of
    /// each.
    metrics: BTreeMap<String, String>,
    /// Every string literal in the daemons' code: the possible values of
    /// labels such as `state` and `class`.
    literals: BTreeSet<String>,
}

fn exported() -> Exported {
    let mut metrics = BTreeMap::new();
    let mut literals = BTreeSet::new();
    for daemon in ["tracker", "shipper", "receiver"] {
        let mut files = Vec::new();
        rust_files(&workspace().join(daemon).join("src"), &mut files);
        let mut found = 0;
        for file in files {
            let text = read(&file);
            let src = without_test_module(&text);
            let rel = file
                .strip_prefix(workspace())
                .unwrap()
                .display()
                .to_string();
            for (_, _, names) in exposition_calls(src) {
                found += 1;
                for n in names {
                    metrics.insert(n, rel.clone());
                }
            }
            literals.extend(lex(src).literals.into_iter().map(|l| l.text));
        }
        assert!(
            found > 0,
            "no metric found in {daemon}/src: has the way metrics are exported changed?"
        );
    }
    Exported { metrics, literals }
}

/// The `tidemark_…` names that occur in `text` (not inside a longer
/// identifier).
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("tidemark_") {
        if at > 0 && (is_ident(b[at - 1]) || b[at - 1] == b':') {
            continue;
        }
        let len = b[at..]
            .iter()
            .take_while(|&&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
            .count();
        let name = &text[at..at + len];
        if is_metric_name(name) {
            names.insert(name.to_string());
        }
    }
    names
}

/// Values `label` is matched against with `label="…"` in `text`.
fn label_values_in(text: &str, label: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let pattern = format!("{label}=\"");
    text.match_indices(&pattern)
        .filter(|(at, _)| *at == 0 || !is_ident(b[at - 1]))
        .filter_map(|(at, _)| {
            let from = at + pattern.len();
            text[from..]
                .find('"')
                .map(|n| text[from..from + n].to_string())
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The dashboard.

fn dashboard() -> Value {
    let text = read(&dashboard_file());
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("the dashboard is not JSON: {e}"))
}

/// Every panel, those inside rows included.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for p in dash["panels"].as_array().expect("the dashboard has panels") {
        all.push(p);
        if let Some(children) = p["panels"].as_array() {
            all.extend(children);
        }
    }
    all
}

/// The query of a templating variable (a string, or `{query: …}`).
fn variable_query(var: &Value) -> &str {
    var["query"]
        .as_str()
        .or_else(|| var["query"]["query"].as_str())
        .unwrap_or("")
}

/// Every PromQL query in the dashboard with where it is: the panels'
/// target expressions and the selectors of the `label_values(…)`
/// variables.
fn dashboard_queries(dash: &Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            queries.push((
                format!("panel {} target {}", p["id"], t["refId"]),
                t["expr"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(inner) = variable_query(v)
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        {
            let selector = inner.rsplit_once(',').map_or(inner, |(sel, _)| sel);
            queries.push((
                format!("variable {}", v["name"]),
                selector.trim().to_string(),
            ));
        }
    }
    queries
}

/// Grafana's built-in interval variables, as they may appear in a query.
const GRAFANA_INTERVALS: [(&str, &str); 3] = [
    ("$__rate_interval", "5m"),
    ("$__interval", "1m"),
    ("$__range", "1h"),
];

/// The `$name` / `${name}` variables `expr` uses, built-ins excluded.
fn variables_in(expr: &str) -> BTreeSet<String> {
    let mut expr = expr.to_string();
    for (var, _) in GRAFANA_INTERVALS {
        expr = expr.replace(var, "");
    }
    expr.match_indices('$')
        .map(|(at, _)| {
            let rest = expr[at + 1..].trim_start_matches('{');
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        // A bare `$` is a regex anchor, not a variable.
        .filter(|name| !name.is_empty())
        .collect()
}

/// `expr` as Prometheus would get it: intervals filled in, the host and
/// group selections (always inside a `=~"…"` matcher) matching everything.
fn as_promql(expr: &str) -> String {
    let mut out = expr.to_string();
    for (var, value) in GRAFANA_INTERVALS {
        out = out.replace(var, value);
    }
    for var in variables_in(expr) {
        out = out
            .replace(&format!("${{{var}}}"), ".*")
            .replace(&format!("${var}"), ".*");
    }
    out
}

// ---------------------------------------------------------------------------
// Tests.

/// The alerts the rules must define.
const ALERTS: [&str; 7] = [
    "TidemarkLagAboveRpoTarget",
    "TidemarkDiskCritical",
    "TidemarkReceiverUnreachable",
    "TidemarkLogFilling",
    "TidemarkNoRecentRecoveryPoint",
    "TidemarkSpanNoConsistentPoint",
    "TidemarkMetricsDown",
];

#[test]
fn promtool_accepts_the_alert_rules() {
    if !require_tool("promtool", "promtool_accepts_the_alert_rules") {
        return;
    }
    promtool(&["check", "rules"], &rules_file());
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    if !require_tool("promtool", "the_alert_rules_pass_their_unit_tests") {
        return;
    }
    promtool(&["test", "rules"], &rules_test_file());
}

/// Each rule (a `- alert:` block of the rules file) has an expression, an
/// explicit `for`, a severity and both annotations, and each alert has a
/// unit test in which it fires; the unit tests name no alert that does
/// not exist (`promtool` would pass such a test vacuously).
#[test]
fn every_alert_has_severity_annotations_and_a_firing_test() {
    let rules = read(&rules_file());
    let mut blocks: Vec<(String, Vec<&str>)> = Vec::new();
    for line in rules.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("- alert:") {
            blocks.push((name.trim().to_string(), Vec::new()));
        } else if t.starts_with("- record:") {
            panic!("the alert file should hold alerts only: {t}");
        } else if let Some((_, body)) = blocks.last_mut() {
            body.push(t);
        }
    }
    let key = |body: &[&str], k: &str| {
        body.iter()
            .find_map(|l| l.strip_prefix(k).map(str::trim))
            .map(str::to_string)
    };
    for (name, body) in &blocks {
        assert!(key(body, "expr:").is_some(), "{name}: no expr");
        assert!(key(body, "for:").is_some(), "{name}: no explicit `for:`");
        let severity = key(body, "severity:").unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&severity.as_str()),
            "{name}: severity {severity:?} is not critical, warning or info"
        );
        for annotation in ["summary:", "description:"] {
            assert!(
                key(body, annotation).is_some_and(|v| !v.is_empty()),
                "{name}: no {annotation} annotation"
            );
        }
    }
    let defined: BTreeSet<&str> = blocks.iter().map(|(n, _)| n.as_str()).collect();
    for alert in ALERTS {
        assert!(defined.contains(alert), "{alert} is not defined");
    }

    // In the unit tests: each `alertname:` is followed by its expected
    // alerts, `exp_alerts: []` (must not fire) or a list (fires).
    let tests = read(&rules_test_file());
    let lines: Vec<&str> = tests
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut firing = BTreeSet::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.strip_prefix("alertname:").map(str::trim) else {
            continue;
        };
        assert!(
            defined.contains(name),
            "the unit tests check {name}, which no rule defines"
        );
        match lines.get(i + 1).copied() {
            Some("exp_alerts: []") => {}
            Some("exp_alerts:") => {
                firing.insert(name);
            }
            other => panic!("alertname {name} is followed by {other:?}, not exp_alerts"),
        }
    }
    for name in &defined {
        assert!(
            firing.contains(name),
            "no unit test in which {name} fires (with its labels and annotations)"
        );
    }
}

#[test]
fn the_dashboard_is_well_formed() {
    let dash = dashboard();
    assert_eq!(dash["schemaVersion"], 39, "schemaVersion");
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()), "uid");

    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    let ds = var("DS_PROMETHEUS");
    assert_eq!(
        ds["type"], "datasource",
        "DS_PROMETHEUS is a data source variable"
    );
    assert_eq!(ds["query"], "prometheus", "DS_PROMETHEUS picks Prometheus");
    for name in ["host", "group"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["datasource"]["uid"], "${DS_PROMETHEUS}", "{name}");
        let q = variable_query(v);
        assert!(
            q.starts_with("label_values(") && q.ends_with(&format!(", {name})")),
            "{name} is not label_values(…, {name}): {q}"
        );
    }
    let defined: BTreeSet<String> = vars
        .iter()
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect();

    let all = panels(&dash);
    let mut ids = BTreeSet::new();
    for p in &all {
        let title = p["title"].as_str().unwrap_or("?");
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{title}: no numeric id"));
        assert!(ids.insert(id), "panel id {id} ({title}) is not unique");
        let g = &p["gridPos"];
        let [x, _y, w, h] = ["x", "y", "w", "h"].map(|k| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k} missing"))
        });
        assert!(
            w > 0 && h > 0 && x + w <= 24,
            "{title}: gridPos {g} off the 24-column grid"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${DS_PROMETHEUS}",
            "{title}: datasource"
        );
        let targets = p["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| panic!("{title}: no targets"));
        let mut refs = BTreeSet::new();
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(!expr.trim().is_empty(), "{title}: a target without expr");
            assert!(
                refs.insert(t["refId"].to_string()),
                "{title}: refId {} twice",
                t["refId"]
            );
            assert_eq!(
                t["datasource"]["uid"], "${DS_PROMETHEUS}",
                "{title}: target datasource"
            );
            for v in variables_in(expr) {
                assert!(
                    defined.contains(&v),
                    "{title}: ${v} is not a dashboard variable"
                );
            }
        }
    }

    // Panels on the grid do not overlap (those inside a collapsed row are
    // laid out when it opens, so only the top level is checked).
    let top: Vec<(&str, [u64; 4])> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let g = &p["gridPos"];
            (
                p["title"].as_str().unwrap_or("?"),
                ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap()),
            )
        })
        .collect();
    for (i, (a, [ax, ay, aw, ah])) in top.iter().enumerate() {
        for (b, [bx, by, bw, bh]) in &top[i + 1..] {
            let apart = ax + aw <= *bx || bx + bw <= *ax || ay + ah <= *by || by + bh <= *ay;
            assert!(apart, "panels {a:?} and {b:?} overlap");
        }
    }
}

/// Every dashboard query, variables filled in, is PromQL that Prometheus
/// accepts: checked by `promtool` as the expression of a recording rule.
#[test]
fn the_dashboard_queries_are_valid_promql() {
    if !require_tool("promtool", "the_dashboard_queries_are_valid_promql") {
        return;
    }
    let dash = dashboard();
    let rules: Vec<Value> = dashboard_queries(&dash)
        .into_iter()
        .enumerate()
        .map(|(i, (place, expr))| {
            serde_json::json!({
                "record": format!("dashboard:query_{i}"),
                "expr": as_promql(&expr),
                "labels": {"place": place},
            })
        })
        .collect();
    assert!(rules.len() > 10, "only {} dashboard queries", rules.len());
    // YAML is a superset of JSON, so promtool reads this as a rule file.
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-queries.yml");
    fs::write(&path, serde_json::to_string_pretty(&file).unwrap()).unwrap();
    promtool(&["check", "rules"], &path);
}

/// The suffix rules of [`exposed_names`] are those the metrics crate's
/// own tests assert: each call in `metrics/src/exposition.rs`'s sample
/// exposition, named by those rules, is among the sample's expected
/// output.
#[test]
fn the_naming_rules_match_the_exposition_tests() {
    let text = read(&workspace().join("metrics/src/exposition.rs"));
    let sample = &text[text
        .find("fn sample()")
        .expect("exposition.rs's tests have sample()")..];
    let sample = &sample[..sample.find("\n    }\n").expect("the end of sample()")];
    let calls = exposition_calls(sample);
    let methods: BTreeSet<&str> = calls.iter().map(|(m, _, _)| m.as_str()).collect();
    assert_eq!(
        methods,
        BTreeSet::from(["counter", "gauge", "histogram", "info", "state_set"]),
        "the sample exposition no longer covers every method"
    );
    for (method, name, names) in &calls {
        // A histogram family's name is no series; its buckets are.
        let series = if method == "histogram" {
            &names[1]
        } else {
            &names[0]
        };
        // An expected sample line: `name{labels} value`, or `\nname value`
        // (written with an escaped newline) for a metric without labels.
        assert!(
            text.contains(&format!("{series}{{")) || text.contains(&format!("\\n{series} ")),
            "{method}({name:?}, …) should expose {series}, which exposition.rs's tests never show"
        );
    }
}

/// The source reader on the shapes daemon code takes: direct calls, a
/// table of names looped over, text that only looks like a call.
#[test]
fn the_source_reader_finds_exported_names() {
    let src = r##"
        // e.gauge("tidemark_in_comment", "", None, &g, 1.0);
        /* e.counter("tidemark_in_block_comment", "", None, &g, 1); */
        let quote = '"';
        let apostrophe = '\'';
        e.gauge("tidemark_a", "Help (with parens.", Some(Unit::Bytes), &g, 1.0);
        e.counter("tidemark_b", r#"Raw "help")"#, None, &g, 2);
        e.histogram("tidemark_c", "C.", Some(Unit::Seconds), &g, h);
        e.state_set("tidemark_d", "D.", &g, STATES, s);
        e.info("tidemark_e", "E.", &l);
        for (name, ts) in [("tidemark_f_age", a), ("tidemark_g_age", b)] {
            e.gauge(name, "Age.", Some(Unit::Seconds), &g, ts);
        }
        e.counter("tidemark_h", "H.", Some(Unit::Ratio), &g, 3);
    "##;
    let names: BTreeSet<String> = exposition_calls(src)
        .into_iter()
        .flat_map(|(_, _, names)| names)
        .collect();
    let want: BTreeSet<String> = [
        "tidemark_a_bytes",
        "tidemark_b_total",
        "tidemark_c_seconds",
        "tidemark_c_seconds_bucket",
        "tidemark_c_seconds_sum",
        "tidemark_c_seconds_count",
        "tidemark_d",
        "tidemark_e_info",
        "tidemark_f_age_seconds",
        "tidemark_g_age_seconds",
        "tidemark_h_ratio_total",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, want);

    let orphan = r#"const NAME: &str = "tidemark_orphan";"#;
    let found = std::panic::catch_unwind(|| exposition_calls(orphan));
    assert!(found.is_err(), "a name no call takes must fail the test");
}

/// Every `tidemark_…` name in the rules, their unit tests and the
/// dashboard is exported by a daemon, and every `state`/`class` value
/// they match on is one the daemons can report.
#[test]
fn every_metric_named_is_exported() {
    let exported = exported();
    let dash_text = read(&dashboard_file());
    let dash_queries: String = dashboard_queries(&dashboard())
        .into_iter()
        .map(|(_, q)| q + "\n")
        .collect();
    let sources = [
        (
            "packaging/prometheus/tidemark-alerts.yml",
            read(&rules_file()),
        ),
        (
            "packaging/prometheus/tidemark-alerts.test.yml",
            read(&rules_test_file()),
        ),
        ("packaging/grafana/tidemark-dashboard.json", dash_text),
    ];
    let mut unknown = Vec::new();
    for (file, text) in &sources {
        let used = metric_names_in(text);
        assert!(!used.is_empty(), "{file} names no Tidemark metric");
        for name in used {
            if !exported.metrics.contains_key(&name) {
                unknown.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics the daemons do not export:\n  {}\nexported:\n  {}",
        unknown.join("\n  "),
        exported
            .metrics
            .iter()
            .map(|(n, f)| format!("{n} ({f})"))
            .collect::<Vec<_>>()
            .join("\n  ")
    );

    let mut bad_values = Vec::new();
    for (file, text) in [
        (sources[0].0, sources[0].1.as_str()),
        (sources[1].0, sources[1].1.as_str()),
        (sources[2].0, dash_queries.as_str()),
    ] {
        for label in ["state", "class"] {
            for value in label_values_in(text, label) {
                if !exported.literals.contains(&value) {
                    bad_values.push(format!("{file}: {label}=\"{value}\""));
                }
            }
        }
    }
    assert!(
        bad_values.is_empty(),
        "label values no daemon reports:\n  {}",
        bad_values.join("\n  ")
    );
}
