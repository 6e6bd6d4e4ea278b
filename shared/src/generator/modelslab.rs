//! The ModelsLab client (docs.modelslab.com, API v6). Every call is a JSON POST with the key in
//! the body. The answer's `status` decides: `success` carries output URLs, `processing` an id, an
//! `eta` and `future_links` to fetch later, `error` (or `failed`, in callbacks) a message.
//!
//! Outcomes are classified where they happen: HTTP 429 and 5xx, timeouts, broken connections and
//! unreadable answers are retryable; a rejected key, a validation error, an NSFW flag and any
//! `error` answer are fatal, and keep the provider's own message.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    Callback, Check, Downloader, GenerateError, GeneratedFile, Generation, Generator, Inputs,
    MediaKind, Progress, Submission,
};
use crate::{
    config::Secret,
    model::{Job, JobType},
};

#[derive(Debug, Clone)]
pub struct ModelsLabConfig {
    pub api_key: Secret,
    /// `https://modelslab.com` in production; a test server in tests.
    pub base_url: String,
    pub image_model: String,
    pub video_model: String,
    pub request_timeout: Duration,
}

pub struct ModelsLab {
    config: ModelsLabConfig,
    /// Made on first use: building an HTTP client with its TLS roots costs a cold start ~8 ms.
    client: std::sync::OnceLock<reqwest::Client>,
    downloader: Downloader,
}

/// An answer from any ModelsLab endpoint, or a callback body: they share one shape.
#[derive(Debug, Deserialize)]
struct Answer {
    status: Option<String>,
    #[serde(default, deserialize_with = "id_as_string")]
    id: Option<String>,
    #[serde(default)]
    output: Vec<String>,
    eta: Option<f64>,
    message: Option<Value>,
    /// Some legacy endpoints spell it this way; the docs say to read both.
    messege: Option<Value>,
    #[serde(default)]
    nsfw_content_detected: Option<Value>,
    retry_after: Option<f64>,
}

/// ModelsLab sends ids as numbers on some endpoints and as strings on others.
fn id_as_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    })
}

impl Answer {
    fn message(&self) -> String {
        let text = |v: &Option<Value>| match v {
            Some(Value::String(s)) => Some(s.clone()),
            // Validation errors come as a map of field to messages.
            Some(v @ (Value::Object(_) | Value::Array(_))) => Some(v.to_string()),
            _ => None,
        };
        text(&self.message)
            .or_else(|| text(&self.messege))
            .unwrap_or_else(|| "no message given".into())
    }

    fn nsfw(&self) -> bool {
        match &self.nsfw_content_detected {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s == "true",
            Some(Value::Array(items)) => items.iter().any(|v| v == &Value::Bool(true)),
            _ => false,
        }
    }

    fn eta(&self) -> Option<Duration> {
        self.eta
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(3600.0)))
    }
}

/// What an answer means, before any output is downloaded.
#[derive(Debug, PartialEq)]
enum Reading {
    Success(Vec<String>),
    Processing {
        id: Option<String>,
        eta: Option<Duration>,
    },
}

fn read(status: u16, body: &[u8]) -> Result<Reading, GenerateError> {
    let answer: Result<Answer, _> = serde_json::from_slice(body);
    if status == 429 {
        let wait = answer
            .as_ref()
            .ok()
            .and_then(|a| a.retry_after)
            .map(|s| format!(" (retry after {s} s)"))
            .unwrap_or_default();
        let message = answer
            .as_ref()
            .map(Answer::message)
            .unwrap_or_else(|_| "too many requests".into());
        return Err(GenerateError::Retryable(format!(
            "ModelsLab is rate limiting: {message}{wait}"
        )));
    }
    if status >= 500 {
        let message = answer
            .as_ref()
            .map(Answer::message)
            .unwrap_or_else(|_| snippet(body));
        return Err(GenerateError::Retryable(format!(
            "ModelsLab answered HTTP {status}: {message}"
        )));
    }
    let answer = answer.map_err(|e| {
        GenerateError::Retryable(format!(
            "ModelsLab answered HTTP {status} with a body that is not its JSON ({e}): {}",
            snippet(body)
        ))
    })?;
    match answer.status.as_deref() {
        Some("success") if status < 300 => {
            if answer.nsfw() {
                return Err(GenerateError::Fatal(
                    "ModelsLab flagged the output as NSFW content; nothing was stored".into(),
                ));
            }
            if answer.output.is_empty() {
                return Err(GenerateError::Fatal(
                    "ModelsLab reported success without any output".into(),
                ));
            }
            Ok(Reading::Success(answer.output))
        }
        Some("processing" | "queued") if status < 300 => Ok(Reading::Processing {
            eta: answer.eta(),
            id: answer.id,
        }),
        Some("error" | "failed") | None if status >= 400 => Err(GenerateError::Fatal(format!(
            "ModelsLab rejected the request (HTTP {status}): {}",
            answer.message()
        ))),
        Some("error" | "failed") => Err(GenerateError::Fatal(format!(
            "ModelsLab reported an error: {}",
            answer.message()
        ))),
        Some(other) if status >= 400 => Err(GenerateError::Fatal(format!(
            "ModelsLab rejected the request (HTTP {status}, status {other:?}): {}",
            answer.message()
        ))),
        other => Err(GenerateError::Retryable(format!(
            "ModelsLab answered an unknown status {other:?} (HTTP {status})"
        ))),
    }
}

/// Reads an answer for its verdict only, without downloading anything (the fuzz seam).
pub fn read_answer(status: u16, body: &[u8]) -> Result<(), GenerateError> {
    read(status, body).map(|_| ())
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        s.push('…');
    }
    s
}

impl ModelsLab {
    pub fn new(config: ModelsLabConfig, downloader: Downloader) -> Self {
        Self {
            config,
            client: std::sync::OnceLock::new(),
            downloader,
        }
    }

    fn client(&self) -> &reqwest::Client {
        self.client.get_or_init(|| {
            reqwest::Client::builder()
                .timeout(self.config.request_timeout)
                .connect_timeout(self.config.request_timeout.min(Duration::from_secs(10)))
                .build()
                .expect("a reqwest client with static settings builds")
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.base_url.trim_end_matches('/'))
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Reading, GenerateError> {
        let response = self
            .client()
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(transport)?;
        read(status, &bytes)
    }

    /// The request that starts `job`, and the path it goes to.
    fn request(
        &self,
        job: &Job,
        inputs: &Inputs,
        callback: Option<&Callback>,
    ) -> Result<(&'static str, Value), GenerateError> {
        let param = |name: &str| job.params.get(name).and_then(Value::as_str).unwrap_or("");
        let prompt = param("prompt");
        let negative = param("negativePrompt");
        let mut body = match job.job_type {
            JobType::CharacterImage => {
                let prompt = if prompt.is_empty() {
                    "character portrait, full body, consistent design"
                } else {
                    prompt
                };
                match &inputs.reference_image_url {
                    Some(init) => json!({
                        "model_id": self.config.image_model, "prompt": prompt,
                        "negative_prompt": negative, "init_image": init, "strength": 0.7,
                        "samples": 1, "safety_checker": true,
                    }),
                    None => json!({
                        "model_id": self.config.image_model, "prompt": prompt,
                        "negative_prompt": negative, "width": 1024, "height": 1024,
                        "samples": 1, "safety_checker": true,
                    }),
                }
            }
            JobType::Moodboard => {
                let count = job
                    .params
                    .get("count")
                    .and_then(Value::as_u64)
                    .unwrap_or(4)
                    .clamp(1, 4);
                json!({
                    "model_id": self.config.image_model,
                    "prompt": if prompt.is_empty() { "moodboard, cohesive palette, concept art" } else { prompt },
                    "negative_prompt": negative, "width": 768, "height": 768,
                    "samples": count, "safety_checker": true,
                })
            }
            JobType::Animation => {
                let init = inputs.source_image_url.as_ref().ok_or_else(|| {
                    GenerateError::Fatal(
                        "an animation needs its source image, and it was not found among the user's media"
                            .into(),
                    )
                })?;
                json!({
                    "model_id": self.config.video_model, "init_image": init,
                    "prompt": prompt, "negative_prompt": negative,
                    "height": 512, "width": 512, "num_frames": 25, "output_type": "mp4",
                })
            }
        };
        let path = match (job.job_type, &inputs.reference_image_url) {
            (JobType::Animation, _) => "/api/v6/video/img2video",
            (JobType::CharacterImage, Some(_)) => "/api/v6/images/img2img",
            _ => "/api/v6/images/text2img",
        };
        body["key"] = json!(self.config.api_key.expose());
        if let Some(cb) = callback {
            body["webhook"] = json!(cb.url);
            body["track_id"] = json!(cb.track_id);
        }
        Ok((path, body))
    }

    fn fetch_path(job_type: JobType, id: &str) -> String {
        match job_type {
            JobType::Animation => format!("/api/v6/video/fetch/{id}"),
            _ => format!("/api/v6/images/fetch/{id}"),
        }
    }

    async fn download_all(
        &self,
        job_type: JobType,
        urls: &[String],
    ) -> Result<Vec<GeneratedFile>, GenerateError> {
        let kind = match job_type {
            JobType::Animation => MediaKind::Video,
            _ => MediaKind::Image,
        };
        // The cap holds for a job's files together: they are all in memory until stored.
        let mut files: Vec<GeneratedFile> = Vec::with_capacity(urls.len());
        for url in urls {
            let used: u64 = files.iter().map(|f| f.bytes.len() as u64).sum();
            files.push(self.downloader.fetch_within(url, kind, used).await?);
        }
        Ok(files)
    }

    fn settle(reading: Reading) -> Check {
        match reading {
            Reading::Success(urls) => Check::Ready(urls),
            Reading::Processing { eta, .. } => Check::Pending { eta },
        }
    }
}

fn transport(e: reqwest::Error) -> GenerateError {
    // reqwest's message names the URL, which never carries the key (it goes in the body).
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    GenerateError::Retryable(format!("ModelsLab {what}: {}", crate::telemetry::chain(&e)))
}

#[async_trait]
impl Generator for ModelsLab {
    fn model(&self) -> &str {
        &self.config.image_model
    }

    fn uses_inputs(&self) -> bool {
        true
    }

    async fn generate(
        &self,
        job: &Job,
        inputs: &Inputs,
        progress: &Progress,
        callback: Option<&Callback>,
    ) -> Result<Generation, GenerateError> {
        let (path, body) = self.request(job, inputs, callback)?;
        progress.report(5);
        match self.post(path, &body).await? {
            Reading::Success(urls) => Ok(Generation::Done(
                self.download_all(job.job_type, &urls).await?,
            )),
            Reading::Processing { id: Some(id), eta } => Ok(Generation::Submitted(Submission {
                external_id: id,
                eta,
            })),
            Reading::Processing { id: None, .. } => Err(GenerateError::Fatal(
                "ModelsLab answered processing without a request id to fetch it by".into(),
            )),
        }
    }

    async fn check(&self, job: &Job, external_id: &str) -> Result<Check, GenerateError> {
        let path = Self::fetch_path(job.job_type, external_id);
        let reading = self
            .post(&path, &json!({ "key": self.config.api_key.expose() }))
            .await?;
        Ok(Self::settle(reading))
    }

    async fn collect(
        &self,
        job: &Job,
        outputs: &[String],
    ) -> Result<Vec<GeneratedFile>, GenerateError> {
        self.download_all(job.job_type, outputs).await
    }

    async fn check_callback(
        &self,
        job: &Job,
        external_id: &str,
        body: &[u8],
    ) -> Result<Check, GenerateError> {
        match read(200, body) {
            Ok(reading) => Ok(Self::settle(reading)),
            // A callback we cannot read is not the provider's verdict: ask it directly.
            Err(GenerateError::Retryable(_)) => self.check(job, external_id).await,
            Err(fatal) => Err(fatal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fatal(r: Result<Reading, GenerateError>) -> String {
        match r {
            Err(GenerateError::Fatal(m)) => m,
            other => panic!("expected a fatal error, got {other:?}"),
        }
    }

    fn retryable(r: Result<Reading, GenerateError>) -> String {
        match r {
            Err(GenerateError::Retryable(m)) => m,
            other => panic!("expected a retryable error, got {other:?}"),
        }
    }

    #[test]
    fn answers_are_classified_as_the_docs_describe() {
        assert_eq!(
            read(
                200,
                br#"{"status":"success","id":7,"output":["https://x/a.png"]}"#
            )
            .unwrap(),
            Reading::Success(vec!["https://x/a.png".into()])
        );
        assert_eq!(
            read(200, br#"{"status":"processing","id":"abc123-def456","eta":30,"message":"Your request is being processed"}"#).unwrap(),
            Reading::Processing { id: Some("abc123-def456".into()), eta: Some(Duration::from_secs(30)) }
        );
        assert!(fatal(read(
            401,
            br#"{"status":"error","message":"Invalid API key"}"#
        ))
        .contains("Invalid API key"));
        assert!(fatal(read(
            200,
            br#"{"status":"error","messege":"Model not found: x"}"#
        ))
        .contains("Model not found: x"));
        assert!(fatal(read(
            200,
            br#"{"status":"success","output":["https://x/a.png"],"nsfw_content_detected":true}"#
        ))
        .contains("NSFW"));
        assert!(retryable(read(
            429,
            br#"{"status":"error","message":"Rate limit exceeded. Maximum 5 queued requests allowed.","retry_after":30}"#
        ))
        .contains("retry after 30"));
        assert!(retryable(read(503, b"<html>bad gateway</html>")).contains("503"));
        assert!(retryable(read(200, b"{not json")).contains("not its JSON"));
    }
}
