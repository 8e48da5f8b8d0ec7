//! The Grafana dashboard (deploy/grafana/model-loader.json): a dashboard Grafana can import, whose
//! every PromQL expression names only metrics, and labels, that the real binary exports.

use std::collections::{BTreeMap, BTreeSet};

use promql_parser::{
    parser::{self, Expr, LabelModifier},
    util::{ExprVisitor, walk_expr},
};
use serde_json::Value;
use tests::{binary::Binary, connect, fixture, load};

use super::ops::scrape;

/// Labels a Prometheus server adds to every series it scrapes.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

fn dashboard_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/model-loader.json")
}

/// The metric names and label names of a scrape (`name{a="1",b="2"}` → name: {a, b}).
fn exported(samples: &BTreeMap<String, f64>) -> BTreeMap<String, BTreeSet<String>> {
    let mut metrics: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for sample in samples.keys() {
        let (name, labels) = sample.split_once('{').unwrap_or((sample, ""));
        let names = metrics.entry(name.to_owned()).or_default();
        // Label values here have no `",`; names end at `=`.
        for pair in labels.trim_end_matches('}').split("\",").filter(|p| !p.is_empty()) {
            names.insert(pair.split_once('=').map_or(pair, |(n, _)| n).trim_start_matches(',').to_owned());
        }
    }
    metrics
}

/// What one expression names: its metrics, and the labels it matches on or groups by.
#[derive(Default, Debug)]
struct Names {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

impl ExprVisitor for Names {
    type Error = String;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        let selector = match expr {
            Expr::VectorSelector(vs) => Some(vs),
            Expr::MatrixSelector(ms) => Some(&ms.vs),
            _ => None,
        };
        if let Some(vs) = selector {
            let name = vs.name.clone().ok_or("a selector without a metric name")?;
            self.metrics.insert(name);
            self.labels.extend(vs.matchers.matchers.iter().map(|m| m.name.clone()));
        }
        if let Expr::Aggregate(aggregate) = expr
            && let Some(LabelModifier::Include(labels) | LabelModifier::Exclude(labels)) = &aggregate.modifier
        {
            self.labels.extend(labels.labels.iter().cloned());
        }
        Ok(true)
    }
}

/// `expr` with the dashboard's variables and Grafana's interval variables given sample values, so
/// that it parses as the PromQL Grafana sends.
fn substitute(expr: &str, variables: &[String]) -> Result<String, String> {
    let mut expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h");
    for name in variables {
        expr = expr.replace(&format!("${{{name}}}"), "x").replace(&format!("${name}"), "x");
    }
    match expr.contains('$') {
        true => Err(format!("an unknown variable in {expr}")),
        false => Ok(expr),
    }
}

/// Checks one PromQL expression against the exported metrics (name → its label names); returns
/// what it names, or what is wrong with it.
fn check_expr(expr: &str, variables: &[String], metrics: &BTreeMap<String, BTreeSet<String>>) -> Result<Names, String> {
    let parsed = parser::parse(&substitute(expr, variables)?).map_err(|e| format!("not PromQL: {expr}: {e}"))?;
    let mut names = Names::default();
    walk_expr(&mut names, &parsed).map_err(|e| format!("{e}: {expr}"))?;
    if names.metrics.is_empty() {
        return Err(format!("names no metric: {expr}"));
    }
    if let Some(metric) = names.metrics.iter().find(|m| !metrics.contains_key(*m)) {
        return Err(format!("{metric} is not exported (in {expr})"));
    }
    let known = labels_of(&names, metrics);
    if let Some(label) = names.labels.iter().find(|l| !known.contains(l.as_str())) {
        return Err(format!("no metric of {expr} has the label {label}"));
    }
    Ok(names)
}

/// The labels of the metrics an expression names, and those Prometheus adds.
fn labels_of<'a>(names: &Names, metrics: &'a BTreeMap<String, BTreeSet<String>>) -> BTreeSet<&'a str> {
    names.metrics.iter().flat_map(|m| metrics[m].iter().map(String::as_str)).chain(TARGET_LABELS).collect()
}

/// The structure Grafana needs to import it: a title and uid, a Prometheus datasource variable
/// every panel and target uses, panels with unique ids inside the 24-column grid and not
/// overlapping, each with targets with unique refIds. Returns the variables' names and every
/// query (a target's expression or a query variable's) with the legend it is shown with.
fn check_structure(dashboard: &Value) -> (Vec<String>, Vec<(String, String)>) {
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["uid"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    let variables = dashboard["templating"]["list"].as_array().expect("templating.list");
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .and_then(|v| v["name"].as_str())
        .expect("a Prometheus datasource variable");
    let uses_datasource =
        |v: &Value| v["type"] == "prometheus" && v["uid"].as_str() == Some(&format!("${{{datasource}}}"));
    let mut queries = Vec::new();
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        assert!(uses_datasource(&variable["datasource"]), "{variable}");
        let query = variable["query"]["query"].as_str().or(variable["query"].as_str()).expect("a query");
        // label_values(METRIC, LABEL): METRIC is an expression, LABEL one of its labels.
        let inner = query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')).expect("label_values()");
        let (metric, label) = inner.rsplit_once(',').expect("label_values(metric, label)");
        queries.push((metric.trim().to_owned(), format!("{{{{{}}}}}", label.trim())));
    }
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for panel in panels {
        let id = panel["id"].as_u64().expect("a numeric id");
        assert!(ids.insert(id), "id {id} twice");
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()), "panel {id} has a title");
        let grid = &panel["gridPos"];
        let [x, y, w, h] =
            ["x", "y", "w", "h"].map(|k| grid[k].as_u64().unwrap_or_else(|| panic!("panel {id}: gridPos.{k}")));
        assert!(w > 0 && h > 0 && x + w <= 24, "panel {id} fits the 24 columns");
        for cell in (x..x + w).flat_map(|cx| (y..y + h).map(move |cy| (cx, cy))) {
            assert!(cells.insert(cell), "panel {id} overlaps another at {cell:?}");
        }
        if panel["type"] == "row" {
            continue;
        }
        assert!(["timeseries", "stat", "table", "gauge", "bargauge"].contains(&panel["type"].as_str().unwrap_or("")));
        assert!(uses_datasource(&panel["datasource"]), "panel {id}'s datasource");
        let targets = panel["targets"].as_array().filter(|t| !t.is_empty()).expect("targets");
        let mut ref_ids = BTreeSet::new();
        for target in targets {
            assert!(ref_ids.insert(target["refId"].as_str().expect("refId")), "panel {id}: a refId twice");
            assert!(target.get("datasource").is_none_or(uses_datasource), "panel {id}'s target datasource");
            let expr = target["expr"].as_str().filter(|e| !e.is_empty()).expect("an expression");
            queries.push((expr.to_owned(), target["legendFormat"].as_str().unwrap_or("").to_owned()));
        }
    }
    let names = variables.iter().filter_map(|v| v["name"].as_str().map(str::to_owned)).collect();
    (names, queries)
}

/// The committed dashboard parses as a Grafana dashboard, and after a load (so the histograms
/// exist) and a refused call (so the auth counter does), every expression in it, and every label
/// it matches, groups by or shows in a legend, is one the real binary's `/metrics` exports.
#[tokio::test]
async fn the_dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(dashboard_path()).expect("read the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let (variables, queries) = check_structure(&dashboard);

    let tokens = tempfile::NamedTempFile::new().expect("tokens file");
    std::fs::write(tokens.path(), "admin:dashboard-secret\n").expect("write tokens");
    let models = fixture::repo_models_dir();
    let args = [
        "--model-root",
        models.to_str().expect("UTF-8"),
        "--metrics-listen",
        "127.0.0.1:0",
        "--auth-token-file",
        tokens.path().to_str().expect("UTF-8"),
    ];
    let server = Binary::start(&args, &[]).await;
    let metrics_addr = server.logged_addr("serving /metrics").await.to_string();
    let mut client = connect(server.addr).await;
    let refused = client.list_models(proto::v1::ListModelsRequest::default()).await;
    assert_eq!(refused.expect_err("no token").code(), tonic::Code::Unauthenticated);
    let mut request = tonic::Request::new(load("demo/tiny-sd"));
    request.metadata_mut().insert("authorization", "Bearer dashboard-secret".parse().expect("ASCII"));
    let mut stream = client.load_model(request).await.expect("LoadModel starts").into_inner();
    tests::rest_of(&mut stream).await.1.expect("the demo loads");
    let metrics = exported(&scrape(&metrics_addr).await);

    for (expr, legend) in &queries {
        let names = check_expr(expr, &variables, &metrics).unwrap_or_else(|e| panic!("{e}\nexported: {metrics:#?}"));
        let labels = labels_of(&names, &metrics);
        for shown in legend.split("{{").skip(1).filter_map(|rest| rest.split_once("}}").map(|(l, _)| l.trim())) {
            assert!(labels.contains(shown), "the legend {legend:?} shows {shown}, not a label of {expr}");
        }
    }
    // The areas the operators asked for are all there.
    let named: BTreeSet<&str> =
        queries.iter().flat_map(|(e, _)| e.split(|c: char| !(c.is_alphanumeric() || c == '_'))).collect();
    for metric in [
        "model_loader_loads_finished_total",
        "model_loader_load_duration_seconds_bucket",
        "model_loader_step_duration_seconds_bucket",
        "model_loader_loaded_bytes_total",
        "model_loader_download_bytes_total",
        "model_loader_device_used_bytes",
        "model_loader_device_reserved_bytes",
        "model_loader_device_budget_bytes",
        "model_loader_models",
        "model_loader_attached_clients",
        "model_loader_connections",
        "model_loader_watchers",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "model_loader_build_info",
    ] {
        assert!(named.contains(metric), "no panel shows {metric}");
    }
}

/// The check refuses an expression naming a metric the server does not export, a label none of
/// its metrics has, an unknown variable, or what is not PromQL (so the test above can fail).
#[test]
fn the_check_refuses_what_is_not_exported() {
    let metrics = BTreeMap::from([("up_total".to_owned(), BTreeSet::from(["state".to_owned()]))]);
    let vars = ["instance".to_owned()];
    let ok = check_expr(r#"sum by (state) (rate(up_total{instance=~"$instance"}[$__rate_interval]))"#, &vars, &metrics);
    assert_eq!(ok.expect("valid").metrics, BTreeSet::from(["up_total".to_owned()]));
    for bad in [
        r#"rate(down_total[5m])"#,
        r#"sum by (kind) (up_total)"#,
        r#"up_total{outcome="x"}"#,
        r#"rate(up_total[$nope])"#,
        r#"sum(rate(up_total[5m])"#,
    ] {
        assert!(check_expr(bad, &vars, &metrics).is_err(), "{bad} passed the check");
    }
}
