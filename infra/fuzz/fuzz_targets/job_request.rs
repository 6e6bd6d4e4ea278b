//! Generate-request bodies: never a panic, and whatever is accepted is storable and in bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let kind = ["character", "moodboard", "animation", "sculpture"][selector as usize % 4];
    if let Ok(params) = shared::fuzz::job_request(kind, body) {
        assert!(params.is_object());
        for field in ["prompt", "negativePrompt"] {
            if let Some(prompt) = params.get(field).and_then(|v| v.as_str()) {
                assert!(prompt.chars().count() <= 2000);
                // Postgres refuses NUL in jsonb text; a control character never gets that far.
                assert!(!prompt
                    .chars()
                    .any(|c| c.is_control() && c != '\n' && c != '\t'));
            }
        }
        if let Some(count) = params.get("count").and_then(|v| v.as_u64()) {
            assert!((1..=4).contains(&count));
        }
    }
});
