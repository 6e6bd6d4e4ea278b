//! The built-in simulator: a stand-in provider for local runs and tests, never a default in a
//! deployment. It takes `SIMULATOR_DURATION_MS`, reports progress while it runs, and produces
//! real files: PNG images and a small WebM video.
//!
//! It can be told to fail through the prompt: `simulate:fail` gives a fatal error and
//! `simulate:retryable` a retryable one, so the failure paths can be shown end to end.

use std::{io::Cursor, time::Duration};

use async_trait::async_trait;

use super::{
    Callback, GenerateError, GeneratedFile, Generation, Generator, Inputs, MediaKind, Progress,
};
use crate::model::{Job, JobType};

static SAMPLE_VIDEO: &[u8] = include_bytes!("../../assets/sample.webm");

pub const FAIL_MARKER: &str = "simulate:fail";
pub const RETRYABLE_MARKER: &str = "simulate:retryable";

const STEPS: u32 = 10;
const IMAGE_SIZE: u32 = 256;

pub struct Simulator {
    duration: Duration,
}

impl Simulator {
    pub fn new(duration: Duration) -> Self {
        Self { duration }
    }
}

#[async_trait]
impl Generator for Simulator {
    fn model(&self) -> &str {
        "simulator"
    }

    async fn generate(
        &self,
        job: &Job,
        _inputs: &Inputs,
        progress: &Progress,
        _callback: Option<&Callback>,
    ) -> Result<Generation, GenerateError> {
        self.files(job, progress).await.map(Generation::Done)
    }
}

impl Simulator {
    async fn files(
        &self,
        job: &Job,
        progress: &Progress,
    ) -> Result<Vec<GeneratedFile>, GenerateError> {
        let prompt = job
            .params
            .get("prompt")
            .and_then(|p| p.as_str())
            .unwrap_or("");
        for step in 1..=STEPS {
            if !self.duration.is_zero() {
                tokio::time::sleep(self.duration / STEPS).await;
            }
            progress.report((step * 100 / (STEPS + 1)) as u8);
            if step == STEPS / 2 {
                if prompt.contains(FAIL_MARKER) {
                    return Err(GenerateError::Fatal(format!(
                        "simulated failure: the prompt asked for `{FAIL_MARKER}`"
                    )));
                }
                if prompt.contains(RETRYABLE_MARKER) {
                    return Err(GenerateError::Retryable(format!(
                        "simulated provider overload: the prompt asked for `{RETRYABLE_MARKER}`"
                    )));
                }
            }
        }
        let seed = seed_of(job);
        match job.job_type {
            JobType::CharacterImage => Ok(vec![png(seed)?]),
            JobType::Moodboard => {
                let count = job
                    .params
                    .get("count")
                    .and_then(|c| c.as_u64())
                    .unwrap_or(4)
                    .clamp(1, 4);
                (0..count)
                    .map(|i| png(seed.wrapping_add(i * 0x9e37_79b9)))
                    .collect()
            }
            JobType::Animation => Ok(vec![GeneratedFile {
                kind: MediaKind::Video,
                mime_type: "video/webm",
                extension: "webm",
                width: Some(128),
                height: Some(128),
                bytes: bytes::Bytes::from_static(SAMPLE_VIDEO),
            }]),
        }
    }
}

fn seed_of(job: &Job) -> u64 {
    let (hi, lo) = job.id.as_u64_pair();
    hi ^ lo.rotate_left(17)
}

/// A gradient whose colours come from the seed, so different jobs give visibly different images.
fn png(seed: u64) -> Result<GeneratedFile, GenerateError> {
    let [r0, g0, b0, r1, g1, b1, ..] = seed.to_le_bytes();
    let size = IMAGE_SIZE;
    let mut pixels = Vec::with_capacity((size * size * 3) as usize);
    for y in 0..size {
        for x in 0..size {
            let t = (x + y) as f32 / (2 * (size - 1)) as f32;
            let mix = |a: u8, b: u8| (a as f32 * (1.0 - t) + b as f32 * t) as u8;
            let ring =
                (((x as i32 - 128).pow(2) + (y as i32 - 128).pow(2)) as f32).sqrt() as u32 % 32 < 3;
            if ring {
                pixels.extend_from_slice(&[255, 255, 255]);
            } else {
                pixels.extend_from_slice(&[mix(r0, r1), mix(g0, g1), mix(b0, b1)]);
            }
        }
    }
    let mut out = Cursor::new(Vec::new());
    let mut encode = || -> Result<(), png::EncodingError> {
        let mut encoder = png::Encoder::new(&mut out, size, size);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header()?.write_image_data(&pixels)
    };
    encode()
        .map_err(|e| GenerateError::Fatal(format!("could not encode the simulated image: {e}")))?;
    Ok(GeneratedFile {
        kind: MediaKind::Image,
        mime_type: "image/png",
        extension: "png",
        width: Some(size as i32),
        height: Some(size as i32),
        bytes: out.into_inner().into(),
    })
}
