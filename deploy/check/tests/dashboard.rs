//! The Grafana dashboard in `deploy/grafana`: it queries only series iamlinkd exports, shows every
//! family it exports, and reads its data source from the DS_PROMETHEUS variable.

use std::collections::BTreeSet;
use std::fs;

use iamlink_deploy_check::daemon::Metrics;
use iamlink_deploy_check::deploy_dir;
use serde_json::Value;

fn dashboard() -> Value {
    let path = deploy_dir().join("grafana/iamlink-dashboard.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The exposition once every family has a child: labelled families appear only when used.
fn exposition() -> String {
    let metrics = Metrics::default();
    metrics.answer("credentials served");
    metrics.sts_call(true, 0.1);
    metrics.render()
}

/// Every series name the exposition offers: counters as `_total`, histograms as `_bucket`,
/// `_sum` and `_count`, gauges as they are, and any sample line's name.
fn exported_series() -> BTreeSet<String> {
    let text = exposition();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            match kind {
                "counter" => names.extend([name.to_string(), format!("{name}_total")]),
                "histogram" => names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}"))),
                _ => {
                    names.insert(name.to_string());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// The metric names a PromQL expression selects: identifiers that are not functions (followed by
/// `(`), keywords, label names (inside `{}` or after by/without/on/ignoring/group_*), strings,
/// ranges, numbers or Grafana variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    const KEYWORDS: &[&str] = &["bool", "and", "or", "unless", "offset", "inf", "nan", "atan2"];
    // Aggregations may put `by (...)` before their argument, so they are not always before a `(`.
    const AGGREGATIONS: &str =
        "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio";
    let s: Vec<char> = expr.chars().collect();
    let skip_to = |mut i: usize, close: char| {
        let mut quote = None;
        while i < s.len() {
            match (quote, s[i]) {
                (Some(_), '\\') => i += 1,
                (Some(q), c) if c == q => quote = None,
                (None, c @ ('"' | '\'' | '`')) => quote = Some(c),
                (None, c) if c == close => return i + 1,
                _ => {}
            }
            i += 1;
        }
        i
    };
    let next_char = |mut i: usize| {
        while i < s.len() && s[i].is_whitespace() {
            i += 1;
        }
        (i, s.get(i).copied())
    };
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_to(i + 1, c);
        } else if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c == '$' {
            i += 1;
            if s.get(i) == Some(&'{') {
                i = skip_to(i + 1, '}');
            } else {
                while i < s.len() && (s[i].is_alphanumeric() || s[i] == '_') {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == '.' && s.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            while i < s.len() && (s[i].is_alphanumeric() || s[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '_' || s[i] == ':') {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let (at, next) = next_char(i);
            let lower = word.to_ascii_lowercase();
            if LABEL_LISTS.contains(&lower.as_str()) {
                if next == Some('(') {
                    i = skip_to(at + 1, ')');
                }
            } else if KEYWORDS.contains(&lower.as_str())
                || AGGREGATIONS.split(' ').any(|a| a == lower)
                || next == Some('(')
            {
                // an operator keyword, or a function or aggregation
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL expression in the dashboard: panel targets and query variables.
fn dashboard_queries(d: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    for var in d["templating"]["list"].as_array().unwrap() {
        if var["type"] == "query" {
            let query = var["definition"].as_str().expect("query variables carry their definition");
            // label_values(metric{...}, label): only the first argument names a metric.
            let args = query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')).unwrap_or(query);
            let metric = args.rsplit_once(',').map_or(args, |(m, _)| m);
            out.push(metric.to_string());
        }
    }
    out
}

#[test]
fn the_promql_scanner_finds_metrics_and_nothing_else() {
    let expr = r#"sum by (outcome) (rate(a_total{outcome!~"x|y", instance=~"$instance"}[$__rate_interval]))
        / on(instance) group_left(node) b_bucket offset 5m + time() - (c > 0) * 1.5e3 or vector(0)"#;
    let want: BTreeSet<String> = ["a_total", "b_bucket", "c"].map(String::from).into();
    assert_eq!(metric_names(expr), want);
}

#[test]
fn the_dashboard_queries_only_series_iamlinkd_exports() {
    let d = dashboard();
    let exported = exported_series();
    let queries = dashboard_queries(&d);
    assert!(queries.len() >= 10, "a dashboard with panels: {queries:?}");
    let mut used = BTreeSet::new();
    for q in &queries {
        let names = metric_names(q);
        assert!(!names.is_empty(), "a query naming no metric: {q}");
        for name in names {
            assert!(exported.contains(&name), "{name} in `{q}` is not exported by iamlinkd: {exported:?}");
            used.insert(name);
        }
    }
    // Each exported family is on some panel (counters and histograms under any of their names).
    let text = exposition();
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|r| r.split(' ').next().unwrap()) {
        assert!(used.iter().any(|u| u.starts_with(family)), "no panel shows {family}");
    }
}

#[test]
fn the_dashboard_reads_the_prometheus_datasource_variable() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 39);
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(vars
        .iter()
        .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource" && v["query"] == "prometheus"));
    let mut panels = 0;
    for panel in d["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row") {
        panels += 1;
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {}", panel["title"]);
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {}", panel["title"]);
        }
    }
    assert!(panels >= 8);
    let ids: Vec<u64> = d["panels"].as_array().unwrap().iter().map(|p| p["id"].as_u64().expect("panel id")).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "panel ids are unique");
}
