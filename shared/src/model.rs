//! The job domain: states, types and the records the API shows.

use chrono::{DateTime, Utc};
use postgres_types::{FromSql, ToSql};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Mirrors the Postgres enum `job_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSql, FromSql)]
#[postgres(name = "job_status")]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    #[postgres(name = "queued")]
    Queued,
    #[postgres(name = "processing")]
    Processing,
    #[postgres(name = "completed")]
    Completed,
    #[postgres(name = "failed")]
    Failed,
    #[postgres(name = "cancelled")]
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Processing,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Processing => "processing",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobType {
    CharacterImage,
    Moodboard,
    Animation,
}

impl JobType {
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::CharacterImage => "character-image",
            JobType::Moodboard => "moodboard",
            JobType::Animation => "animation",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "character-image" => Some(JobType::CharacterImage),
            "moodboard" => Some(JobType::Moodboard),
            "animation" => Some(JobType::Animation),
            _ => None,
        }
    }
}

/// Who is calling, as established by the JWT authorizer (or the local runner's verifier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub tenant_id: Option<String>,
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: Uuid,
    pub user_id: String,
    pub tenant_id: Option<String>,
    pub job_type: JobType,
    pub entity_id: Uuid,
    pub params: serde_json::Value,
    pub status: JobStatus,
    pub progress: i16,
    pub result_media_id: Option<Uuid>,
    pub error_message: Option<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// A stored media item, shaped as the status route shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Media {
    pub id: Uuid,
    pub media_type: String,
    pub mime_type: String,
    pub public_url: String,
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub size_bytes: i64,
    pub created_at: DateTime<Utc>,
}
