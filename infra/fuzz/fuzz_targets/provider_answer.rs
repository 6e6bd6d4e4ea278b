//! Whatever ModelsLab (or someone posing as it) answers: never a panic, and a 429 or 5xx is
//! never taken as a final verdict on the job.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let status = 100 + u16::from_le_bytes([data[0], data[1]]) % 500;
    let verdict = shared::fuzz::provider_answer(status, &data[2..]);
    if status == 429 || status >= 500 {
        assert!(verdict.is_err());
    }
});
