//! CloudWatch metrics as Embedded Metric Format (EMF) lines on stdout: Lambda's log pipeline
//! turns each line into metrics, so there is no API call and no extra latency per job.
//! Format: https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use serde_json::{json, Map, Value};

use crate::model::JobType;

pub const NAMESPACE: &str = "MediaJobs";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
        }
    }
}

#[derive(Clone)]
enum Sink {
    Off,
    Stdout,
    Capture(Arc<Mutex<Vec<String>>>),
}

/// Where metrics go: stdout on Lambda, nowhere in the local runner, a buffer in tests.
#[derive(Clone)]
pub struct Metrics {
    sink: Sink,
}

impl Metrics {
    pub fn off() -> Self {
        Self { sink: Sink::Off }
    }

    pub fn stdout() -> Self {
        Self { sink: Sink::Stdout }
    }

    /// EMF on Lambda, off elsewhere (the local runner's console is for people).
    pub fn from_env() -> Self {
        if std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some() {
            Self::stdout()
        } else {
            Self::off()
        }
    }

    /// Keeps every line, for tests that check what was emitted.
    pub fn capturing() -> (Self, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        (
            Self {
                sink: Sink::Capture(lines.clone()),
            },
            lines,
        )
    }

    /// Emits one EMF line: `values` under one dimension set made of `dimensions`.
    pub fn emit(&self, dimensions: &[(&str, &str)], values: &[(&str, f64, Unit)]) {
        if matches!(self.sink, Sink::Off) || values.is_empty() {
            return;
        }
        let line = emf_line(chrono::Utc::now().timestamp_millis(), dimensions, values).to_string();
        match &self.sink {
            Sink::Off => {}
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
            }
            Sink::Capture(lines) => lines.lock().expect("metrics buffer").push(line),
        }
    }

    pub fn job_enqueued(&self, job_type: JobType, direct: bool) {
        self.emit(
            &[("JobType", job_type.as_str())],
            &[
                ("JobsEnqueued", 1.0, Unit::Count),
                (
                    "DirectAdmissions",
                    if direct { 1.0 } else { 0.0 },
                    Unit::Count,
                ),
            ],
        );
    }

    pub fn job_started(&self, job_type: JobType, queue_wait_ms: f64) {
        self.emit(
            &[("JobType", job_type.as_str())],
            &[
                ("JobsStarted", 1.0, Unit::Count),
                ("QueueWait", queue_wait_ms.max(0.0), Unit::Milliseconds),
            ],
        );
    }

    /// A job reached `metric` (JobsCompleted, JobsFailed, JobsRetried, JobsSuperseded) after
    /// running for `run_ms`.
    pub fn job_settled(&self, job_type: JobType, metric: &str, run_ms: f64) {
        self.emit(
            &[("JobType", job_type.as_str())],
            &[
                (metric, 1.0, Unit::Count),
                ("RunTime", run_ms.max(0.0), Unit::Milliseconds),
            ],
        );
    }

    pub fn job_cancelled(&self, job_type: JobType) {
        self.emit(
            &[("JobType", job_type.as_str())],
            &[("JobsCancelled", 1.0, Unit::Count)],
        );
    }

    pub fn provider_error(&self, job_type: JobType, retryable: bool) {
        self.emit(
            &[
                ("JobType", job_type.as_str()),
                ("ErrorKind", if retryable { "retryable" } else { "fatal" }),
            ],
            &[("ProviderErrors", 1.0, Unit::Count)],
        );
    }

    pub fn poller_tick(&self, tick: &PollerTick) {
        self.emit(
            &[],
            &[
                ("ActiveJobs", tick.active as f64, Unit::Count),
                ("QueuedJobs", tick.queued as f64, Unit::Count),
                ("ExpiredLeases", tick.expired as f64, Unit::Count),
                ("Rescues", tick.rescued as f64, Unit::Count),
                ("RescueFailures", tick.rescue_failed as f64, Unit::Count),
                ("Redispatched", tick.redispatched as f64, Unit::Count),
            ],
        );
    }

    pub fn cold_start(&self, function: &str) {
        self.emit(
            &[("Function", function)],
            &[("ColdStarts", 1.0, Unit::Count)],
        );
    }
}

/// What the poller saw and did in one tick.
#[derive(Debug, Default, Clone, Copy)]
pub struct PollerTick {
    pub active: i64,
    pub queued: i64,
    pub expired: u32,
    pub rescued: u32,
    pub rescue_failed: u32,
    pub redispatched: u32,
}

fn emf_line(timestamp_ms: i64, dimensions: &[(&str, &str)], values: &[(&str, f64, Unit)]) -> Value {
    let mut root = Map::new();
    for (name, value) in dimensions {
        root.insert((*name).to_owned(), json!(value));
    }
    for (name, value, _) in values {
        root.insert((*name).to_owned(), json!(value));
    }
    let dimension_set: Vec<&str> = dimensions.iter().map(|(name, _)| *name).collect();
    let definitions: Vec<Value> = values
        .iter()
        .map(|(name, _, unit)| json!({ "Name": name, "Unit": unit.as_str() }))
        .collect();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [dimension_set],
                "Metrics": definitions,
            }],
        }),
    );
    Value::Object(root)
}
