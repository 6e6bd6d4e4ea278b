//! Invariants of template.yaml that cfn-lint and `sam validate` cannot see.

use std::{collections::BTreeSet, path::PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn template() -> Yaml {
    let text = std::fs::read_to_string(root().join("template.yaml")).unwrap();
    YamlLoader::load_from_str(&text)
        .expect("template.yaml parses")
        .remove(0)
}

fn resources_of_type<'a>(t: &'a Yaml, kind: &str) -> Vec<(&'a str, &'a Yaml)> {
    t["Resources"]
        .as_hash()
        .unwrap()
        .iter()
        .filter(|(_, r)| r["Type"].as_str() == Some(kind))
        .map(|(name, r)| (name.as_str().unwrap(), r))
        .collect()
}

fn int(y: &Yaml) -> i64 {
    y.as_i64()
        .unwrap_or_else(|| panic!("expected a number, got {y:?}"))
}

/// A tagged scalar (`!Ref X`, `!GetAtt X.Y`) loads as its plain text here: enough to compare.
fn text(y: &Yaml) -> String {
    match y {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

#[test]
fn the_queue_hides_a_message_for_at_least_six_worker_timeouts() {
    let t = template();
    let worker_timeout = int(&t["Resources"]["WorkerFunction"]["Properties"]["Timeout"]);
    let visibility = int(&t["Resources"]["JobsQueue"]["Properties"]["VisibilityTimeout"]);
    assert!(
        visibility >= 6 * worker_timeout,
        "visibility {visibility}s < 6 x {worker_timeout}s"
    );
}

#[test]
fn max_receive_count_is_the_one_the_reliability_design_needs() {
    let t = template();
    let count = int(&t["Resources"]["JobsQueue"]["Properties"]["RedrivePolicy"]["maxReceiveCount"]);
    assert_eq!(count as u32, shared::worker::MAX_RECEIVE_COUNT);
    // That many deferrals (each at most the worker's own backoff) cover a day of waiting for a slot.
    let tolerated: f64 = (1..count as i32)
        .map(|n| shared::worker::backoff(n, 0.0).as_secs_f64())
        .sum();
    assert!(
        tolerated >= 86_400.0,
        "only {tolerated}s of throttling before the DLQ"
    );
}

#[test]
fn the_worker_reports_partial_batch_failures_and_scales_to_the_slot_count() {
    let t = template();
    let event = &t["Resources"]["WorkerFunction"]["Properties"]["Events"]["JobsQueueMessages"]
        ["Properties"];
    let types: Vec<&str> = event["FunctionResponseTypes"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(types, ["ReportBatchItemFailures"]);
    assert_eq!(
        text(&event["ScalingConfig"]["MaximumConcurrency"]),
        "MaxConcurrentJobs"
    );
    assert!(
        int(&t["Parameters"]["MaxConcurrentJobs"]["MinValue"]) >= 2,
        "Lambda's minimum MaximumConcurrency is 2"
    );
    assert!(
        int(&t["Parameters"]["MaxConcurrentJobs"]["MaxValue"]) <= 1000,
        "job_slots has 1000 rows"
    );
}

#[test]
fn every_function_is_a_workspace_binary_and_has_an_events_fixture() {
    let t = template();
    let fixtures: Vec<serde_json::Value> = std::fs::read_dir(root().join("events"))
        .unwrap()
        .map(|e| {
            serde_json::from_str(&std::fs::read_to_string(e.unwrap().path()).unwrap()).unwrap()
        })
        .collect();
    let functions = resources_of_type(&t, "AWS::Serverless::Function");
    assert_eq!(functions.len(), 4);
    for (name, function) in functions {
        assert_eq!(
            function["Metadata"]["BuildMethod"].as_str(),
            Some("rust-cargolambda"),
            "{name}"
        );
        let binary = function["Metadata"]["BuildProperties"]["Binary"]
            .as_str()
            .unwrap();
        let manifest =
            std::fs::read_to_string(root().join("functions").join(binary).join("Cargo.toml"))
                .unwrap_or_else(|_| panic!("{name}: no functions/{binary}/Cargo.toml"));
        assert!(
            manifest.contains(&format!("name = \"{binary}\"")),
            "{name}: package {binary}"
        );
        assert!(root()
            .join("functions")
            .join(binary)
            .join("src/main.rs")
            .exists());

        let events = function["Properties"]["Events"].as_hash().unwrap();
        let covered = events.values().all(|event| {
            let props = &event["Properties"];
            match event["Type"].as_str().unwrap() {
                "HttpApi" => {
                    let route = format!(
                        "{} {}",
                        props["Method"].as_str().unwrap(),
                        props["Path"].as_str().unwrap()
                    );
                    fixtures
                        .iter()
                        .any(|f| f["routeKey"].as_str() == Some(route.as_str()))
                }
                "SQS" => fixtures
                    .iter()
                    .any(|f| f["Records"][0]["eventSource"] == "aws:sqs"),
                "Schedule" => fixtures
                    .iter()
                    .any(|f| f["detail-type"] == "Scheduled Event"),
                other => panic!("{name}: no fixture rule for {other} events"),
            }
        });
        assert!(covered, "{name}: some event has no events/*.json fixture");
    }
}

#[test]
fn the_routes_in_the_template_are_the_routes_the_router_serves() {
    let t = template();
    let mut routes = BTreeSet::new();
    for (_, function) in resources_of_type(&t, "AWS::Serverless::Function") {
        for event in function["Properties"]["Events"].as_hash().unwrap().values() {
            if event["Type"].as_str() == Some("HttpApi") {
                let p = &event["Properties"];
                routes.insert(format!(
                    "{} {}",
                    p["Method"].as_str().unwrap(),
                    p["Path"].as_str().unwrap()
                ));
            }
        }
    }
    let served: BTreeSet<String> = shared::api::ROUTES.iter().map(|r| r.to_string()).collect();
    assert_eq!(routes, served);
}

#[test]
fn the_dead_letter_queue_and_the_failure_modes_have_alarms() {
    let t = template();
    let alarms = resources_of_type(&t, "AWS::CloudWatch::Alarm");
    let watches = |metric: &str, dimension: Option<&str>| {
        alarms.iter().any(|(_, a)| {
            let p = &a["Properties"];
            p["MetricName"].as_str() == Some(metric)
                && dimension.is_none_or(|d| {
                    p["Dimensions"]
                        .as_vec()
                        .is_some_and(|ds| ds.iter().any(|x| text(&x["Value"]).starts_with(d)))
                })
        })
    };
    assert!(
        watches(
            "ApproximateNumberOfMessagesVisible",
            Some("DeadLetterQueue")
        ),
        "DLQ not empty"
    );
    assert!(
        watches("ApproximateAgeOfOldestMessage", Some("JobsQueue")),
        "oldest message age"
    );
    assert!(watches("Errors", Some("WorkerFunction")), "worker errors");
    assert!(watches("5xx", Some("HttpApi")), "API 5xx");
    assert!(
        watches("ExpiredLeases", None),
        "jobs stuck past their lease"
    );
}

#[test]
fn the_dashboard_body_is_valid_json_once_substituted() {
    let t = template();
    let sub = &t["Resources"]["Dashboard"]["Properties"]["DashboardBody"];
    // `!Sub [body, vars]` loads as a list whose first item is the body.
    let body = sub
        .as_vec()
        .map(|v| v[0].as_str().unwrap().to_owned())
        .unwrap_or_else(|| text(sub));
    let mut substituted = String::new();
    let mut rest = body.as_str();
    while let Some(start) = rest.find("${") {
        substituted.push_str(&rest[..start]);
        let end = rest[start..].find('}').unwrap();
        substituted.push_str("placeholder");
        rest = &rest[start + end + 1..];
    }
    substituted.push_str(rest);
    let dashboard: serde_json::Value = serde_json::from_str(&substituted).expect("dashboard JSON");
    assert!(dashboard["widgets"]
        .as_array()
        .is_some_and(|w| w.len() >= 4));
}
