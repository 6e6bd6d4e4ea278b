//! The EMF lines the service emits, checked against the Embedded Metric Format specification:
//! https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html

use std::collections::HashMap;

use lambda_http::aws_lambda_events::sqs::SqsMessage;
use serde_json::Value;
use uuid::Uuid;

use crate::support::*;

/// CloudWatch's standard units, the only values `Unit` may take.
const UNITS: &[&str] = &[
    "Seconds",
    "Microseconds",
    "Milliseconds",
    "Bytes",
    "Kilobytes",
    "Megabytes",
    "Gigabytes",
    "Terabytes",
    "Bits",
    "Kilobits",
    "Megabits",
    "Gigabits",
    "Terabits",
    "Percent",
    "Count",
    "Bytes/Second",
    "Kilobytes/Second",
    "Megabytes/Second",
    "Gigabytes/Second",
    "Terabytes/Second",
    "Bits/Second",
    "Kilobits/Second",
    "Megabits/Second",
    "Gigabits/Second",
    "Terabits/Second",
    "Count/Second",
    "None",
];

/// One metric value as CloudWatch would extract it: (namespace, name, dimensions, value, unit).
#[derive(Debug, Clone, PartialEq)]
struct Datum {
    namespace: String,
    name: String,
    dimensions: Vec<(String, String)>,
    value: f64,
    unit: String,
}

/// Validates one line against the EMF specification and extracts its metrics. Panics with the
/// rule that was broken.
fn parse_emf(line: &str) -> Vec<Datum> {
    let root: Value = serde_json::from_str(line).expect("an EMF line is one JSON object");
    let root = root.as_object().expect("the root is an object");
    let aws = root["_aws"].as_object().expect("_aws is an object");
    let timestamp = aws["Timestamp"]
        .as_i64()
        .expect("_aws.Timestamp is an integer (ms since epoch)");
    let now = chrono::Utc::now().timestamp_millis();
    assert!(
        (now - timestamp).abs() < 3_600_000,
        "Timestamp {timestamp} is not a current epoch in ms"
    );
    let directives = aws["CloudWatchMetrics"]
        .as_array()
        .expect("CloudWatchMetrics is an array");
    assert!(!directives.is_empty());
    let mut data = Vec::new();
    for directive in directives {
        let namespace = directive["Namespace"]
            .as_str()
            .expect("Namespace is a string");
        assert!((1..=255).contains(&namespace.len()), "Namespace length");
        assert!(
            !namespace.starts_with(':') && !namespace.starts_with("AWS/"),
            "custom namespaces cannot be AWS/"
        );
        let sets = directive["Dimensions"]
            .as_array()
            .expect("Dimensions is an array of dimension sets");
        assert!(
            !sets.is_empty(),
            "at least one dimension set (possibly empty)"
        );
        let metrics = directive["Metrics"]
            .as_array()
            .expect("Metrics is an array");
        assert!(
            (1..=100).contains(&metrics.len()),
            "1 to 100 metric definitions"
        );
        for set in sets {
            let names = set.as_array().expect("a dimension set is an array");
            assert!(names.len() <= 30, "at most 30 dimensions per set");
            let dimensions: Vec<(String, String)> = names
                .iter()
                .map(|n| {
                    let n = n.as_str().expect("dimension names are strings");
                    let v = root.get(n).and_then(Value::as_str).unwrap_or_else(|| {
                        panic!("dimension {n} must be a string member at the root")
                    });
                    assert!(!v.is_empty() && v.len() <= 1024, "dimension value length");
                    (n.to_owned(), v.to_owned())
                })
                .collect();
            for definition in metrics {
                let name = definition["Name"]
                    .as_str()
                    .expect("metric Name is a string");
                assert!((1..=255).contains(&name.len()));
                let unit = definition
                    .get("Unit")
                    .and_then(Value::as_str)
                    .unwrap_or("None");
                assert!(
                    UNITS.contains(&unit),
                    "unit {unit} is not a CloudWatch unit"
                );
                let value = root
                    .get(name)
                    .and_then(Value::as_f64)
                    .unwrap_or_else(|| panic!("metric {name} must have a number at the root"));
                assert!(value.is_finite());
                data.push(Datum {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    dimensions: dimensions.clone(),
                    value,
                    unit: unit.to_owned(),
                });
            }
        }
    }
    data
}

fn emitted(t: &TestApp) -> Vec<Datum> {
    t.emitted
        .lock()
        .unwrap()
        .iter()
        .flat_map(|l| parse_emf(l))
        .collect()
}

fn sum(data: &[Datum], name: &str, dims: &[(&str, &str)]) -> f64 {
    data.iter()
        .filter(|d| d.name == name)
        .filter(|d| {
            let have: HashMap<&str, &str> = d
                .dimensions
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            dims.len() == have.len() && dims.iter().all(|(k, v)| have.get(k) == Some(v))
        })
        .map(|d| d.value)
        .sum()
}

fn record(id: Uuid) -> SqsMessage {
    sqs_record(&format!("m-{id}"), &job_message(id))
}

#[tokio::test]
async fn a_jobs_life_is_counted_by_type_in_valid_emf() {
    let t = TestApp::embedded().await;
    let alice = user("alice", None);
    let mut ids = Vec::new();
    for prompt in ["fine", "simulate:fail"] {
        let body = format!(
            r#"{{"moodboardId":"2c3d4e5f-6071-4829-8b3c-4d5e6f7a8b9c","prompt":"{prompt}"}}"#
        );
        let (_, answer) = call(
            &t.app,
            api_request("POST", "/api/generate/moodboard", Some(&alice), Some(&body)),
        )
        .await;
        ids.push(answer["jobId"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    shared::worker::handle_sqs(&t.app, batch(ids.iter().map(|id| record(*id)).collect())).await;
    let cancelled = Uuid::now_v7();
    t.insert_job(cancelled, &alice, "x").await;
    call(
        &t.app,
        api_request(
            "POST",
            &format!("/api/generate/cancel/{cancelled}"),
            Some(&alice),
            None,
        ),
    )
    .await;

    let data = emitted(&t);
    assert!(data.iter().all(|d| d.namespace == "MediaJobs"));
    let moodboard = [("JobType", "moodboard")];
    assert_eq!(sum(&data, "JobsEnqueued", &moodboard), 2.0);
    assert_eq!(sum(&data, "DirectAdmissions", &moodboard), 2.0);
    assert_eq!(sum(&data, "JobsStarted", &moodboard), 2.0);
    assert_eq!(sum(&data, "JobsCompleted", &moodboard), 1.0);
    assert_eq!(sum(&data, "JobsFailed", &moodboard), 1.0);
    assert_eq!(
        sum(
            &data,
            "ProviderErrors",
            &[("JobType", "moodboard"), ("ErrorKind", "fatal")]
        ),
        1.0
    );
    assert_eq!(
        sum(&data, "JobsCancelled", &[("JobType", "character-image")]),
        1.0
    );
    let run_times: Vec<&Datum> = data.iter().filter(|d| d.name == "RunTime").collect();
    assert_eq!(run_times.len(), 2);
    assert!(run_times
        .iter()
        .all(|d| d.unit == "Milliseconds" && d.value >= 0.0));
    assert!(data
        .iter()
        .any(|d| d.name == "QueueWait" && d.unit == "Milliseconds" && d.value >= 0.0));
}

#[tokio::test]
async fn the_poller_reports_active_queued_and_rescued_jobs() {
    let t = TestApp::embedded().await;
    let alice = user("alice", None);
    let (live, dead, waiting) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    for id in [live, dead, waiting] {
        t.insert_job(id, &alice, "x").await;
    }
    claim(&t, live).await;
    claim(&t, dead).await;
    let conn = t.db.pool.get().await.unwrap();
    conn.execute(
        "UPDATE generation_jobs SET lease_expires_at = now() - interval '1 minute' WHERE id = $1",
        &[&dead],
    )
    .await
    .unwrap();
    let event: lambda_http::aws_lambda_events::eventbridge::EventBridgeEvent<Value> =
        serde_json::from_str(include_str!("../../../events/poller-schedule.json")).unwrap();
    shared::poller::handle_schedule(&t.app, event)
        .await
        .unwrap();

    let data = emitted(&t);
    assert_eq!(sum(&data, "ActiveJobs", &[]), 1.0);
    assert_eq!(sum(&data, "QueuedJobs", &[]), 2.0);
    assert_eq!(sum(&data, "ExpiredLeases", &[]), 1.0);
    assert_eq!(sum(&data, "Rescues", &[]), 1.0);
    assert_eq!(sum(&data, "RescueFailures", &[]), 0.0);
}

#[test]
fn a_cold_start_is_one_count_under_its_function() {
    let (metrics, lines) = shared::metrics::Metrics::capturing();
    metrics.cold_start("worker");
    let data: Vec<Datum> = lines
        .lock()
        .unwrap()
        .iter()
        .flat_map(|l| parse_emf(l))
        .collect();
    assert_eq!(
        data,
        vec![Datum {
            namespace: "MediaJobs".into(),
            name: "ColdStarts".into(),
            dimensions: vec![("Function".into(), "worker".into())],
            value: 1.0,
            unit: "Count".into(),
        }]
    );
}

#[test]
fn the_checker_rejects_lines_that_break_the_specification() {
    let good = r#"{"_aws":{"Timestamp":TS,"CloudWatchMetrics":[{"Namespace":"MediaJobs","Dimensions":[["JobType"]],"Metrics":[{"Name":"JobsEnqueued","Unit":"Count"}]}]},"JobType":"moodboard","JobsEnqueued":1}"#
        .replace("TS", &chrono::Utc::now().timestamp_millis().to_string());
    assert_eq!(parse_emf(&good).len(), 1);
    for broken in [
        good.replace(r#""JobType":"moodboard","#, ""), // dimension missing at the root
        good.replace(r#""JobsEnqueued":1"#, r#""JobsEnqueued":"1""#), // value not a number
        good.replace(r#""Unit":"Count""#, r#""Unit":"Jobs""#), // not a CloudWatch unit
        good.replace(r#""Namespace":"MediaJobs""#, r#""Namespace":"AWS/Lambda""#),
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_emf(&broken)).is_err(),
            "accepted: {broken}"
        );
    }
}
