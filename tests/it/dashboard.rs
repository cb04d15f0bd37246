//! `deploy/grafana-dashboard.json` queries only metrics that `/metrics` serves, filters every
//! query by the `job` and `instance` variables, and names its datasource only through the
//! `DS_PROMETHEUS` input, never by a uid of someone's Grafana.

use std::collections::BTreeSet;

use regex::Regex;
use serde_json::Value;

use crate::support::{TestApp, metrics_text};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana-dashboard.json");
const DATASOURCE: [&str; 2] = ["${DS_PROMETHEUS}", "$DS_PROMETHEUS"];

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).expect("deploy/grafana-dashboard.json");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// The panels, with those nested in collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// `(panel title, expr)` of every query: panel targets and template variables.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "panel {title:?}: a target without expr"
            );
            out.push((title.clone(), expr.to_owned()));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if variable["type"] == "query" {
            let name = variable["name"].as_str().unwrap_or("?");
            let query = match &variable["query"] {
                Value::String(q) => q.as_str(),
                q => q["query"].as_str().expect("a variable's query"),
            };
            out.push((format!("variable {name}"), query.to_owned()));
        }
    }
    out
}

/// Metric names in an expression: anything that starts like kabar's, in any case, so a
/// misspelling with a capital letter is caught as well.
fn metric_names(expr: &str) -> Vec<String> {
    let name = Regex::new(r"\bkabar_[a-zA-Z0-9_:]+").unwrap();
    name.find_iter(expr)
        .map(|m| m.as_str().to_owned())
        .collect()
}

/// Metric names with their types, from the `# TYPE` lines of the page.
fn types(page: &str) -> Vec<(String, String)> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some((name.to_owned(), kind.trim().to_owned()))
        })
        .collect()
}

/// Whether `name` is on the page: its own `# TYPE` line, or a histogram's series.
fn served(name: &str, types: &[(String, String)]) -> bool {
    let is = |metric: &str, kinds: &[&str]| {
        types
            .iter()
            .any(|(n, k)| n == metric && (kinds.is_empty() || kinds.contains(&k.as_str())))
    };
    if is(name, &[]) {
        return true;
    }
    if let Some(base) = name.strip_suffix("_bucket") {
        return is(base, &["histogram"]);
    }
    name.strip_suffix("_sum")
        .or_else(|| name.strip_suffix("_count"))
        .is_some_and(|base| is(base, &["histogram", "summary"]))
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_served() {
    let dashboard = dashboard();
    let queries = queries(&dashboard);
    let wanted: BTreeSet<String> = queries
        .iter()
        .flat_map(|(_, expr)| metric_names(expr))
        .collect();
    assert!(wanted.len() >= 10, "the dashboard queries only {wanted:?}");

    // Every metric prints its `# HELP` and `# TYPE` lines from the start, even labeled counters
    // that have no series before their first use, so a fresh kabar serves every name.
    let app = TestApp::start(vec![]).await;
    let page = metrics_text(app.http_addr).await;
    app.stop().await.expect("clean stop");
    let types = types(&page);
    assert!(!types.is_empty(), "no # TYPE line in\n{page}");

    let missing: Vec<String> = wanted
        .iter()
        .filter(|name| !served(name, &types))
        .map(|name| {
            let panels: BTreeSet<&str> = queries
                .iter()
                .filter(|(_, expr)| metric_names(expr).contains(name))
                .map(|(title, _)| title.as_str())
                .collect();
            format!("{name} (in {panels:?})")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics that /metrics does not serve:\n  {}\n\n/metrics:\n{page}",
        missing.join("\n  ")
    );
}

#[test]
fn every_panel_query_is_filtered_by_job_and_instance() {
    let dashboard = dashboard();
    let selector = Regex::new(r"\bkabar_[a-zA-Z0-9_:]+(\{[^}]*\})?").unwrap();
    let mut unfiltered = Vec::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        let targets = panel["targets"].as_array();
        if panel["type"] != "row" {
            assert!(
                targets.is_some_and(|t| !t.is_empty()),
                "panel {title:?} has no query"
            );
        }
        for target in targets.into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            for m in selector.find_iter(expr) {
                let m = m.as_str();
                if !(m.contains(r#"job=~"$job""#) && m.contains(r#"instance=~"$instance""#)) {
                    unfiltered.push(format!("{title:?}: {m}"));
                }
            }
        }
    }
    assert!(
        unfiltered.is_empty(),
        "selectors without job=~\"$job\" and instance=~\"$instance\":\n  {}",
        unfiltered.join("\n  ")
    );
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for name in ["DS_PROMETHEUS", "job", "instance"] {
        assert!(
            variables.contains(&name),
            "no {name} variable in {variables:?}"
        );
    }
}

/// Every `datasource` anywhere in the JSON, as `(path, value)`.
fn datasources<'a>(value: &'a Value, path: &str, out: &mut Vec<(String, &'a Value)>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let here = format!("{path}.{key}");
                if key == "datasource" {
                    out.push((here.clone(), v));
                }
                datasources(v, &here, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                datasources(v, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_datasource_is_the_ds_prometheus_input_not_a_uid() {
    let dashboard = dashboard();
    let inputs = dashboard["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "no DS_PROMETHEUS input in {inputs:?}"
    );
    // A datasource variable of the same name, so the file also works provisioned as it is
    // (Grafana fills `__inputs` only when importing).
    assert!(
        dashboard["templating"]["list"]
            .as_array()
            .expect("templating")
            .iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "no DS_PROMETHEUS datasource variable"
    );
    let mut found = Vec::new();
    datasources(&dashboard, "", &mut found);
    assert!(!found.is_empty(), "no datasource in the dashboard");
    let hard_coded: Vec<String> = found
        .iter()
        .filter(|(_, v)| {
            let reference = match v {
                Value::String(s) => Some(s.as_str()),
                Value::Object(o) => o.get("uid").and_then(Value::as_str),
                _ => None,
            };
            !reference.is_some_and(|r| DATASOURCE.contains(&r))
        })
        .map(|(path, v)| format!("{path} = {v}"))
        .collect();
    assert!(
        hard_coded.is_empty(),
        "datasources not given as ${{DS_PROMETHEUS}}:\n  {}",
        hard_coded.join("\n  ")
    );
}
